// The per-head terms of one prompt's pruned edges (ATTR_HEAD beside each ATTR): `head` is a head id, `direct`
// (no attention on the path) or `other` (the heads beyond the top ones); an edge's terms sum to its weight.
MATCH (a:PNode)-[e:ATTR_HEAD]->(b:PNode)
WHERE b.prompt_id = $id
RETURN a.id AS src, b.id AS dst, e.head AS head, e.weight AS weight
