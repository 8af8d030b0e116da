// What feeds a feature: its strongest incoming pullback edges by |weight|,
// with the other feature's top extended de-embedding tokens for orientation.
// $normalise: the weight times the reader's (here f's) inv_scale, E[1/norm scale] at its input; null without statistics.
// $layer = -1 and $sign = 0 mean "any": LadybugDB types a NULL parameter as BOOL, so no IS NULL tests.
MATCH (n:Feature)-[e:PULLBACK]->(f:Feature {id: $id})
WHERE ($layer < 0 OR n.layer = $layer) AND ($sign = 0 OR e.weight * $sign > 0)
WITH n, e.weight * CASE WHEN $normalise THEN f.inv_scale ELSE 1.0 END AS weight
RETURN n.id AS feature, weight, n.deembed_ext_tokens AS tokens
ORDER BY abs(weight) DESC, feature
LIMIT $k
