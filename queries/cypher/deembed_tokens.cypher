// De-embedding tokens (raw and extended) of a set of features, strongest first.
MATCH (t:Token)-[e:DEEMBED]->(f:Feature)
WHERE f.id IN $ids
RETURN f.id AS feature, e.variant AS variant, t.id AS token_id, t.text AS token, e.weight AS weight
ORDER BY feature, variant, weight DESC, token_id
