// The nodes of one prompt's pruned attribution graph.
MATCH (n:PNode)
WHERE n.prompt_id = $id AND n.kept
RETURN n.id AS id, n.kind AS kind, n.layer AS layer, n.pos AS pos, n.feature_index AS feature_index, n.feature_id AS feature_id,
       n.token_id AS token_id, n.token AS token, n.activation AS activation, n.value AS value,
       n.influence AS influence, n.probability AS probability
ORDER BY layer, pos, id
