// Every prompt in the catalog.
MATCH (p:Prompt)
RETURN p.id AS id, p.text AS text, p.target AS target, p.n_tokens AS n_tokens,
       p.replacement_score AS replacement_score, p.completeness_score AS completeness_score
ORDER BY p.text, p.id
LIMIT $k
