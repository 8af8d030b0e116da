"""Attention heads, input-independent: OV pullbacks per head (seed 000's head nodes, seed 002's stage 3).

For a later feature f (transcoder layer L), an attention head h of layer m <= L and an earlier source feature i
(transcoder layer l < m), the OV pullback is the virtual weight

    w[i, f, h] = P1(W_dec^(l->m)[i]) @ W_V^h @ W_O^h @ P2(W_enc^(L)[:, f])

- `W_dec^(l->m)` is what one unit of i writes into the residual stream before attention layer m reads it: its
  decoder row, or for a cross-layer transcoder the sum of its slices into layers l .. m-1
  (`TranscoderSet.total_write`), as the pullbacks take it;
- P1 is ln1's centring (LayerNorm models; nothing for RMSNorm), P2 ln2's centring where f's transcoder reads the
  normalised MLP input: the norms' input-independent parts, applied as `ingest.residual` applies them;
- the norms' scales (ln1's at the source position, ln2's at the target's) are left out, as in the pullbacks, and
  so is the attention pattern: w is the change in f's pre-activation per unit of i when head h attends with weight
  1 from f's position to i's, every other path cut (other heads, other attention layers, the MLPs and skip paths
  of the layers in between, the direct residual path). `tests/test_heads.py` holds every stored weight to autograd
  through a real forward pass with exactly those freezes.

Computed in factored form: `A = P1(W_dec) @ W_V^h` is [d_sae, d_head] and `B = W_O^h @ P2(W_enc)` is
[d_head, d_sae], so a head's whole weight matrix is one product with inner dimension d_head, the sources of every
layer l < m stacked so that each (target feature, head) keeps its top-k over all of them. Grouped-query attention
shares W_V between the query heads of a group: A is computed once per key-value head.

Token sources (seed 002's de-embedding through a head): `P1(W_E[t]) @ W_V^h @ W_O^h @ P2(W_enc^(L)[:, f])`, the
token's embedding row read directly by attention layer m (position embedding, MLPs and earlier attention left
out), top-k per (target feature, head).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch
from circuit_catalog.catalog import ids, layout
from circuit_catalog.catalog.ids import feature_ids
from circuit_catalog.ingest.models import require_pre_norm_blocks
from circuit_catalog.ingest.pullbacks import select_edges
from circuit_catalog.ingest.residual import as_read_by, centres
from circuit_catalog.ingest.transcoder import TranscoderSet


DEFINITION = ("w[i, f, h] = P1(W_dec^(l->m)[i]) . W_V^h W_O^h . P2(W_enc^(L)[:, f]): the change in f's pre-activation "
              "per unit of i when head h (layer m) attends with weight 1 from f's position to i's and every other path is "
              "cut; P1/P2 the ln1/ln2 centring (LayerNorm only), norm scales and the pattern left out")


def check_attention(model) -> None:
    """The OV algebra assumes pre-norm blocks whose attention reads ln1's output of the residual stream."""
    require_pre_norm_blocks(model, "head circuits")


def n_kv_heads(attn) -> int:
    return attn._W_V.shape[0] if hasattr(attn, "_W_V") else attn.W_V.shape[0]


def kv_of(attn, head: int) -> int:
    """The key-value head a query head reads its values (and keys) from."""
    return head // (attn.W_V.shape[0] // n_kv_heads(attn))


def value_weights(attn) -> torch.Tensor:
    """[n_kv_heads, d_model, d_head]: W_V once per key-value head (GQA stores them once)."""
    return (attn._W_V if hasattr(attn, "_W_V") else attn.W_V).detach()


def head_table(model) -> pa.Table:
    """The Head nodes: one row per attention head of the model."""
    rows = [(ids.head_id(m, h), m, h, kv_of(block.attn, h))
            for m, block in enumerate(model.blocks) for h in range(model.cfg.n_heads)]
    return pa.table([pa.array(c) for c in zip(*rows)], schema=layout.HEAD_SCHEMA)


def _ln1_centre(model, vectors: torch.Tensor) -> torch.Tensor:
    """What ln1 does to residual vectors up to its scale: centring for LayerNorm, nothing for RMSNorm."""
    return vectors - vectors.mean(-1, keepdim=True) if centres(model) else vectors


def read_through_heads(model, tset: TranscoderSet, attn_layer: int, dst_layer: int) -> torch.Tensor:
    """[n_heads, d_head, d_sae]: B_h = W_O^h @ P2(W_enc^(L)), each target feature's reading vector pulled back
    through each head's output weights."""
    W_enc = as_read_by(model, tset[dst_layer], tset[dst_layer].W_enc.T).T  # [d, d_sae], centred along d for LN
    W_O = model.blocks[attn_layer].attn.W_O.detach()  # [h, e, d]
    return W_O.to(W_enc.dtype) @ W_enc


def write_into_heads(model, tset: TranscoderSet, attn_layer: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """([n_kv, n_src, d_head], [(layer, n)...]): A = P1(W_dec^(l->m)) @ W_V per key-value head for every transcoder
    layer l < m, stacked in layer order, and each stacked block's layer and width."""
    W_V = value_weights(model.blocks[attn_layer].attn)  # [kv, d, e]
    blocks, spans = [], []
    for lo in tset.layers:
        if lo >= attn_layer:
            break
        W = _ln1_centre(model, tset.total_write(lo, attn_layer))  # [d_sae, d]
        blocks.append(W.to(W_V.dtype) @ W_V)  # [kv, d_sae, e]
        spans.append((lo, W.shape[0]))
    if not blocks:
        return torch.zeros(W_V.shape[0], 0, W_V.shape[2], dtype=W_V.dtype, device=W_V.device), []
    return torch.cat(blocks, dim=1), spans


@dataclass
class HeadEdges:
    """Selected OV edges of one (attention layer, target layer) pair: parallel 1-D tensors."""

    src: torch.Tensor  # int64 row of the stacked sources (features of every layer < m, or token ids)
    dst: torch.Tensor  # int64 target feature index
    head: torch.Tensor  # int64 query head of the attention layer
    weight: torch.Tensor  # float32


def _select(A: torch.Tensor, B: torch.Tensor, attn, top_k: int | None, min_weight: float | None) -> HeadEdges:
    """Each head's edges: A [kv, n_src, e] (per key-value head), B [h, e, n_dst]."""
    parts = []
    for h in range(B.shape[0]):
        for block in select_edges(A[kv_of(attn, h)], B[h], top_k, min_weight):
            parts.append(HeadEdges(block.src, block.dst, torch.full_like(block.src, h), block.weight))
    if not parts:
        empty = torch.zeros(0, dtype=torch.int64, device=A.device).cpu()  # on the CPU, as the edges below
        return HeadEdges(empty, empty, empty, torch.zeros(0, device=A.device).cpu())
    return HeadEdges(*(torch.cat([getattr(p, name) for p in parts]).cpu() for name in ("src", "dst", "head", "weight")))


def _head_ids(attn_layer: int, head: torch.Tensor, n_heads: int) -> pa.Array:
    names = pa.array([ids.head_id(attn_layer, h) for h in range(n_heads)])
    return names.take(pa.array(head.numpy()))


@torch.no_grad()
def ov_table(model, tset: TranscoderSet, attn_layer: int, dst_layer: int, top_k: int | None,
             min_weight: float | None = None) -> pa.Table:
    """The kept OV edges from every feature of the layers < `attn_layer` through each head of `attn_layer` into
    the features of `dst_layer`: top-k per (target feature, head) over all those sources together."""
    check_attention(model)
    A, spans = write_into_heads(model, tset, attn_layer)
    if not spans:
        return layout.OV_SCHEMA.empty_table()
    attn = model.blocks[attn_layer].attn
    edges = _select(A, read_through_heads(model, tset, attn_layer, dst_layer), attn, top_k, min_weight)
    src_ids = pa.concat_arrays([feature_ids(lo, pa.array(range(n), pa.int64())) for lo, n in spans])
    return pa.table([src_ids.take(pa.array(edges.src.numpy())), feature_ids(dst_layer, pa.array(edges.dst.numpy())),
                     pa.array(edges.weight.numpy(), pa.float32()), _head_ids(attn_layer, edges.head, model.cfg.n_heads)],
                    schema=layout.OV_SCHEMA)


@torch.no_grad()
def ov_token_table(model, tset: TranscoderSet, attn_layer: int, dst_layer: int, top_k: int) -> pa.Table:
    """Token sources: the top-k tokens per (target feature, head) by P1(W_E[t]) @ W_V^h @ W_O^h @ P2(W_enc[:, f])."""
    check_attention(model)
    attn = model.blocks[attn_layer].attn
    W_V = value_weights(attn)
    E = _ln1_centre(model, model.W_E.detach()).to(W_V.dtype) @ W_V  # [kv, vocab, e]
    edges = _select(E, read_through_heads(model, tset, attn_layer, dst_layer), attn, top_k, None)
    return pa.table([pa.array(edges.src.numpy(), pa.int64()), feature_ids(dst_layer, pa.array(edges.dst.numpy())),
                     pa.array(edges.weight.numpy(), pa.float32()), _head_ids(attn_layer, edges.head, model.cfg.n_heads)],
                    schema=layout.OV_TOKEN_SCHEMA)


def head_pairs(model, tset: TranscoderSet) -> list[tuple[int, int]]:
    """(attention layer m, target transcoder layer L) with m <= L: the OV parts of a catalog."""
    return [(m, L) for L in tset.layers for m in range(min(L, model.cfg.n_layers - 1) + 1)]
