// One attention head's node by id (e.g. 'L7H3'); with $id = '' any one head, to tell a catalog without heads.
MATCH (h:Head)
WHERE $id = '' OR h.id = $id
RETURN h.id AS id, h.layer AS layer, h.head AS head, h.kv_head AS kv_head
LIMIT 1
