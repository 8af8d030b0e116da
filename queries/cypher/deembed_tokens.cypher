// A feature's de-embedding tokens (raw and extended), strongest first.
MATCH (t:Token)-[e:DEEMBED]->(f:Feature {id: $id})
RETURN e.variant AS variant, t.id AS token_id, t.text AS token, e.weight AS weight
ORDER BY variant, weight DESC, token_id
