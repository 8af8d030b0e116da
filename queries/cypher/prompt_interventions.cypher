// Interventions recorded on a prompt (newest first), and what they did to each target logit.
// `ON` is quoted: it is a keyword in LadybugDB's Cypher.
MATCH (i:Intervention)-[:`ON`]->(p:Prompt {id: $id})
WITH i
ORDER BY i.created DESC, i.id
LIMIT $k
OPTIONAL MATCH (i)-[c:CHANGES]->(tok:Token)
RETURN i.id AS id, i.prompt_id AS prompt_id, i.prompt AS prompt, i.regime AS regime, i.spec AS spec, i.spec AS edits,
       i.kl AS kl, i.generated_original AS generated_original, i.generated_steered AS generated_steered,
       i.created AS created, tok.text AS token, c.before AS before, c.after AS after, c.change AS change
ORDER BY created DESC, id, token
