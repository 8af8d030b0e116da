// Features that list one of these token texts among their top de-embedding tokens.
MATCH (t:Token)-[e:DEEMBED]->(f:Feature)
WHERE t.text IN $texts
RETURN f.id AS feature, e.variant AS variant, t.text AS token, e.weight AS weight
ORDER BY weight DESC, feature
LIMIT $k
