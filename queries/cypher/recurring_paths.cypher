// Two-edge paths of pruned graphs that recur across prompts (ends and middle named as in recurring_edges):
// in how many prompts, and the summed product of their two weights.
MATCH (a:PNode)-[e1:ATTR]->(b:PNode)-[e2:ATTR]->(c:PNode)
WHERE a.kind <> 'error' AND b.kind = 'feature' AND c.kind <> 'error'
RETURN a.kind AS source_kind, coalesce(a.feature_id, a.token) AS source, b.feature_id AS via, c.kind AS target_kind,
       coalesce(c.feature_id, c.token) AS target, count(DISTINCT a.prompt_id) AS prompts, sum(e1.weight * e2.weight) AS weight
ORDER BY prompts DESC, abs(weight) DESC, source, via, target
LIMIT $k
