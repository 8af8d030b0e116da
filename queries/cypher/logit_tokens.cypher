// Logit-lens tokens of a set of features, strongest first.
MATCH (f:Feature)-[e:LOGIT]->(t:Token)
WHERE f.id IN $ids
RETURN f.id AS feature, t.id AS token_id, t.text AS token, e.weight AS weight
ORDER BY feature, weight DESC, token_id
