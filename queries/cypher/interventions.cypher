// Interventions that touched a feature (newest first): what was edited, on which prompt, in which regime,
// and what it did to each target logit (one row per target; none for an intervention without targets).
MATCH (i:Intervention)-[t:TOUCHES]->(f:Feature {id: $id})
WITH i, t
ORDER BY i.created DESC, i.id
LIMIT $k
OPTIONAL MATCH (i)-[c:CHANGES]->(tok:Token)
RETURN i.id AS id, i.prompt_id AS prompt_id, i.prompt AS prompt, i.regime AS regime, i.spec AS spec, t.edits AS edits,
       i.kl AS kl, i.generated_original AS generated_original, i.generated_steered AS generated_steered,
       i.created AS created, tok.text AS token, c.before AS before, c.after AS after, c.change AS change
ORDER BY created DESC, id, token
