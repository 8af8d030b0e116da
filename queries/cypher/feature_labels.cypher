// The top extended de-embedding and logit-lens tokens of several features: what labels them in a prompt's graph.
MATCH (f:Feature)
WHERE f.id IN $ids
RETURN f.id AS id, f.deembed_ext_tokens AS tokens, f.logit_tokens AS logit_tokens
