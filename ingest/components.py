"""Component tallies (seed 002's last stage): what each model component writes into a feature's pre-activation.

With the reading norm's scale frozen at its value on the example, a transcoder's pre-activation is linear in the
residual stream it reads, and that residual stream is a sum of component outputs:

    resid_mid[L] = resid_pre[0] + sum_{m <= L} (sum_h head_{m,h} + b_O[m]) + sum_{m < L} mlp_out[m]

so the pre-activation of feature f (layer L) at a token is exactly

    embed . u + sum_{m, h} head_{m,h} . u + sum_m mlp_out[m] . u + bias,   u = centre(W_enc[:, f]) / scale,

the bias holding `b_enc[f]` and the attention output biases (`b_V` is folded into `b_O`). `embed` is the token plus
position embedding, `head_{m,h}` the head's output (`z @ W_O`), `mlp_out[m]` the real MLP's output: direct effects
only, through the frozen norm. Averaged over the feature's top activating examples (from the statistics), the terms
sum to the mean pre-activation; `tests/test_components.py` holds them to TransformerLens's own residual
decomposition (`ActivationCache.decompose_resid` with `apply_ln_to_stack`).

Kept per feature: the `keep` largest terms by magnitude, the bias, and one `rest` row with the remainder, so every
feature's rows sum exactly to its mean pre-activation whatever is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from circuit_catalog.ingest.residual import centres, reads_normalised
from circuit_catalog.ingest.transcoder import TranscoderSet
from circuit_catalog.progress import tqdm

KEEP = 12  # component terms kept per feature besides the bias and the remainder
EXAMPLES = 5  # top activating examples each feature's tally averages over


def supported(model, tset: TranscoderSet) -> str | None:
    """Why tallies cannot be computed for this model and transcoder set (None: they can). The decomposition is the
    attribution sweep's: pre-norm blocks with folded norms, transcoders reading the MLP's input."""
    from circuit_catalog.ingest.attribution import check_supported

    from circuit_catalog.errors import UserError

    try:
        check_supported(model, tset)
    except UserError as e:
        return str(e)
    return None


@dataclass
class Layout:
    """The components a reader at layer `L` sees, as rows of one per-position matrix: `embed` | the heads of
    attention layers 0..n_attn-1 (layer-major) | the MLPs 0..n_attn-2. A reader of layer L uses the heads of
    layers <= L and the MLPs of layers < L (`mask`)."""

    n_heads: int
    n_attn: int  # attention layers carried (the highest reader's layer + 1)

    @property
    def n_rows(self) -> int:
        return 1 + self.n_attn * self.n_heads + self.n_attn - 1

    def mask(self, layer: int, device: torch.device) -> torch.Tensor:
        """[n_rows] bool: the components before the MLP input of `layer` (attention `layer` included)."""
        keep = torch.zeros(self.n_rows, dtype=torch.bool, device=device)
        keep[: 1 + (layer + 1) * self.n_heads] = True
        mlp0 = 1 + self.n_attn * self.n_heads
        keep[mlp0 : mlp0 + layer] = True
        return keep

    def names(self) -> tuple[list[str], list[int | None], list[int | None]]:
        """(kind, layer, head) of every row."""
        kinds, layers, heads = ["embed"], [None], [None]
        for m in range(self.n_attn):
            kinds += ["head"] * self.n_heads
            layers += [m] * self.n_heads
            heads += list(range(self.n_heads))
        kinds += ["mlp"] * (self.n_attn - 1)
        layers += list(range(self.n_attn - 1))
        heads += [None] * (self.n_attn - 1)
        return kinds, layers, heads

    def components(self, cache, W_O: torch.Tensor, ctx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """[n, n_rows, d] float32: every component's output at the positions (batch context, position)."""
        comps = [cache["blocks.0.hook_resid_pre"][ctx, pos][:, None]]
        comps += [torch.einsum("nhe,hed->nhd", cache[f"blocks.{m}.attn.hook_z"][ctx, pos].to(W_O.dtype), W_O[m]) for m in range(self.n_attn)]
        comps += [cache[f"blocks.{m}.hook_mlp_out"][ctx, pos][:, None] for m in range(self.n_attn - 1)]
        return torch.cat(comps, 1).float()


@dataclass
class Tally:
    """One layer's sums over examples: `terms[f, row]` (rows of `Layout`), `bias[f]`, `count[f]` examples."""

    terms: torch.Tensor  # [d_sae, n_rows] float64
    bias: torch.Tensor  # [d_sae] float64
    count: torch.Tensor  # [d_sae] int64


def _pairs(top_index: torch.Tensor, n_examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature, flat token index) of each feature's first `n_examples` top examples (unused slots are -1)."""
    top = top_index[:, :n_examples]
    feature, rank = (top >= 0).nonzero(as_tuple=True)
    return feature, top[feature, rank]


@torch.no_grad()
def collect_components(model, tset: TranscoderSet, tokens: torch.Tensor, top_index: dict[int, torch.Tensor],
                       n_examples: int = EXAMPLES, batch_contexts: int = 4, progress: bool = True) -> dict[int, Tally]:
    """Every feature's component terms summed over its top examples (`top_index[layer]` [d_sae, k] flat indices into
    `tokens` [n_contexts, ctx_len], as the statistics keep them). One forward pass per batch of contexts that hold
    examples; each example's terms are the components at its position dotted with its reading vector, grouped by
    position so each position's component matrix is built and read once for the examples of every layer."""
    device = model.W_E.device
    n_contexts, ctx_len = tokens.shape
    lay = Layout(model.cfg.n_heads, max(tset.layers) + 1)
    pairs = {tc.layer: _pairs(top_index[tc.layer], n_examples) for tc in tset}
    host = next(iter(top_index.values())).device  # tallies stay with the statistics they come from
    tallies = {tc.layer: Tally(torch.zeros(tc.cfg.d_sae, lay.n_rows, dtype=torch.float64, device=host),
                               torch.zeros(tc.cfg.d_sae, dtype=torch.float64, device=host),
                               torch.bincount(pairs[tc.layer][0], minlength=tc.cfg.d_sae)) for tc in tset}
    masks = {tc.layer: lay.mask(tc.layer, device) for tc in tset}
    used = torch.unique(torch.cat([flat // ctx_len for _, flat in pairs.values()]))
    names = {"blocks.0.hook_resid_pre", *(f"blocks.{m}.attn.hook_z" for m in range(lay.n_attn)),
             *(f"blocks.{m}.hook_mlp_out" for m in range(lay.n_attn - 1)),
             *(f"blocks.{tc.layer}.ln2.hook_scale" for tc in tset if reads_normalised(tc))}
    W_O, b_O = model.W_O.detach()[: lay.n_attn], model.b_O.detach()[: lay.n_attn].float()
    bar = tqdm(total=len(used), desc="component tallies", unit="ctx", disable=not progress)
    for start in range(0, len(used), batch_contexts):
        contexts = used[start : start + batch_contexts]
        _, cache = model.run_with_cache(tokens[contexts].to(device), names_filter=lambda n: n in names, stop_at_layer=lay.n_attn)
        slot = torch.full((n_contexts,), -1, dtype=torch.int64, device=host)
        slot[contexts] = torch.arange(len(contexts), device=host)
        batch = []  # per reader layer: (transcoder, features, context slots, positions) of its examples in the batch
        for tc in tset:
            feature, flat = pairs[tc.layer]
            inside = slot[flat // ctx_len] >= 0
            if inside.any():
                batch.append((tc, feature[inside], slot[flat[inside] // ctx_len].to(device), (flat[inside] % ctx_len).to(device)))
        readers = torch.cat([_readers(model, tc, cache, f, c, p) for tc, f, c, p in batch])  # [n_examples, d]
        positions, where = torch.unique(torch.cat([torch.stack([c, p], 1) for _, _, c, p in batch]), dim=0, return_inverse=True)
        terms = _terms_by_position(lay.components(cache, W_O, positions[:, 0], positions[:, 1]), readers, where)
        offset = 0
        for tc, feature, _, _ in batch:
            rows = slice(offset, offset + len(feature))
            offset += len(feature)
            mask = masks[tc.layer]
            tally = tallies[tc.layer]
            tally.terms.index_add_(0, feature, (terms[rows] * mask).double().to(host))
            bias = tc.b_enc.detach()[feature.to(device)].float() + readers[rows] @ b_O[: tc.layer + 1].sum(0)
            tally.bias.index_add_(0, feature, bias.double().to(host))
        bar.update(len(contexts))
    bar.close()
    return tallies


def _readers(model, tc, cache, feature: torch.Tensor, ctx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[n, d] each example's reading vector u = centre(W_enc[:, f]) / scale (no centring for RMSNorm, neither for a
    reader of the raw residual stream), so that a component's term is its output . u."""
    u = tc.W_enc.detach()[:, feature.to(tc.W_enc.device)].T.float()
    if reads_normalised(tc) and centres(model):
        u = u - u.mean(-1, keepdim=True)
    if reads_normalised(tc):
        u = u / cache[f"blocks.{tc.layer}.ln2.hook_scale"][ctx, pos].float()
    return u


def _terms_by_position(C: torch.Tensor, readers: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """[n_examples, n_rows]: `C[where[i]] @ readers[i]`, one matmul per position for all its examples."""
    terms = torch.empty(len(readers), C.shape[1], device=C.device)
    order = torch.argsort(where)
    bounds = torch.searchsorted(where[order], torch.arange(len(C) + 1, device=where.device)).tolist()
    for i in range(len(C)):
        rows = order[bounds[i] : bounds[i + 1]]
        terms[rows] = readers[rows] @ C[i].T
    return terms


def components_table(tset: TranscoderSet, tallies: dict[int, Tally], n_heads: int, keep: int = KEEP):
    """`stats/components.parquet` (`layout.COMPONENT_SCHEMA`): for each feature with examples, its `keep` largest
    mean terms by magnitude, then `bias` and `rest` (the remainder); a feature's rows sum to its mean pre-activation."""
    import pyarrow as pa
    from circuit_catalog.catalog.ids import feature_ids, head_id
    from circuit_catalog.catalog.layout import COMPONENT_SCHEMA

    lay = Layout(n_heads, max(tset.layers) + 1)
    all_kinds, all_layers, all_heads = lay.names()
    tables = [COMPONENT_SCHEMA.empty_table()]
    for tc in tset:
        t = tallies[tc.layer]
        seen = lay.mask(tc.layer, t.terms.device).nonzero().flatten().tolist()  # the components this layer's features read
        kinds, layers, heads = ([column[i] for i in seen] for column in (all_kinds, all_layers, all_heads))
        labels = ["embed" if k == "embed" else head_id(m, h) if k == "head" else f"MLP{m}" for k, m, h in zip(kinds, layers, heads)]
        has = (t.count > 0).nonzero().flatten()
        mean = (t.terms[has][:, seen] / t.count[has, None]).numpy()
        bias = (t.bias[has] / t.count[has]).numpy()
        top = np.argsort(-np.abs(mean), axis=1, kind="stable")[:, : min(keep, mean.shape[1])]
        kept = np.take_along_axis(mean, top, 1)
        values = np.concatenate([kept, bias[:, None], (mean.sum(1) - kept.sum(1))[:, None]], 1)
        rows = [[*(top_row.tolist()), "bias", "rest"] for top_row in top]  # component row numbers, then the two extras
        per = values.shape[1]

        def pick(table: list, extra: tuple) -> list:
            return [table[r] if isinstance(r, int) else extra[r == "rest"] for row in rows for r in row]

        tables.append(pa.table({
            "feature": feature_ids(tc.layer, pa.array(np.repeat(has.numpy(), per))),
            "component": pick(labels, ("bias", "rest")), "kind": pick(kinds, ("bias", "rest")),
            "layer": pick(layers, (None, None)), "head": pick(heads, (None, None)),
            "contribution": values.reshape(-1).astype(np.float32), "examples": np.repeat(t.count[has].numpy(), per).astype(np.int32),
        }, schema=COMPONENT_SCHEMA))
    return pa.concat_tables(tables)
