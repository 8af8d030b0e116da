// Edges of pruned graphs that recur across prompts, their ends named by feature id (or token text, for tokens and
// logits) whatever the position: in how many prompts, and their summed weight.
MATCH (a:PNode)-[e:ATTR]->(b:PNode)
WHERE a.kind <> 'error' AND b.kind <> 'error'
RETURN a.kind AS source_kind, coalesce(a.feature_id, a.token) AS source, b.kind AS target_kind,
       coalesce(b.feature_id, b.token) AS target, count(DISTINCT a.prompt_id) AS prompts, sum(e.weight) AS weight
ORDER BY prompts DESC, abs(weight) DESC, source, target
LIMIT $k
