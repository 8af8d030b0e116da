// Last hops of token-to-logit paths: features whose logit lens reaches one of these token texts.
MATCH (f:Feature)-[e:LOGIT]->(t:Token)
WHERE t.text IN $texts
RETURN f.id AS feature, t.text AS token, e.weight AS weight
