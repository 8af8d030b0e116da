// Which tokens reach a feature through which attention heads (the de-embedding through each head's OV circuit):
// its strongest incoming OV_TOKEN edges by |weight|. $head = '' means any head.
MATCH (t:Token)-[e:OV_TOKEN]->(f:Feature {id: $id})
WHERE $head = '' OR e.head = $head
RETURN t.id AS token_id, t.text AS token, e.head AS head, e.weight AS weight
ORDER BY abs(e.weight) DESC, token_id, head
LIMIT $k
