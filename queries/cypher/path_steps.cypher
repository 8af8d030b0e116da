// One expansion of a path frontier: pullback edges out of these features into layers up to $max_layer.
MATCH (a:Feature)-[e:PULLBACK]->(b:Feature)
WHERE a.id IN $ids AND b.layer <= $max_layer
RETURN a.id AS src, b.id AS dst, b.layer AS layer, e.weight AS weight
