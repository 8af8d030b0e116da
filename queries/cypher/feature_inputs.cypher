// Input-dependent attributions of a feature: in every prompt graph that keeps it, its strongest inputs.
MATCH (n:PNode)-[:INSTANCE_OF]->(f:Feature {id: $id})
WHERE n.kept
MATCH (s:PNode)-[e:ATTR]->(n)
RETURN n.prompt_id AS prompt, n.pos AS pos, n.activation AS activation, n.influence AS influence,
       s.id AS src, s.kind AS kind, s.token AS token, e.weight AS weight
ORDER BY influence DESC, prompt, pos, abs(e.weight) DESC, src
