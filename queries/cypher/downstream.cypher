// What a feature feeds: its strongest outgoing pullback edges by |weight|,
// with the other feature's top extended de-embedding tokens for orientation.
// $layer = -1 and $sign = 0 mean "any": LadybugDB types a NULL parameter as BOOL, so no IS NULL tests.
MATCH (f:Feature {id: $id})-[e:PULLBACK]->(n:Feature)
WHERE ($layer < 0 OR n.layer = $layer) AND ($sign = 0 OR e.weight * $sign > 0)
RETURN n.id AS feature, e.weight AS weight, n.deembed_ext_tokens AS tokens
ORDER BY abs(e.weight) DESC, feature
LIMIT $k
