// What a feature feeds: its strongest outgoing pullback edges by |weight|.
// $layer = -1 and $sign = 0 mean "any": LadybugDB types a NULL parameter as BOOL, so no IS NULL tests.
MATCH (s:Feature {id: $id})-[e:PULLBACK]->(d:Feature)
WHERE ($layer < 0 OR d.layer = $layer) AND ($sign = 0 OR e.weight * $sign > 0)
RETURN d.id AS feature, e.weight AS weight
ORDER BY abs(e.weight) DESC, feature
LIMIT $k
