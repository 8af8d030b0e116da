"""One token's weights for any feature, on demand from the weights.

The catalog keeps each feature's top `--token-top-k` tokens only, so a token outside them (' Rome' for a feature whose
top 20 are other cities) has no edge in the store. These compute it with the formulas of `ingest.token_edges`: the
logit lens `W_dec[f] @ W_U[:, t]` through the final norm (a CLT feature's decoder slices summed), the raw
de-embedding `W_E[t] @ W_enc[:, f]` and the extended one through MLP0 and the reader's norm; a token's weight for one
feature with its rank among the whole vocabulary, and for a whole set the features a token reaches most (the ends
`paths` uses when the stored edges have none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from circuit_catalog.catalog.ids import feature_id, parse_feature_id
from circuit_catalog.ingest.attribution import target_token
from circuit_catalog.ingest.residual import as_read_by, normalise_as_read_by
from circuit_catalog.ingest.token_edges import extended_embedding, extended_embedding_for
from circuit_catalog.ingest.transcoder import TranscoderSet

from circuit_catalog.errors import UnknownFeature


@dataclass
class TokenWeights:
    """A token's weights for one feature, each with its rank among the vocabulary (1: the feature's strongest)."""

    feature: str
    token: str
    logit_lens: float
    logit_lens_rank: int
    deembed: float
    deembed_rank: int
    deembed_ext: float
    deembed_ext_rank: int


def _feature(tset: TranscoderSet, fid: str):
    layer, index = parse_feature_id(fid)
    if layer not in tset.by_layer or index >= tset[layer].cfg.d_sae:
        raise UnknownFeature(f"unknown feature {fid}: the transcoders have no such feature")
    return tset[layer], index


def word_token(model, text: str) -> tuple[str, int]:
    """(text, id) of the one token a typed word means: with the leading space most vocabularies put before words
    when that is one token, else as typed (one token, or a one-line error)."""
    ids = model.tokenizer.encode(" " + text, add_special_tokens=False) if not text.startswith(" ") else []
    t = int(ids[0]) if len(ids) == 1 else target_token(model, text)
    return model.tokenizer.decode([t]), t


def _rank(values: torch.Tensor, i: int) -> int:
    return int((values > values[i]).sum()) + 1


@torch.no_grad()
def token_weights(model, tset: TranscoderSet, fid: str, token: str) -> TokenWeights:
    """`token`'s logit-lens, raw and extended de-embedding weights for feature `fid` (one token, mind the space)."""
    tc, index = _feature(tset, fid)
    token, t = word_token(model, token)
    write = tset.total_write(tc.layer, model.cfg.n_layers)[index]
    logits = as_read_by(model, None, write.float()) @ model.W_U.float()
    w_enc = tc.W_enc[:, index].float()
    raw = model.W_E.float() @ w_enc
    ext = normalise_as_read_by(model, tc, extended_embedding_for(model, tc, extended_embedding(model))).float() @ w_enc
    return TokenWeights(fid, token, float(logits[t]), _rank(logits, t), float(raw[t]), _rank(raw, t), float(ext[t]), _rank(ext, t))


@torch.no_grad()
def token_ends(model, tset: TranscoderSet, token: str, k: int, end: str) -> list[dict]:
    """The `k` features per layer that `token`'s logit most depends on (`end="logit"`: logit lens) or that the token
    drives most (`end="token"`: extended de-embedding), as rows like the store's path ends (feature, layer, weight)."""
    token, t = word_token(model, token)
    rows = []
    ext = extended_embedding(model) if end == "token" else None
    for tc in tset:
        if end == "logit":
            scores = as_read_by(model, None, tset.total_write(tc.layer, model.cfg.n_layers).float()) @ model.W_U[:, t].float()
        else:
            e = normalise_as_read_by(model, tc, extended_embedding_for(model, tc, ext)[t : t + 1]).float()
            scores = (e @ tc.W_enc.float())[0]
        top = scores.topk(min(k, scores.numel()))
        rows += [{"feature": feature_id(tc.layer, int(i)), "layer": tc.layer, "token": token, "weight": float(v)}
                 for v, i in zip(top.values, top.indices)]
    return rows
