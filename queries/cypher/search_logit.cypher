// Features that list one of these token texts among their top logit-lens tokens.
MATCH (f:Feature)-[e:LOGIT]->(t:Token)
WHERE t.text IN $texts
RETURN f.id AS feature, t.text AS token, e.weight AS weight
ORDER BY weight DESC, feature
LIMIT $k
