// First hops of token-to-logit paths: features that de-embed from one of these token texts.
MATCH (t:Token)-[e:DEEMBED]->(f:Feature)
WHERE t.text IN $texts AND e.variant = $variant
RETURN t.text AS token, f.id AS feature, f.layer AS layer, e.weight AS weight
