// What feeds a feature: its strongest incoming pullback edges by |weight|.
// $layer = -1 and $sign = 0 mean "any": LadybugDB types a NULL parameter as BOOL, so no IS NULL tests.
MATCH (s:Feature)-[e:PULLBACK]->(d:Feature {id: $id})
WHERE ($layer < 0 OR s.layer = $layer) AND ($sign = 0 OR e.weight * $sign > 0)
RETURN s.id AS feature, e.weight AS weight
ORDER BY abs(e.weight) DESC, feature
LIMIT $k
