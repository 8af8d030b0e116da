"""Token -> feature (de-embedding) and feature -> token (logit lens) edges, top-K per feature.

- raw de-embedding: `W_E @ W_enc[:, f]` (seed 002);
- extended de-embedding: the token's "effective embedding" as the reading transcoder sees it, each
  token alone at its position with no attention and no position embedding: `W_E + MLP0(ln2(W_E))` for a
  transcoder after layer 0, the embedding alone for a layer-0 one (it reads before MLP0), then
  normalised as the reader's norm would;
- logit lens: `W_dec[f] @ W_U` through the final norm's (folded) weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from circuit_catalog.ingest.residual import as_read_by, normalise_as_read_by
from circuit_catalog.ingest.transcoder import Transcoder


@dataclass
class TopTokens:
    """For each feature of a layer, its K strongest tokens: [d_sae, K] tensors, strongest first."""

    token: torch.Tensor  # int64
    weight: torch.Tensor  # float32


@torch.no_grad()
def extended_embedding(model, chunk: int = 8192) -> torch.Tensor:
    """[d_vocab, d_model]: W_E + MLP0(ln2(W_E)), each token alone with no attention: what readers after
    layer 0 see (`extended_embedding_for`)."""
    W_E = model.W_E
    out = torch.empty_like(W_E)
    block0 = model.blocks[0]
    for start in range(0, W_E.shape[0], chunk):
        e = W_E[start : start + chunk].unsqueeze(1)  # [chunk, 1, d]: a batch of one-token sequences
        out[start : start + chunk] = (e + block0.mlp(block0.ln2(e))).squeeze(1)
    return out


def extended_embedding_for(model, reader: Transcoder, extended: torch.Tensor) -> torch.Tensor:
    """[d_vocab, d_model]: the extended embedding as `reader`'s input holds it, before its norm.

    `extended` is `extended_embedding(model)`, computed once for all readers. A transcoder at layer L reads
    the MLP input of block L, after MLPs 0..L-1: MLP0 is upstream of every reader except a layer-0 one,
    which sees the embedding alone. (MLPs 1..L-1 are left out by definition, as in seed 002.)
    """
    return extended if reader.layer > 0 else model.W_E


@torch.no_grad()
def top_tokens_into(
    model, tc: Transcoder, embedding: torch.Tensor, k: int, normalise: bool, block: int = 1024
) -> TopTokens:
    """The K tokens whose embedding rows most increase each feature's pre-activation."""
    rows = normalise_as_read_by(model, tc, embedding) if normalise else embedding
    rows_t = rows.T.contiguous()  # [d, vocab]
    return _top_per_feature(tc.W_enc.T, rows_t, k, block)


@torch.no_grad()
def top_logit_tokens(model, W_dec: torch.Tensor, k: int, block: int = 1024) -> TopTokens:
    """The K tokens whose logits each feature's decoder direction raises most.

    W_dec [d_sae, d_model]: what a feature writes into the residual stream in all (`TranscoderSet.total_write`
    up to the last layer: for a CLT, the sum of its decoder slices)."""
    return _top_per_feature(as_read_by(model, None, W_dec), model.W_U, k, block)


def _top_per_feature(left: torch.Tensor, right: torch.Tensor, k: int, block: int) -> TopTokens:
    """Row-wise top-K of `left @ right` ([n_features, vocab]), computed `block` features at a time."""
    k = min(k, right.shape[1])
    tops = [(left[start : start + block] @ right.to(left.dtype)).topk(k, dim=1) for start in range(0, left.shape[0], block)]
    # bound for Parquet, whatever computed them: float32 on the CPU
    return TopTokens(torch.cat([t.indices for t in tops]).cpu(), torch.cat([t.values for t in tops]).float().cpu())
