// The edges of one prompt's pruned attribution graph: direct effect of src on dst.
MATCH (a:PNode)-[e:ATTR]->(b:PNode)
WHERE b.prompt_id = $id
RETURN a.id AS src, b.id AS dst, e.weight AS weight
