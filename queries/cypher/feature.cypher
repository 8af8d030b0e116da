// One feature's node, to tell an unknown id from a feature without edges.
MATCH (f:Feature {id: $id})
RETURN f.id AS id, f.layer AS layer, f.transcoder AS transcoder
