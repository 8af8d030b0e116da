// Features found in the same prompts' pruned graphs as a feature, by the number of prompts they share with it.
MATCH (n:PNode)-[:INSTANCE_OF]->(:Feature {id: $id})
WHERE n.kept
MATCH (m:PNode)
WHERE m.prompt_id = n.prompt_id AND m.kept AND m.kind = 'feature' AND m.feature_id <> $id
RETURN m.feature_id AS feature, count(DISTINCT m.prompt_id) AS prompts, sum(m.influence) AS influence
ORDER BY prompts DESC, influence DESC, feature
LIMIT $k
