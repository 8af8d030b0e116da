// A feature's logit-lens tokens, strongest first.
MATCH (f:Feature {id: $id})-[e:LOGIT]->(t:Token)
RETURN t.id AS token_id, t.text AS token, e.weight AS weight
ORDER BY weight DESC, token_id
