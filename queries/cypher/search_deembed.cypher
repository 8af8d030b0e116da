// Features that list one of these token texts among their top de-embedding tokens of one variant.
MATCH (t:Token)-[e:DEEMBED]->(f:Feature)
WHERE t.text IN $texts AND e.variant = $variant
RETURN f.id AS feature, t.text AS token, e.weight AS weight
ORDER BY weight DESC, feature
LIMIT $k
