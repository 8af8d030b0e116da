"""Head-resolved attribution: each edge of a prompt's graph split into the attention heads that carried it.

An edge s -> t of the local replacement model (`ingest.attribution`) sums every path from s to t. Sort the paths
by the last attention head they cross before reaching t (the head whose output t reads, through nothing but the
residual stream and skip paths): paths crossing no head at all form the `direct` term (s at t's position), and the
paths whose last head is h of layer m form

    term_h(s, t) = sum_k pattern_h[q_t, k] * (W_O^h g_t[m]) . ((P(F_s[m, k]) / s1[m, k]) @ W_V^h)

where g_t[m] is t's gradient at `resid_mid[m]` along non-attention paths only (its encoder column or unembedding
column through the frozen ln2 / final norm and the skip paths, nonzero at t's position q_t alone) and F_s[m] is s's
share of `resid_pre[m]` carried forward through everything before m (`ingest.contributions`). Every path has exactly
one such class, so `direct + sum_h term_h == edge` exactly; for a path through one head this is the head's pattern
at (target position, source position) times the OV path. The same split of each target's constant term (`bias`,
whose values also carry b_V) is returned per target: zeroing head h's pattern with every other head's output, the
norm scales, features and errors frozen changes t by exactly `-(sum_s term_h(s, t) + bias_term_h(t))`
(`tests/test_head_terms.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch
from circuit_catalog.catalog import ids, layout
from circuit_catalog.ingest.attribution import AttributionGraph, trace_prompt
from circuit_catalog.ingest.contributions import Forward, Sources
from circuit_catalog.ingest.residual import centres, reads_normalised
from circuit_catalog.ingest.transcoder import TranscoderSet


@dataclass
class HeadTerms:
    """Per-head terms of some edges (graph node indices) and of their targets' constant terms."""

    heads: list[str]  # head ids, `L{m}H{h}`, layer-major: column j of `terms` is heads[j]
    dst: torch.Tensor  # [E] target node index
    src: torch.Tensor  # [E] source node index
    terms: torch.Tensor  # [E, n_layers * n_heads]
    direct: torch.Tensor  # [E] paths through no head
    targets: torch.Tensor  # [T] the target node indices met
    bias_terms: torch.Tensor  # [T, n_layers * n_heads]: each target's constant term through each head


def _target_vectors(model, tset: TranscoderSet, graph: AttributionGraph, custom_vector: torch.Tensor | None,
                    nodes: list[int]) -> tuple[list[int], list[int], list[torch.Tensor]]:
    """For each target node index in `nodes`: the layer it reads at (n_layers for logits), its position, its reading
    vector (encoder column, unembedding column or the custom target's direction)."""
    n_feat, n_logits = graph.n_features, len(graph.logit_probabilities)
    first_logit = graph.n_nodes - n_logits
    layer, pos, vectors = [], [], []
    for i in nodes:
        if i < n_feat:
            lay, p, f = graph.features[i].tolist()
            layer.append(lay), pos.append(p), vectors.append(tset[lay].W_enc[:, f])
        elif i >= first_logit:
            j = i - first_logit
            vec = model.W_U[:, graph.logit_targets[j]] if j < len(graph.logit_targets) else custom_vector
            layer.append(graph.n_layers), pos.append(graph.n_pos - 1), vectors.append(vec.detach())
        else:
            raise ValueError(f"node {i} is neither a feature nor a logit: not a target")
    return layer, pos, vectors


@torch.no_grad()
def head_terms(model, tset: TranscoderSet, graph: AttributionGraph, dst: torch.Tensor, src: torch.Tensor,
               custom_vector: torch.Tensor | None = None, chunk: int = 1024) -> HeadTerms:
    """The per-head and direct terms of the edges src[e] -> dst[e] (node indices in the graph's order)."""
    cfg = model.cfg
    n_layers, n_heads, n_pos, n_feat = cfg.n_layers, cfg.n_heads, graph.n_pos, graph.n_features
    trace = graph.trace or trace_prompt(model, tset, graph.tokens, graph.settings.get("zero_bos", True))
    device, dtype = trace.resid0.device, trace.resid0.dtype
    centre = centres(model)

    def c(v: torch.Tensor) -> torch.Tensor:
        return v - v.mean(-1, keepdim=True) if centre else v

    # sources: the graph's feature nodes map to rows of the trace's active features
    active_index = {tuple(r): i for i, r in enumerate(trace.active.tolist())}
    src_nodes = torch.unique(src)
    feat_nodes = src_nodes[src_nodes < n_feat]
    err_nodes = src_nodes[(src_nodes >= n_feat) & (src_nodes < n_feat + graph.n_errors)]
    tok_nodes = src_nodes[(src_nodes >= n_feat + graph.n_errors) & (src_nodes < graph.n_nodes - len(graph.logit_probabilities))]
    features = torch.tensor([active_index[tuple(graph.features[i].tolist())] for i in feat_nodes.tolist()], dtype=torch.long, device=device)
    err = err_nodes - n_feat
    sources = Sources(features, torch.stack([err // n_pos, err % n_pos], 1).to(device), (tok_nodes - n_feat - graph.n_errors).to(device))
    row_of = torch.full((graph.n_nodes,), -1, dtype=torch.long, device=device)
    row_of[torch.cat([feat_nodes, err_nodes, tok_nodes]).to(device)] = torch.arange(sources.n_rows - 1, device=device)

    # targets: non-attention gradients at resid_mid[m] (g_mid) and resid_post[m] (g_post), at the target's position
    targets = torch.unique(dst)
    t_of = torch.full((graph.n_nodes,), -1, dtype=torch.long, device=device)
    t_of[targets.to(device)] = torch.arange(len(targets), device=device)
    t_layer, t_pos, t_vec = _target_vectors(model, tset, graph, custom_vector, targets.tolist())
    T, d = len(targets), trace.resid0.shape[-1]
    g_mid = torch.zeros(T, n_layers, d, dtype=dtype, device=device)
    g_post = torch.zeros(T, n_layers, d, dtype=dtype, device=device)
    q_of = torch.tensor(t_pos, dtype=torch.long, device=device)
    L_of = torch.tensor(t_layer, dtype=torch.long, device=device)
    # every target at once, layer by layer from the top (a Python loop over targets cost seconds on SmolLM2)
    is_logit = L_of == n_layers
    normalised = torch.tensor([L == n_layers or reads_normalised(tset[L]) for L in t_layer], dtype=torch.bool, device=device)
    scale = torch.where(is_logit, trace.final_scale[q_of], trace.ln2_scale[L_of.clamp(max=n_layers - 1), q_of])
    v = torch.stack([x.to(dtype) for x in t_vec]).float() if T else torch.zeros(0, d, device=device)
    g = torch.where(normalised[:, None], c(v) / scale[:, None], v)  # float32 down the layers, stored in the compute dtype
    top_of = torch.where(is_logit, n_layers - 1, L_of)
    for m in range(n_layers - 1, -1, -1):
        post = m < L_of  # the MLP of layer m lies between resid_mid[m] and the target
        g_post[post, m] = g[post]
        if m in tset.by_layer and tset[m].W_skip is not None:
            back = (g.to(tset[m].W_skip.dtype) @ tset[m].W_skip.T).float()
            step = c(back) / trace.ln2_scale[m, q_of][:, None] if reads_normalised(tset[m]) else back
            g = torch.where(post[:, None], g + step, g)
        mid = m <= top_of
        g_mid[mid, m] = g[mid]

    # direct terms: a source at the target's position, through no head
    n_edges = len(dst)
    e_t, e_s = t_of[dst.to(device)], row_of[src.to(device)]
    direct = torch.zeros(n_edges, dtype=dtype, device=device)
    writes = _write_vectors(tset, trace, sources, n_layers)
    for m, (rows, pos, vec) in writes.items():
        w = torch.zeros(sources.n_rows, d, dtype=dtype, device=device)
        wpos = torch.full((sources.n_rows,), -1, dtype=torch.long, device=device)
        w[rows], wpos[rows] = vec, pos
        same = (wpos[e_s] == q_of[e_t]) & (m < L_of[e_t])
        direct[same] += (w[e_s[same]] * g_post[e_t[same], m]).sum(-1)
    tok0 = len(sources.features) + len(sources.errors)
    is_tok = (e_s >= tok0) & (e_s < sources.bias_row)
    tok_pos = sources.tokens[(e_s[is_tok] - tok0)]
    same = tok_pos == q_of[e_t[is_tok]]
    idx = is_tok.nonzero().flatten()[same]
    direct[idx] = (trace.resid0[tok_pos[same]] * g_mid[e_t[idx], 0]).sum(-1)

    # head terms, one attention layer at a time, with each target's constant term as one more edge per target: every
    # (live source, live target) pair at once as one batched matmul per layer (each head's [sources, positions x d_head]
    # values against its [positions x d_head, targets] pattern-weighted W_O g), then the edges gathered from it; pruned
    # graphs are dense enough (a quarter of the pairs on SmolLM2) that this beats gathering each edge's values
    all_t = torch.cat([e_t, torch.arange(T, device=device)])
    all_s = torch.cat([e_s, torch.full((T,), sources.bias_row, device=device)])
    terms = torch.zeros(len(all_t), n_layers, n_heads, dtype=dtype, device=device)
    forward = Forward(model, tset, trace, sources)
    last = int(L_of.max().clamp(max=n_layers - 1)) if T else -1
    for m, F in forward.run(last + 1):
        if m > last:
            break
        t_live, s_live = (L_of >= m).nonzero().flatten(), forward.live(m)
        t_idx, s_idx = _positions_in(t_live, T), _positions_in(s_live, sources.n_rows)
        live = ((t_idx[all_t] >= 0) & (s_idx[all_s] >= 0)).nonzero().flatten()
        if not len(live):
            continue
        V = forward.values(m, F, s_live)  # [S', n_pos, H, e]
        U = torch.einsum("hed,td->the", model.blocks[m].attn.W_O.detach().to(dtype), g_mid[t_live, m])  # [T', H, e]
        pattern = trace.patterns[m].to(dtype)[:, q_of[t_live], :]  # [H, T', k]
        Q = pattern.permute(0, 2, 1)[..., None] * U.permute(1, 0, 2)[:, None]  # [H, k, T', e]
        A = V.permute(2, 0, 1, 3).reshape(n_heads, len(s_live), -1)  # [H, S', k * e]
        B = Q.permute(0, 1, 3, 2).reshape(n_heads, -1, len(t_live))  # [H, k * e, T']
        for start in range(0, len(t_live), chunk):
            cols = slice(start, start + chunk)
            pairs = torch.bmm(A, B[:, :, cols])  # [H, S', chunk]
            e = live[(t_idx[all_t[live]] >= start) & (t_idx[all_t[live]] < start + chunk)]
            terms[e, m] = pairs[:, s_idx[all_s[e]], t_idx[all_t[e]] - start].T
    heads = [ids.head_id(m, h) for m in range(n_layers) for h in range(n_heads)]
    flat = terms.reshape(len(all_t), -1)
    return HeadTerms(heads, dst, src, flat[:n_edges].cpu(), direct.cpu(), targets, flat[n_edges:].cpu())


def _positions_in(chosen: torch.Tensor, n: int) -> torch.Tensor:
    """[n]: each index's position in `chosen`, -1 where absent."""
    out = torch.full((n,), -1, dtype=torch.long, device=chosen.device)
    out[chosen] = torch.arange(len(chosen), device=chosen.device)
    return out


def _write_vectors(tset: TranscoderSet, trace, sources: Sources, n_layers: int) -> dict[int, tuple]:
    """Per layer: (rows, positions, vectors) of what the feature and error rows write into its MLP output."""
    out = {}
    active = trace.active[sources.features]
    for m in range(n_layers):
        rows, pos, vec = [], [], []
        for tc, W in tset.writes_into(m):
            r = (active[:, 0] == tc.layer).nonzero().flatten()
            if len(r):
                idx = sources.features[r]
                rows.append(r), pos.append(trace.active[idx, 1]), vec.append(trace.activations[idx, None] * W[trace.active[idx, 2]])
        e = (sources.errors[:, 0] == m).nonzero().flatten()
        if len(e):
            rows.append(len(sources.features) + e), pos.append(sources.errors[e, 1]), vec.append(trace.errors[m, sources.errors[e, 1]])
        if rows:
            out[m] = (torch.cat(rows), torch.cat(pos), torch.cat(vec))
    return out


def head_table(terms: HeadTerms, ids: list[str], top: int = 8) -> pa.Table:
    """edges_heads.parquet: per edge its `direct` term, its `top` heads by |term|, and `other` (the rest), each row
    (src, dst, head, weight); an edge's rows sum to its weight. Zero terms are left out."""
    E, H = terms.terms.shape
    k = min(top, H)
    device = terms.terms.device
    top_idx = terms.terms.abs().topk(k, dim=1).indices if E else torch.zeros(0, k, dtype=torch.long, device=device)
    kept = terms.terms.gather(1, top_idx)
    other = terms.terms.sum(1) - kept.sum(1)
    head_names = pa.array(terms.heads + ["direct", "other"])
    heads = torch.cat([top_idx, torch.full((E, 1), H, device=device), torch.full((E, 1), H + 1, device=device)], 1)
    values = torch.cat([kept, terms.direct[:, None], other[:, None]], 1)
    edge = torch.arange(E, device=device)[:, None].expand_as(heads)
    keep = values != 0
    id_array = pa.array(ids)
    e = edge[keep]
    return pa.table([id_array.take(pa.array(terms.src[e].cpu().numpy())), id_array.take(pa.array(terms.dst[e].cpu().numpy())),
                     head_names.take(pa.array(heads[keep].cpu().numpy())), pa.array(values[keep].float().cpu().numpy(), pa.float32())],
                    schema=layout.ATTR_HEAD_SCHEMA)
