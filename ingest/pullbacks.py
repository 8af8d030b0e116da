"""Pullback edges between the features of two layers, as blocked matrix products with a streaming top-k.

For a later feature f (layer L) and an earlier transcoder l < L the pullback is
`p = W_dec^(l) @ W_enc^(L)[:, f]`: p[i] is the change in f's pre-activation per unit of feature i
along the direct residual path, with the later norm's scale left out (see `ingest.residual`).
Memory stays bounded by one block of `[block, d_sae_src]` scores whatever the sizes.

Only the direct path counts: attention, and the MLPs *and skip paths* of the layers between l and L,
are left out. A skip path reads its layer's normalised input, so its term would carry that layer's
input-dependent norm scale, which an input-independent weight cannot know (left out, it would be off
by that scale, typically a factor of several); attribution graphs, which know the scales, include it.
`tests/test_pullbacks.py` holds the stored weight to an intervention with that definition.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

DEFINITION = ("p[i] = W_dec^(l)[i] . W_enc^(L)[:, f] (norm centring applied): the change in f's pre-activation per unit "
              "of i along the direct residual path, with attention and the MLPs and skip paths of layers between l and L "
              "left out, and f's norm scale left out")


@dataclass
class EdgeBlock:
    """Selected edges of one block of destination features: parallel 1-D tensors."""

    src: torch.Tensor  # int64 source feature indices
    dst: torch.Tensor  # int64 destination feature indices
    weight: torch.Tensor  # float32


def block_size_for(n_src: int, budget_bytes: int = 256 << 20) -> int:
    """Destination features per block so one score block fits in `budget_bytes`."""
    return max(1, min(8192, budget_bytes // (4 * max(n_src, 1))))


def select_edges(
    W_dec_src: torch.Tensor,
    W_enc_dst: torch.Tensor,
    top_k: int | None,
    min_weight: float | None,
    block: int | None = None,
    score_dtype: torch.dtype | None = None,
) -> Iterator[EdgeBlock]:
    """Yield, block by block, the edges src->dst kept by top-k over |weight| and/or |weight| >= min_weight.

    W_dec_src: [n_src, d]; W_enc_dst: [d, n_dst]. With top_k, each destination keeps its K sources
    of largest |weight| (ties broken by torch.topk); with min_weight, weaker ones are then dropped.

    With a `score_dtype` such as bfloat16 (several times the float32 matmul rate on CPUs and GPUs that
    have it), the scores only choose candidates: twice K per destination, or those within bf16's error of
    `min_weight`; the candidates' weights are then recomputed in float32 and selected as above, so stored
    weights are float32 and the kept set is float32's except where two weights are within bf16's error.
    """
    if top_k is None and min_weight is None:
        raise ValueError("give top_k and/or min_weight: keeping every edge is rarely what you want")
    n_src, n_dst = W_dec_src.shape[0], W_enc_dst.shape[1]
    block = block or block_size_for(n_src)
    enc_t = W_enc_dst.T.contiguous()  # [n_dst, d]; rows of a block are then contiguous
    dec_t = W_dec_src.T.contiguous()  # [d, n_src]
    low = None if score_dtype in (None, torch.float32) else (enc_t.to(score_dtype), dec_t.to(score_dtype))
    for start in range(0, n_dst, block):
        if low is None:
            scores = enc_t[start : start + block] @ dec_t  # [b, n_src]; row f holds p for destination f
        else:
            scores = _rescored(enc_t[start : start + block], dec_t, low[0][start : start + block] @ low[1], top_k, min_weight)
        if top_k is not None:
            k = min(top_k, n_src)
            idx = scores.abs().topk(k, dim=1, sorted=False).indices  # [b, k]
            weight = scores.gather(1, idx)
            dst = torch.arange(start, start + scores.shape[0], device=scores.device).unsqueeze(1).expand_as(idx)
            src, dst, weight = idx.reshape(-1), dst.reshape(-1), weight.reshape(-1)
            if min_weight is not None:
                keep = weight.abs() >= min_weight
                src, dst, weight = src[keep], dst[keep], weight[keep]
        else:
            rows, cols = (scores.abs() >= min_weight).nonzero(as_tuple=True)
            src, dst, weight = cols, rows + start, scores[rows, cols]
        yield EdgeBlock(src.to(torch.int64), dst.to(torch.int64), weight.float())


def _rescored(enc: torch.Tensor, dec_t: torch.Tensor, rough: torch.Tensor, top_k: int | None, min_weight: float | None) -> torch.Tensor:
    """[b, n_src] scores: the candidates' float32 weights, -0.0 elsewhere (never selected over a candidate
    by |weight|, and below any min_weight > 0)."""
    rough = rough.float().abs()
    keep = torch.zeros_like(rough, dtype=torch.bool)
    if top_k is not None:
        keep.scatter_(1, rough.topk(min(2 * top_k, rough.shape[1]), dim=1).indices, True)
    if min_weight is not None:
        near = rough >= min_weight * (1 - 2**-6)  # bf16 keeps 8 significant bits
        keep = keep & near if top_k is not None else near
    rows, cols = keep.nonzero(as_tuple=True)
    scores = torch.full_like(rough, -0.0)
    scores[rows, cols] = (enc[rows] * dec_t.T[cols]).sum(-1)
    return scores
