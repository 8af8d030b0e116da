"""QK attribution: why a head attended from a query position to a key position, as bilinear node terms.

The pre-softmax score of head h (layer m) from query position q to key position k is
`score = rot_q(ln1(x_q) @ W_Q^h + b_Q^h) . rot_k(ln1(x_k) @ W_K^h + b_K^h) / attn_scale`, where x is the residual
stream `resid_pre[m]`. With ln1's scale frozen at the prompt's value, ln1 is linear (centring for LayerNorm, then
division by the scale); rotary embedding is a fixed rotation per position, linear too. The residual at each
position is a sum over source nodes (`ingest.contributions`: features, errors, tokens, and a constant `bias` row,
each carried through the frozen earlier layers), so

    q = sum_a q_a,  q_a = rot_q(P(x_a) / s_q @ W_Q^h)   (the bias row's q_a also holds b_Q^h)
    k = sum_b k_b,  k_b = rot_k(P(x_b) / s_k @ W_K^h)   (the bias row's k_b also holds b_K^h)
    score = sum_{a, b} q_a . k_b / attn_scale

exactly: every (query-side node, key-side node) pair has a term, and the terms sum to the model's score.
The one-sided totals are `q_a . k / attn_scale` (a query-side node against the whole key) and
`q . k_b / attn_scale`. Grouped-query attention reads W_K of the head's key-value group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from circuit_catalog.catalog.ids import parse_head_id
from circuit_catalog.ingest.attribution import check_supported, trace_prompt
from circuit_catalog.ingest.contributions import Forward, Sources
from circuit_catalog.ingest.transcoder import TranscoderSet

from circuit_catalog.errors import AttributionError, ModelError, UnknownHead


@dataclass
class QKAttribution:
    head: str
    query_pos: int
    key_pos: int
    score: float  # the model's pre-softmax score (hook_attn_scores)
    pattern: float  # the attention weight after softmax
    query_nodes: list[str]
    key_nodes: list[str]
    terms: torch.Tensor  # [n_query_nodes, n_key_nodes]: sum == score
    tokens: list[str] = field(default_factory=list)  # the prompt's tokens, for labels

    @property
    def total(self) -> float:
        return float(self.terms.sum())

    def top_pairs(self, k: int = 10) -> list[tuple[str, str, float]]:
        """The k pairs of largest |term|."""
        flat = self.terms.flatten()
        top = flat.abs().topk(min(k, len(flat))).indices.tolist()
        n = self.terms.shape[1]
        return [(self.query_nodes[i // n], self.key_nodes[i % n], float(flat[i])) for i in top]

    def query_totals(self, k: int | None = None) -> list[tuple[str, float]]:
        return _ranked(self.query_nodes, self.terms.sum(1), k)

    def key_totals(self, k: int | None = None) -> list[tuple[str, float]]:
        return _ranked(self.key_nodes, self.terms.sum(0), k)


def _ranked(names: list[str], values: torch.Tensor, k: int | None) -> list[tuple[str, float]]:
    order = values.abs().argsort(descending=True).tolist()[:k]
    return [(names[i], float(values[i])) for i in order]


def check_qk_supported(model) -> None:
    cfg = model.cfg
    for flag, what in (("use_qk_norm", "per-head norms on queries and keys"), ("use_logn_attn", "log-n attention scaling"),
                       ("use_dynamic_ntk_rope", "dynamic NTK rotary scaling"), ("use_attention_sinks", "attention sinks")):
        if getattr(cfg, flag, False):
            raise ModelError(f"QK attribution does not support {what} (not a bilinear score)")
    if getattr(cfg, "attn_scores_soft_cap", -1.0) > 0:
        raise ModelError("QK attribution does not support soft-capped attention scores (not a bilinear score)")
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        raise ModelError(f"QK attribution supports learned and rotary positions, not {cfg.positional_embedding_type!r}")


def _rotate(attn, vectors: torch.Tensor, pos: int) -> torch.Tensor:
    """[n, d_head] -> the same vectors rotated as the model rotates position `pos` (identity without rotary)."""
    if attn.cfg.positional_embedding_type != "rotary":
        return vectors
    x = torch.zeros(vectors.shape[0], pos + 1, 1, vectors.shape[1], dtype=vectors.dtype, device=vectors.device)
    x[:, pos, 0] = vectors
    return attn.apply_rotary(x)[:, pos, 0]


@torch.no_grad()
def qk_attribution(model, tset: TranscoderSet, tokens: torch.Tensor, head: str, query_pos: int, key_pos: int,
                   zero_bos: bool = True) -> QKAttribution:
    """The bilinear decomposition of head `head`'s score from `query_pos` to `key_pos` on these token ids."""
    check_supported(model, tset)
    check_qk_supported(model)
    layer, h = parse_head_id(head)
    if layer >= model.cfg.n_layers or h >= model.cfg.n_heads:
        raise UnknownHead(f"unknown head {head}: the model has {model.cfg.n_layers} layers of {model.cfg.n_heads} heads")
    n_pos = len(tokens)
    query_pos, key_pos = (p + n_pos if p < 0 else p for p in (query_pos, key_pos))
    if not 0 <= key_pos <= query_pos < n_pos:
        raise AttributionError(f"positions must satisfy 0 <= key <= query < {n_pos} (causal attention); got query "
                               f"{query_pos}, key {key_pos}")
    trace = trace_prompt(model, tset, tokens, zero_bos)
    sources = Sources.all_before(trace, model.cfg.n_layers, layer)
    forward = Forward(model, tset, trace, sources)
    F = next(F for m, F in forward.run(layer + 1) if m == layer)
    attn = model.blocks[layer].attn
    scale = trace.ln1_scale[layer]

    def side(pos: int, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = forward._centre(F[:, pos]) / scale[pos]
        v = x @ W.detach().to(x.dtype)
        v[sources.bias_row] += b.detach()
        return _rotate(attn, v, pos)

    q = side(query_pos, attn.W_Q[h], attn.b_Q[h])
    k = side(key_pos, attn.W_K[h], attn.b_K[h])
    terms = (q @ k.T) / attn.attn_scale
    _, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n in (f"blocks.{layer}.attn.hook_attn_scores",
                                                                             f"blocks.{layer}.attn.hook_pattern"))
    labels = sources.labels(trace)
    return QKAttribution(head, query_pos, key_pos, float(cache[f"blocks.{layer}.attn.hook_attn_scores"][0, h, query_pos, key_pos]),
                         float(cache[f"blocks.{layer}.attn.hook_pattern"][0, h, query_pos, key_pos]),
                         labels, labels, terms.cpu(), [model.tokenizer.decode([t]) for t in tokens.tolist()])
