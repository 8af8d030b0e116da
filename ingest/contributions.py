"""Each source node's contribution to the residual stream, by a forward pass of the local replacement model.

The attribution sweep (`ingest.attribution.Sweep`) runs the local replacement model backwards from targets; this
runs it forwards from sources. With every norm scale and attention pattern frozen at the prompt's values and each
MLP output replaced by its transcoders' writes plus a fixed error, the residual stream at every layer and position
is a sum over source nodes: active features (activation x decoder slice, into every layer a CLT writes), error nodes
(layer, position), token nodes (embedding plus position embedding) and one constant row, `bias` (the decoders'
`b_dec`, the attention biases `b_V`/`b_O`, the constant MLP outputs at a zeroed position 0). Each row is carried
through the frozen attention of every layer (its OV path, `P(x)/scale @ W_V`, pattern, `W_O`) and through the skip
paths, so row s of `F` at layer m is exactly s's share of `resid_pre[m]`, and the rows sum to it
(`tests/test_qk.py` holds the sum to the model's cached residual).

Used by QK attribution (`ingest.qk`: both sides of an attention score) and by the head-resolved attribution terms
(`ingest.head_terms`: which head carried a source's contribution).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from circuit_catalog.ingest.attribution import PromptTrace
from circuit_catalog.ingest.residual import centres, reads_normalised
from circuit_catalog.ingest.transcoder import TranscoderSet


@dataclass
class Sources:
    """Which source nodes are rows, in this order: features (indices into the trace's active features) | errors
    (layer, pos) | tokens (pos) | the bias row."""

    features: torch.Tensor  # [n_f] int64 indices into trace.active
    errors: torch.Tensor  # [n_e, 2] int64 (layer, pos)
    tokens: torch.Tensor  # [n_t] int64 positions

    @classmethod
    def all_before(cls, trace: PromptTrace, n_layers: int, layer: int) -> Sources:
        """Every source that writes before attention layer `layer` reads: features and errors of layers < layer, tokens."""
        n_pos = len(trace.tokens)
        device = trace.active.device
        features = (trace.active[:, 0] < layer).nonzero().flatten()
        lay, pos = torch.meshgrid(torch.arange(min(layer, n_layers), device=device), torch.arange(n_pos, device=device), indexing="ij")
        return cls(features, torch.stack([lay.flatten(), pos.flatten()], 1), torch.arange(n_pos, device=device))

    @property
    def n_rows(self) -> int:
        return len(self.features) + len(self.errors) + len(self.tokens) + 1

    @property
    def bias_row(self) -> int:
        return self.n_rows - 1

    def first_layers(self, trace: PromptTrace) -> torch.Tensor:
        """[n_rows]: the layer whose MLP output each row first writes into; -1 for tokens and the bias row, there from
        the start. A row is zero at `resid_pre[m]` unless its first layer is < m."""
        device = self.features.device
        return torch.cat([trace.active[self.features, 0], self.errors[:, 0],
                          torch.full((len(self.tokens) + 1,), -1, dtype=torch.long, device=device)])

    def labels(self, trace: PromptTrace) -> list[str]:
        """Local node ids as the prompt's graph names them (`L8/355@3`, `err:L8@3`, `tok@3`) and `bias`."""
        out = [f"L{lay}/{i}@{p}" for lay, p, i in trace.active[self.features].tolist()]
        out += [f"err:L{lay}@{p}" for lay, p in self.errors.tolist()]
        return out + [f"tok@{p}" for p in self.tokens.tolist()] + ["bias"]


class Forward:
    """The rows of `sources` carried up the frozen model: `F` [n_rows, n_pos, d] at each `resid_pre[m]`."""

    def __init__(self, model, tset: TranscoderSet, trace: PromptTrace, sources: Sources):
        self.model, self.tset, self.trace, self.sources = model, tset, trace, sources
        self.n_layers, self.n_pos = model.cfg.n_layers, len(trace.tokens)
        self.centre = centres(model)
        self.first = sources.first_layers(trace)
        self._values: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (layer, rows, values) for `run`'s own step

    def _centre(self, v: torch.Tensor) -> torch.Tensor:
        return v - v.mean(-1, keepdim=True) if self.centre else v

    def live(self, layer: int) -> torch.Tensor:
        """The rows that can be nonzero at `resid_pre[layer]` (the others have not written yet)."""
        return (self.first < layer).nonzero().flatten()

    def values(self, layer: int, F: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[len(rows), n_pos, n_heads, d_head]: what each row (default: all) puts into each head's values at attention
        `layer` (ln1 frozen: centring and the scale); the bias row also carries `b_V`. Computed once per key-value
        head (grouped-query attention shares W_V). Read-only: `run` reuses it for its step."""
        attn = self.model.blocks[layer].attn
        rows = torch.arange(len(F), device=F.device) if rows is None else rows
        x = self._centre(F[rows]) / self.trace.ln1_scale[layer][None, :, None]
        shared = hasattr(attn, "_W_V")
        W_V, b_V = (attn._W_V, attn._b_V) if shared else (attn.W_V, attn.b_V)
        v = torch.einsum("spd,gde->spge", x, W_V.detach().to(x.dtype))
        v[rows == self.sources.bias_row] += b_V.detach().to(x.dtype)
        if shared:
            v = v.repeat_interleave(attn.repeat_kv_heads, dim=2)
        self._values = (layer, rows, v)
        return v

    def _writes(self, layer: int, F: torch.Tensor) -> None:
        """Add what the sources write into `layer`'s MLP output (in place)."""
        t, s = self.trace, self.sources
        active = t.active[s.features]
        for tc, W in self.tset.writes_into(layer):
            rows = (active[:, 0] == tc.layer).nonzero().flatten()
            if len(rows):
                idx = s.features[rows]
                F[rows, t.active[idx, 1]] += t.activations[idx, None] * W[t.active[idx, 2]]
        err = (s.errors[:, 0] == layer).nonzero().flatten()
        if len(err):
            F[len(s.features) + err, s.errors[err, 1]] += t.errors[layer, s.errors[err, 1]]
        bias = s.bias_row
        if layer in self.tset.by_layer:
            F[bias] += self.tset[layer].b_dec
        if t.bos_mlp is not None:
            F[bias, 0] += t.bos_mlp[layer]

    def run(self, until: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (m, F at resid_pre[m]) for m = 0 .. until-1 (default every layer), then (n_layers, resid_post of the
        last layer) when run to the end. F is updated in place after each yield."""
        t, s = self.trace, self.sources
        until = self.n_layers if until is None else until
        F = torch.zeros(s.n_rows, self.n_pos, t.resid0.shape[-1], dtype=t.resid0.dtype, device=t.resid0.device)
        first_token = len(s.features) + len(s.errors)
        F[first_token + torch.arange(len(s.tokens), device=F.device), s.tokens] = t.resid0[s.tokens]
        for m in range(min(until, self.n_layers)):
            yield m, F
            attn = self.model.blocks[m].attn
            rows = self.live(m)
            cached = self._values
            reuse = cached is not None and cached[0] == m and torch.equal(cached[1], rows)
            values = cached[2] if reuse else self.values(m, F, rows)
            self._values = None
            z = torch.einsum("hqk,skhe->sqhe", t.patterns[m].to(F.dtype), values)
            F[rows] += torch.einsum("sqhe,hed->sqd", z, attn.W_O.detach().to(F.dtype))
            F[s.bias_row] += attn.b_O.detach()
            if m in self.tset.by_layer and self.tset[m].W_skip is not None:
                tc = self.tset[m]
                x = self._centre(F[rows]) / t.ln2_scale[m][None, :, None] if reads_normalised(tc) else F[rows]
                F[rows] += x @ tc.W_skip
            self._writes(m, F)
        if until >= self.n_layers:
            yield self.n_layers, F
