// Which earlier features reach a feature through which attention heads: its strongest incoming OV pullbacks
// by |weight| (one edge per source, head and target), with the source's top extended de-embedding tokens.
// $head = '' and $layer = -1 mean "any" (the attention layer is the head's; $layer filters the source's layer).
MATCH (s:Feature)-[e:OV]->(f:Feature {id: $id})
WHERE ($head = '' OR e.head = $head) AND ($layer < 0 OR s.layer = $layer)
RETURN s.id AS source, e.head AS head, e.weight AS weight, s.deembed_ext_tokens AS tokens
ORDER BY abs(e.weight) DESC, source, head
LIMIT $k
