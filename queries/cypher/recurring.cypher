// Features that appear in the most prompts' pruned attribution graphs: the first k of the catalog-wide tally
// (`catalog/tallies.py`: per feature, the prompts whose pruned graph holds it and its summed influence there, ranked).
UNWIND range(1, $k) AS rank
MATCH (t:FeatureTally {rank: rank})
MATCH (f:Feature {id: t.feature})
RETURN f.id AS feature, t.prompts AS prompts, t.influence AS influence, f.deembed_ext_tokens AS tokens,
       f.logit_tokens AS logit_tokens
ORDER BY rank
