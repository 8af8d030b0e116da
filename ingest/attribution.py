"""Per-prompt attribution graphs of the local replacement model (README, "Attribution graphs").

The local replacement model freezes every norm scale and attention pattern at their values on the
prompt and replaces each MLP output by its transcoder's reconstruction plus a fixed error term (the
whole MLP output is the error term where a layer has no transcoder). The forward pass is unchanged and
the model is linear in its node activations, so the direct effect of a source on a target is the dot
product of what the source writes into the residual stream with the target's gradient there.

Gradients are not taken with autograd through the model. Under the freezes one layer's backward pass
is the attention's frozen OV path, the norms' centring and the skip path: a few small matrix products.
A batch of targets (each row its own target) is swept down the residual stream once, and every edge
is read off as the sweep passes the layer its source writes at. The tests hold the result to
TransformerLens forward passes with the freezes applied as hooks, and to the unmodified model.

Node order, as circuit-tracer's `Graph`: selected features | errors (layer-major) | tokens | logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from circuit_catalog.ingest.models import require_pre_norm_blocks
from circuit_catalog.ingest.pruning import partial_influence
from circuit_catalog.ingest.residual import centres, reads_normalised
from circuit_catalog.ingest.transcoder import TranscoderSet
from circuit_catalog.progress import tqdm

from circuit_catalog.errors import AttributionError, TranscoderError

if TYPE_CHECKING:  # circuit_catalog.ingest.targets imports this module for target_token
    from circuit_catalog.ingest.targets import CustomTarget


@dataclass
class AttributionGraph:
    """One prompt's graph: a fixed node order and one adjacency matrix every later step reads.

    `adjacency[t, s]` is the direct effect of source s on target t (a feature's pre-activation, or a
    logit); only feature and logit rows are non-zero. For every target,
    `adjacency[t].sum() + bias[t] + dropped[t] == value[t]`: `bias` gathers the constant terms
    (encoder/unembedding bias, decoder and attention output biases on every path), `dropped` the
    effect of active features left out by `max_feature_nodes`.
    """

    prompt: str
    tokens: torch.Tensor  # [n_pos] token ids the model saw, BOS included
    n_layers: int
    features: torch.Tensor  # [n_feat, 3] (layer, pos, index) of the feature nodes
    activations: torch.Tensor  # [n_feat]
    logit_targets: torch.Tensor  # [n_logits] token ids (a custom target, if any, comes after them and has no token)
    logit_probabilities: torch.Tensor  # [n_logits (+1)]: the pruning weights of the logits and the custom target
    adjacency: torch.Tensor  # [n_nodes, n_nodes], rows = targets, columns = sources
    value: torch.Tensor  # [n_nodes] target pre-activation / logit in the unmodified model (NaN for sources)
    bias: torch.Tensor  # [n_nodes]
    dropped: torch.Tensor  # [n_nodes]
    n_active_features: int  # before the cap
    settings: dict = field(default_factory=dict)
    custom_target: str | None = None  # the name of the custom target, the last node, if there is one
    # the forward pass the graph was computed from, so exact decompositions of its edges (`ingest.head_terms`) need
    # no second pass; not part of the graph's value
    trace: PromptTrace | None = field(default=None, repr=False, compare=False)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.adjacency.shape[0]

    def error_index(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.n_features + self.n_errors + pos

    def logit_index(self, i: int) -> int:
        return self.n_features + self.n_errors + self.n_pos + i

    @property
    def capped(self) -> bool:
        return self.n_features < self.n_active_features


@dataclass
class PromptTrace:
    """What the sweep needs from one real forward pass of the model on the prompt."""

    tokens: torch.Tensor  # [n_pos]
    resid0: torch.Tensor  # [n_pos, d] embedding (+ position embedding): the token nodes' vectors
    ln1_scale: torch.Tensor  # [n_layers, n_pos]
    ln2_scale: torch.Tensor  # [n_layers, n_pos]
    final_scale: torch.Tensor  # [n_pos]
    patterns: list[torch.Tensor]  # per layer [n_heads, n_pos(q), n_pos(k)]
    errors: torch.Tensor  # [n_layers, n_pos, d] MLP output minus reconstruction (whole output without a transcoder)
    active: torch.Tensor  # [n_active, 3] (layer, pos, index), sorted
    activations: torch.Tensor  # [n_active]
    pre_acts: torch.Tensor  # [n_active] encoder pre-activations
    logits: torch.Tensor  # [d_vocab] at the last position
    bos_mlp: torch.Tensor | None = None  # [n_layers, d] constant MLP output at a zeroed position 0
    final_normalised: torch.Tensor | None = None  # [d] the unembedding's input at the last position (custom targets read it)


def check_supported(model, tset: TranscoderSet) -> None:
    """The sweep's algebra assumes pre-norm blocks with folded norms and MLP-replacing transcoders."""
    tset.require_bound()
    require_pre_norm_blocks(model, "attribution")
    for tc in tset:
        layer = tc.layer
        if tc.cfg.hook_out != f"blocks.{layer}.hook_mlp_out":
            raise TranscoderError(f"{tc.source or layer}: attribution needs transcoders writing blocks.{layer}.hook_mlp_out")
        if tc.cfg.hook_in not in (f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_resid_mid"):
            raise TranscoderError(f"{tc.source or layer}: attribution needs transcoders reading ln2.hook_normalized or hook_resid_mid")


@torch.no_grad()
def trace_prompt(model, tset: TranscoderSet, tokens: torch.Tensor, zero_bos: bool = True) -> PromptTrace:
    """One forward pass with the cache the sweep needs; feature activations from each layer's real input.

    The pass runs in the model's dtype; what it hands the sweep is float32 (the sweep's dtype, see `Sweep`).

    With `zero_bos`, position 0 gets no feature nodes, whatever its token (as circuit-tracer: it is the
    BOS or other special token `prompt_tokens` puts there, whose activations are attention-sink outliers
    the transcoders were not trained on). Under causal attention that position sees only itself, so
    everything computed there depends on its token alone: its MLP outputs join the constant terms
    (`bos_mlp`, counted in each target's bias) and its error nodes are zero, so nothing is lost and no
    error node stands for a constant.
    """
    n_layers = model.cfg.n_layers
    names = {"blocks.0.hook_resid_pre", "ln_final.hook_scale", "ln_final.hook_normalized"}
    for layer in range(n_layers):
        names |= {f"blocks.{layer}.ln1.hook_scale", f"blocks.{layer}.ln2.hook_scale",
                  f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.hook_mlp_out"}
    names |= {tc.cfg.hook_in for tc in tset}
    logits, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n in names)
    errors = torch.stack([cache[f"blocks.{layer}.hook_mlp_out"][0] for layer in range(n_layers)])
    active, activations, pre_acts, xs, zs = [], [], [], {}, {}
    for tc in tset:
        x = cache[tc.cfg.hook_in][0]
        pre = tc.pre_acts(x)
        z = tc.activate(pre)
        if zero_bos:
            z[0] = 0
        xs[tc.layer], zs[tc.layer] = x, z
        pos, index = z.nonzero(as_tuple=True)
        active.append(torch.stack([torch.full_like(pos, tc.layer), pos, index], 1))
        activations.append(z[pos, index])
        pre_acts.append(pre[pos, index])
    for layer, recon in tset.reconstruct(zs, xs).items():  # with a CLT, earlier layers' features write here too
        errors[layer] -= recon
    bos_mlp = None
    if zero_bos:
        bos_mlp = errors[:, 0].clone()
        errors[:, 0] = 0
    return PromptTrace(
        tokens=tokens,
        bos_mlp=None if bos_mlp is None else bos_mlp.float(),
        resid0=cache["blocks.0.hook_resid_pre"][0].float(),
        ln1_scale=torch.stack([cache[f"blocks.{layer}.ln1.hook_scale"][0, :, 0] for layer in range(n_layers)]).float(),
        ln2_scale=torch.stack([cache[f"blocks.{layer}.ln2.hook_scale"][0, :, 0] for layer in range(n_layers)]).float(),
        final_scale=cache["ln_final.hook_scale"][0, :, 0].float(),
        patterns=[cache[f"blocks.{layer}.attn.hook_pattern"][0].float() for layer in range(n_layers)],
        errors=errors.float(),
        active=torch.cat(active) if active else torch.zeros(0, 3, dtype=torch.long, device=tokens.device),
        activations=torch.cat(activations).float() if activations else torch.zeros(0, device=tokens.device),
        pre_acts=torch.cat(pre_acts).float() if pre_acts else torch.zeros(0, device=tokens.device),
        logits=logits[0, -1].float(),
        final_normalised=cache["ln_final.hook_normalized"][0, -1].float(),
    )


@dataclass
class Targets:
    """A batch of targets: where each one's gradient enters and with what vector."""

    layer: torch.Tensor  # [B] transcoder layer (reads resid_mid of that layer), or n_layers for a logit
    pos: torch.Tensor  # [B]
    vector: torch.Tensor  # [B, d] encoder column or unembedding column
    own_bias: torch.Tensor  # [B] b_enc or b_U


class Sweep:
    """The transposed pass of the local replacement model: target gradients in, edge rows out.

    Columns of a row: every active feature | errors (layer-major) | tokens. In float32 whatever the model's
    dtype, on its device: the weights it reads are cast once here (attention's OV path, the active features'
    decoder rows, biases and skip paths), so a graph's edges are float32 sums even of a bfloat16 forward pass.
    """

    def __init__(self, model, tset: TranscoderSet, trace: PromptTrace):
        self.model, self.tset, self.trace = model, tset, trace
        self.n_layers, self.n_pos = model.cfg.n_layers, len(trace.tokens)
        self.centre = centres(model)
        self.n_active = len(trace.active)
        self.n_cols = self.n_active + self.n_layers * self.n_pos + self.n_pos
        # per layer written into: the positions of the active features writing there (of that layer, and of
        # earlier layers with a CLT), their decoder slices scaled by activation, and their column offsets
        self.writes: dict[int, list[tuple[int, torch.Tensor, slice]]] = {}
        layers, pos = trace.active[:, 0], trace.active[:, 1]
        for layer in range(self.n_layers):
            per_pos = []
            for tc, W in tset.writes_into(layer):
                for p in range(self.n_pos):
                    idx = ((layers == tc.layer) & (pos == p)).nonzero().flatten()
                    if len(idx):  # active rows are sorted by (layer, pos, index): contiguous
                        cols = slice(int(idx[0]), int(idx[-1]) + 1)
                        per_pos.append((p, trace.activations[cols, None] * W[trace.active[cols, 2]].float(), cols))
            self.writes[layer] = per_pos
        self.b_dec = {tc.layer: tc.b_dec.float() for tc in tset}
        self.skip_back = {tc.layer: tc.W_skip.T.float() for tc in tset if tc.W_skip is not None}  # [d_out, d_in]
        self.attn_bias, self.attn_out, self.attn_in = [], [], []
        for block in model.blocks:
            attn = block.attn
            W_O, W_V = attn.W_O.detach().float(), attn.W_V.detach().float()  # [h, e, d], [h, d, e] (GQA heads expanded)
            # b_V passes the frozen pattern unchanged (rows sum to 1), so it is a constant like b_O
            self.attn_bias.append(attn.b_O.detach().float() + torch.einsum("he,hed->d", attn.b_V.detach().float(), W_O))
            self.attn_out.append(W_O.reshape(-1, W_O.shape[-1]).T.contiguous())  # [d, h*e]
            self.attn_in.append(W_V.transpose(1, 2).reshape(-1, W_V.shape[1]).contiguous())  # [h*e, d]

    def _centre(self, v: torch.Tensor) -> torch.Tensor:
        return v - v.mean(-1, keepdim=True) if self.centre else v

    def _through_ln2(self, layer: int, g: torch.Tensor) -> torch.Tensor:
        """Gradient at a transcoder's input -> gradient at resid_mid (frozen scale, linear centring)."""
        if not reads_normalised(self.tset[layer]):
            return g
        return self._centre(g) / self.trace.ln2_scale[layer][None, :, None]

    def _through_attention(self, layer: int, g: torch.Tensor) -> torch.Tensor:
        """Gradient at resid_mid -> its part at resid_pre through the frozen-pattern OV path (as matmuls)."""
        B, n_pos, d = g.shape
        pattern = self.trace.patterns[layer]  # [h, q, k]
        n_heads = pattern.shape[0]
        u = (g.reshape(B * n_pos, d) @ self.attn_out[layer]).reshape(B, n_pos, n_heads, -1).permute(2, 0, 1, 3)  # [h, B, q, e]
        v = pattern.transpose(1, 2)[:, None] @ u  # [h, B, k, e]
        back = v.permute(1, 2, 0, 3).reshape(B * n_pos, -1) @ self.attn_in[layer]
        return self._centre(back.reshape(B, n_pos, d)) / self.trace.ln1_scale[layer][None, :, None]

    @torch.no_grad()
    def rows(self, targets: Targets) -> tuple[torch.Tensor, torch.Tensor]:
        """Edge rows [B, n_cols] and constant terms [B] for a batch of float32 targets."""
        t = self.trace
        B, d = targets.vector.shape
        rows = targets.vector.new_zeros(B, self.n_cols)
        bias = targets.own_bias.clone()
        g = targets.vector.new_zeros(B, self.n_pos, d)
        batch = torch.arange(B, device=g.device)
        logit = targets.layer == self.n_layers
        if logit.any():
            g[batch[logit], targets.pos[logit]] += self._centre(targets.vector[logit]) / t.final_scale[targets.pos[logit], None]
        err0 = self.n_active
        for layer in range(min(int(targets.layer.max()), self.n_layers - 1), -1, -1):
            # g: gradient at resid_post[layer]; sources writing here are this layer's features and error
            for p, vectors, cols in self.writes.get(layer, []):
                rows[:, cols] += g[:, p] @ vectors.T  # a CLT feature writes into several layers: its edge sums them
            rows[:, err0 + layer * self.n_pos: err0 + (layer + 1) * self.n_pos] = (g * t.errors[layer]).sum(-1)
            if t.bos_mlp is not None:
                bias += g[:, 0] @ t.bos_mlp[layer]
            if layer in self.tset.by_layer:
                bias += g.sum(1) @ self.b_dec[layer]
                if layer in self.skip_back:
                    g = g + self._through_ln2(layer, g @ self.skip_back[layer])
                here = targets.layer == layer
                if here.any():
                    inject = g.new_zeros(int(here.sum()), self.n_pos, d)
                    inject[torch.arange(len(inject), device=g.device), targets.pos[here]] = targets.vector[here]
                    g[batch[here]] += self._through_ln2(layer, inject)
            bias += g.sum(1) @ self.attn_bias[layer]
            g = g + self._through_attention(layer, g)
        rows[:, err0 + self.n_layers * self.n_pos:] = (g * t.resid0).sum(-1)
        return rows, bias


def prompt_tokens(model, prompt: str) -> torch.Tensor:
    """The token ids the graph is built on, by circuit-tracer's rule; empty or over-long prompts are refused.

    The text is tokenized without special tokens. If it starts with a special token, that token is
    position 0; otherwise the tokenizer's BOS is prepended, or where it has none its pad, EOS or any
    other special token (TransformerLens already uses EOS as BOS for tokenizers without one). A
    tokenizer with no special token at all leaves the first real token at position 0, which then, as
    in circuit-tracer, gets no feature nodes by default (`trace_prompt`). One departure: a special
    token whose id is 0 is a candidate here; circuit-tracer's filter skips id 0 as if it were missing.
    """
    if not prompt.strip():
        raise AttributionError("empty prompt")
    tok = model.tokenizer
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    specials = list(tok.all_special_ids)
    if not ids or ids[0] not in specials:
        first = next((t for t in [tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, *specials] if t is not None), None)
        ids = ids if first is None else [first, *ids]
    if len(ids) > model.cfg.n_ctx:
        raise AttributionError(f"prompt {prompt[:40]!r} is {len(ids)} tokens; the model's context is {model.cfg.n_ctx}")
    return torch.tensor(ids, dtype=torch.long, device=model.cfg.device)


def choose_logit_targets(logits: torch.Tensor, max_n_logits: int, desired_prob: float, extra: list[int]) -> torch.Tensor:
    """The most probable next tokens up to `desired_prob` cumulative probability (at most `max_n_logits`), plus `extra`."""
    probs = logits.softmax(-1)
    top = probs.topk(min(max_n_logits, len(probs)))
    n = int(torch.searchsorted(top.values.cumsum(0), top.values.new_tensor(desired_prob))) + 1
    chosen = top.indices[:n].tolist()
    return torch.tensor(chosen + [t for t in dict.fromkeys(extra) if t not in chosen], dtype=torch.long, device=logits.device)


def target_token(model, text: str) -> int:
    """A named logit target: its text must be exactly one token."""
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise AttributionError(f"target {text!r} is {len(ids)} tokens; name a single token (mind the leading space)")
    return int(ids[0])


def attribute(
    model,
    tset: TranscoderSet,
    prompt: str,
    *,
    extra_targets: list[int] | None = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_feature_nodes: int | None = None,
    batch_size: int = 256,
    update_interval: int = 4,
    zero_bos: bool = True,
    progress: bool = False,
    custom: CustomTarget | None = None,
) -> AttributionGraph:
    """The attribution graph of `prompt` (BOS prepended as the model does) with the transcoders in `tset`.

    With more active features than `max_feature_nodes`, features are expanded in order of their
    estimated influence on the logits, refreshed every `update_interval` batches (circuit-tracer's
    scheme); the rest are left out and their effect is recorded per target in `dropped`. A `custom`
    target (`ingest.targets`) is one more target after the logits, weighted in pruning by its `weight`.
    """
    check_supported(model, tset)
    tokens = prompt_tokens(model, prompt)
    trace = trace_prompt(model, tset, tokens, zero_bos)
    sweep = Sweep(model, tset, trace)
    n_layers, n_pos, n_active = model.cfg.n_layers, len(tokens), len(trace.active)

    logit_ids = choose_logit_targets(trace.logits, max_n_logits, desired_logit_prob, extra_targets or [])
    W_U, b_U = model.W_U.detach(), model.b_U.detach()
    vectors, own, values = W_U[:, logit_ids].T.float(), b_U[logit_ids].float(), trace.logits[logit_ids]
    probabilities = trace.logits.softmax(-1)[logit_ids]
    if custom is not None:
        target = custom.vector.float()
        vectors, own = torch.cat([vectors, target[None]]), torch.cat([own, own.new_tensor([custom.bias])])
        values = torch.cat([values, (trace.final_normalised @ target + custom.bias)[None]])
        probabilities = torch.cat([probabilities, probabilities.new_tensor([custom.weight])])
    n_out = len(vectors)
    at = tokens.device
    logit_rows, logit_bias = sweep.rows(Targets(torch.full((n_out,), n_layers, device=at), torch.full((n_out,), n_pos - 1, device=at), vectors, own))

    budget = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
    feature_rows = logit_rows.new_zeros(budget, sweep.n_cols)
    feature_bias = logit_rows.new_zeros(budget)
    order = torch.empty(budget, dtype=torch.long, device=at)  # active-feature index of each computed row
    visited = torch.zeros(n_active, dtype=torch.bool, device=at)
    done = 0

    def expand(batch: torch.Tensor) -> None:
        nonlocal done
        layer, pos, index = trace.active[batch].T
        vectors = torch.stack([tset[int(lay)].W_enc[:, int(i)] for lay, i in zip(layer, index)]).float() if len(batch) else logit_rows.new_zeros(0, model.cfg.d_model)
        own = torch.stack([tset[int(lay)].b_enc[int(i)] for lay, i in zip(layer, index)]).float() if len(batch) else logit_rows.new_zeros(0)
        rows, bias = sweep.rows(Targets(layer, pos, vectors, own))
        feature_rows[done:done + len(batch)], feature_bias[done:done + len(batch)] = rows, bias
        order[done:done + len(batch)] = batch
        visited[batch] = True
        done += len(batch)

    bar = tqdm(total=budget, desc="attribution", unit="feature", disable=not progress)
    while done < budget:
        if budget == n_active:  # everything is expanded: batch by layer so each sweep stops early
            pending = torch.argsort(trace.active[:, 0], stable=True)
        else:
            rows = torch.cat([logit_rows, feature_rows[:done]])
            row_cols = torch.cat([torch.full((n_out,), -1, device=at), order[:done]])
            weights = torch.cat([probabilities, probabilities.new_zeros(done)])
            influence = partial_influence(rows, row_cols, weights)[:n_active]
            ranked = torch.argsort(influence, descending=True)
            pending = ranked[~visited[ranked]][: min(update_interval * batch_size, budget - done)]
        for start in range(0, len(pending), batch_size):
            expand(pending[start:start + batch_size])
            bar.update(len(pending[start:start + batch_size]))
    bar.close()
    graph = _assemble(prompt, trace, n_layers, logit_ids, probabilities, values, logit_rows, logit_bias,
                      feature_rows, feature_bias, order,
                      {"max_n_logits": max_n_logits, "desired_logit_prob": desired_logit_prob, "max_feature_nodes": max_feature_nodes,
                       "zero_bos": zero_bos})
    graph.custom_target = None if custom is None else custom.name
    return graph


def _assemble(prompt, trace: PromptTrace, n_layers, logit_ids, probabilities, values, logit_rows, logit_bias,
              feature_rows, feature_bias, order, settings) -> AttributionGraph:
    """Lay the computed rows out in the fixed node order; columns of features left out go to `dropped`."""
    n_active, n_pos, at = len(trace.active), len(trace.tokens), order.device
    selected = order.sort().values  # keep the features' (layer, pos, index) order
    rank = torch.empty(n_active, dtype=torch.long, device=at)
    rank[order] = torch.arange(len(order), device=at)
    n_feat, n_logits = len(selected), len(logit_rows)
    keep_cols = torch.cat([selected, torch.arange(n_active, logit_rows.shape[1], device=at)])
    left_out = torch.ones(n_active, dtype=torch.bool, device=at)
    left_out[selected] = False
    n_nodes = n_feat + n_layers * n_pos + n_pos + n_logits
    adjacency = torch.zeros(n_nodes, n_nodes, device=at)
    value = torch.full((n_nodes,), float("nan"), device=at)
    bias, dropped = torch.zeros(n_nodes, device=at), torch.zeros(n_nodes, device=at)
    sources = slice(0, n_nodes - n_logits)
    f_rows = feature_rows[rank[selected]]
    adjacency[:n_feat, sources] = f_rows[:, keep_cols]
    adjacency[n_nodes - n_logits:, sources] = logit_rows[:, keep_cols]
    bias[:n_feat], bias[n_nodes - n_logits:] = feature_bias[rank[selected]], logit_bias
    dropped[:n_feat] = f_rows[:, :n_active][:, left_out].sum(1)
    dropped[n_nodes - n_logits:] = logit_rows[:, :n_active][:, left_out].sum(1)
    value[:n_feat] = trace.pre_acts[selected]
    value[n_nodes - n_logits:] = values
    return AttributionGraph(
        prompt=prompt, tokens=trace.tokens, n_layers=n_layers, features=trace.active[selected],
        activations=trace.activations[selected], logit_targets=logit_ids, logit_probabilities=probabilities,
        adjacency=adjacency, value=value, bias=bias, dropped=dropped, n_active_features=n_active, settings=settings,
        trace=trace,
    )
