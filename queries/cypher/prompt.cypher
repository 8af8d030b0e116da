// One prompt of the catalog by id or by its exact text, with its graph's scores.
MATCH (p:Prompt)
WHERE p.id = $key OR p.text = $key
RETURN p.id AS id, p.text AS text, p.target AS target, p.n_tokens AS n_tokens,
       p.replacement_score AS replacement_score, p.completeness_score AS completeness_score
ORDER BY id
