// Features that appear in the most prompts' pruned attribution graphs.
MATCH (n:PNode)-[:INSTANCE_OF]->(f:Feature)
WHERE n.kept
RETURN f.id AS feature, count(DISTINCT n.prompt_id) AS prompts, sum(n.influence) AS influence,
       f.deembed_ext_tokens AS tokens, f.logit_tokens AS logit_tokens
ORDER BY prompts DESC, influence DESC, feature
LIMIT $k
