// The supernodes a feature belongs to (per prompt, and over the prompt set: prompt ""), with all their members.
MATCH (s:Supernode)-[:GROUPS]->(:Feature {id: $id})
MATCH (s)-[:GROUPS]->(g:Feature)
RETURN s.id AS id, s.prompt_id AS prompt, s.name AS name, s.influence AS influence, collect(g.id) AS members
ORDER BY prompt, influence DESC, id
