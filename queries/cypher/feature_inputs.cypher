// Input-dependent attributions of a feature: its $k most influential occurrences in the prompt graphs that
// keep it, each with its $n_inputs strongest direct inputs (by |weight|).
// `SKIP 0`: LadybugDB orders a WITH only when SKIP or LIMIT follows; the ordered rows fix each list's order.
MATCH (n:PNode)-[:INSTANCE_OF]->(f:Feature {id: $id})
WHERE n.kept
MATCH (s:PNode)-[e:ATTR]->(n)
WITH n, s, e
ORDER BY abs(e.weight) DESC, s.id
SKIP 0
WITH n, collect({src: s.id, kind: s.kind, token: s.token, weight: e.weight}) AS inputs
RETURN n.prompt_id AS prompt, n.pos AS pos, n.activation AS activation, n.influence AS influence,
       inputs[..$n_inputs] AS inputs
ORDER BY influence DESC, prompt, pos
LIMIT $k
