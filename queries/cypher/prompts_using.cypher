// Prompts whose pruned attribution graph contains a feature, most influential first.
MATCH (n:PNode)-[:INSTANCE_OF]->(f:Feature {id: $id})
WHERE n.kept
MATCH (p:Prompt)
WHERE p.id = n.prompt_id
RETURN p.id AS prompt, p.text AS text, collect(n.pos) AS positions,
       sum(n.influence) AS influence, max(n.activation) AS activation
ORDER BY influence DESC, prompt
LIMIT $k
