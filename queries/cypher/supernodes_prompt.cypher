// The supernodes of one prompt's graph (prompt id "": those of the whole prompt set), most influential first.
MATCH (s:Supernode)-[:GROUPS]->(f:Feature)
WHERE s.prompt_id = $id
RETURN s.id AS id, s.name AS name, s.size AS size, s.influence AS influence, collect(f.id) AS members
ORDER BY influence DESC, id
