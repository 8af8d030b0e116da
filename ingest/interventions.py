"""Feature interventions on the local replacement model: set, scale or add to features and watch the logits.

An attribution graph is a hypothesis about how the model computes; an intervention tests it. Every
transcoder layer's MLP output is replaced by its reconstruction from the (edited) feature activations
plus the prompt's error term, held fixed at its value in the unmodified run (a layer without a
transcoder keeps its whole MLP output fixed, as in the graph). With no edit the run is the model's
forward pass exactly. Three regimes, the names the CLI uses:

- `replacement` (default): everything downstream of an edit responds, attention and norms included;
  later features are re-encoded from their (changed) inputs.
- `freeze-attention`: attention patterns and every norm scale are held at their unmodified values.
- `direct-only`: also every feature not edited keeps its unmodified activation, so only the edited
  features' direct effects through the frozen residual paths (and the live skip paths) arrive: the
  regime in which an attribution graph's edges are exact (ablating a feature moves each target by
  minus its edge).

An edit's position is 0-based, `-1` for the last token or `*` for every position. As in the graphs,
position 0 carries no feature activations (`trace_prompt`'s rule): its activations count as 0 there, so
`set` writes the value's decoder vector on top of the position's fixed MLP output and `scale` does
nothing (with `zero_bos=False`, as for graphs built with `--bos-features`, position 0 is like any
other). `scale` and `add` act on the activation as the run computes it (the unmodified one under
`direct-only`). Positions and `set` follow circuit-tracer's `feature_intervention`; its MLPs stay the real
MLPs where this model holds error terms fixed, and its `freeze_attention` freezes patterns only.
`tests/test_interventions.py` holds the two to each other regime by regime (bench/circuit_tracer/NOTES.md).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum

import torch
from circuit_catalog.catalog.ids import feature_id, parse_feature_id
from circuit_catalog.ingest.attribution import check_supported
from circuit_catalog.ingest.transcoder import TranscoderSet

from circuit_catalog.errors import InterventionError, UserError


class Regime(str, Enum):
    REPLACEMENT = "replacement"
    FREEZE_ATTENTION = "freeze-attention"
    DIRECT_ONLY = "direct-only"


OPS = ("set", "scale", "add")
EDIT = re.compile(r"^(?P<feature>[^@=]+)(?:@(?P<pos>[^=]*))?=(?P<value>.*)$")


@dataclass(frozen=True)
class Edit:
    """One feature edit: `op` in set | scale | add, at a position (None: every position)."""

    op: str
    layer: int
    index: int
    pos: int | None
    value: float

    @property
    def feature(self) -> str:
        return feature_id(self.layer, self.index)

    @property
    def spec(self) -> str:
        where = "*" if self.pos is None else str(self.pos)
        return f"{self.op} {self.feature}@{where}={self.value:g}"


def parse_edit(op: str, text: str) -> Edit:
    """`L12/55@4=0` (position 4), `L8/9@*=5` (every position), `L20/3=2` (every position), `L1/2@-1=0` (last)."""
    if op not in OPS:
        raise InterventionError(f"unknown operation {op!r}: expected one of {', '.join(OPS)}")
    m = EDIT.match(text.strip())
    if not m:
        raise InterventionError(f"malformed intervention {text!r}: expected L<layer>/<index>[@<pos>|@*]=<value>, e.g. L12/55@4=0")
    try:
        layer, index = parse_feature_id(m["feature"])
    except UserError:
        raise InterventionError(f"malformed feature in {text!r}: expected L<layer>/<index>, e.g. L12/55") from None
    pos_text = m["pos"]
    if pos_text is None or pos_text == "*":
        pos = None
    elif re.fullmatch(r"-?\d+", pos_text):
        pos = int(pos_text)
    else:
        raise InterventionError(f"malformed position {pos_text!r} in {text!r}: expected an integer, -1 for the last token, or *")
    try:
        value = float(m["value"])
    except ValueError:
        raise InterventionError(f"malformed value {m['value']!r} in {text!r}: expected a number") from None
    if not math.isfinite(value):
        raise InterventionError(f"value {m['value']!r} in {text!r} is not a finite number")
    return Edit(op, layer, index, pos, value)


def resolve(edits: list[Edit], tset: TranscoderSet, n_pos: int) -> list[Edit]:
    """Check each edit against the transcoders and the prompt; negative positions counted from the end."""
    out = []
    for e in edits:
        if e.layer not in tset.by_layer:
            raise InterventionError(f"unknown feature {e.feature}: no transcoder at layer {e.layer} (layers {tset.layers})")
        if not 0 <= e.index < tset[e.layer].cfg.d_sae:
            raise InterventionError(f"unknown feature {e.feature}: layer {e.layer}'s transcoder has {tset[e.layer].cfg.d_sae} features")
        if e.pos is not None and not -n_pos <= e.pos < n_pos:
            raise InterventionError(f"position {e.pos} of {e.feature} is out of range: the prompt has {n_pos} tokens (0..{n_pos - 1})")
        out.append(Edit(e.op, e.layer, e.index, None if e.pos is None else e.pos % n_pos, e.value))
    return out


@dataclass
class CleanRun:
    """The unmodified forward pass: what the regimes hold fixed."""

    logits: torch.Tensor  # [n_pos, d_vocab]
    cache: dict[str, torch.Tensor]  # patterns and norm scales, by hook name
    z: dict[int, torch.Tensor]  # per transcoder layer [n_pos, d_sae], position 0 zeroed
    errors: list[torch.Tensor]  # per layer [n_pos, d]: MLP output minus reconstruction (the whole output without a transcoder)
    final_normalised: torch.Tensor  # [d] the unembedding's input at the last position (custom targets read it)


def _freeze_names(n_layers: int) -> list[str]:
    names = ["ln_final.hook_scale"]
    for layer in range(n_layers):
        names += [f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.ln1.hook_scale", f"blocks.{layer}.ln2.hook_scale"]
    return names


@torch.no_grad()
def clean_run(model, tset: TranscoderSet, tokens: torch.Tensor, zero_bos: bool = True) -> CleanRun:
    n_layers = model.cfg.n_layers
    frozen = set(_freeze_names(n_layers))
    wanted = frozen | {f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)} | {tc.cfg.hook_in for tc in tset}
    wanted.add("ln_final.hook_normalized")
    logits, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n in wanted)
    xs = {tc.layer: cache[tc.cfg.hook_in][0] for tc in tset}
    zs = {layer: tset[layer].encode(x) for layer, x in xs.items()}
    if zero_bos:
        for z in zs.values():
            z[0] = 0
    recon = tset.reconstruct(zs, xs)  # with a CLT, earlier layers' features write into a layer too
    errors = [cache[f"blocks.{layer}.hook_mlp_out"][0] - recon.get(layer, 0) for layer in range(n_layers)]
    return CleanRun(logits[0], {name: cache[name] for name in frozen}, zs, errors, cache["ln_final.hook_normalized"][0, -1])


def _edited(z: torch.Tensor, edit_sets: list[list[Edit]]) -> torch.Tensor:
    """z [B, n_pos, d_sae] with batch row b edited by edit_sets[b]."""
    z = z.clone()
    for b, edits in enumerate(edit_sets):
        for e in edits:
            where = (b, slice(None) if e.pos is None else e.pos, e.index)
            if e.op == "set":
                z[where] = e.value
            elif e.op == "scale":
                z[where] *= e.value
            else:
                z[where] += e.value
    return z


@dataclass
class Run:
    """One intervention's forward pass, or a batch of them (a leading batch dimension on every tensor)."""

    logits: torch.Tensor  # [n_pos, d_vocab]
    pre_acts: dict[int, torch.Tensor] = field(default_factory=dict)  # per transcoder layer [n_pos, d_sae]
    final_normalised: torch.Tensor | None = None  # [d] the unembedding's input at the last position


@torch.no_grad()
def run_edited(model, tset: TranscoderSet, tokens: torch.Tensor, edits: list[Edit], regime: Regime = Regime.REPLACEMENT,
               clean: CleanRun | None = None, zero_bos: bool = True) -> Run:
    """One forward pass of the local replacement model with `edits` (already `resolve`d) in `regime`."""
    batch = run_batch(model, tset, tokens, [edits], regime, clean, zero_bos)
    return Run(batch.logits[0], {layer: p[0] for layer, p in batch.pre_acts.items()}, batch.final_normalised[0])


@torch.no_grad()
def run_batch(model, tset: TranscoderSet, tokens: torch.Tensor, edit_sets: list[list[Edit]], regime: Regime = Regime.REPLACEMENT,
              clean: CleanRun | None = None, zero_bos: bool = True) -> Run:
    """Several interventions on one prompt in one batched forward pass, row b edited by `edit_sets[b]`."""
    check_supported(model, tset)
    clean = clean or clean_run(model, tset, tokens, zero_bos)
    n = len(edit_sets)
    by_layer = {layer: [[e for e in edits if e.layer == layer] for edits in edit_sets] for layer in tset.layers}
    inputs: dict[int, torch.Tensor] = {}
    pre_acts: dict[int, torch.Tensor] = {}
    edited: dict[int, torch.Tensor] = {}  # each layer's edited activations, read by the layers its features write into
    final: list[torch.Tensor] = []

    def read_input(value, hook, layer):
        inputs[layer] = value
        pre_acts[layer] = tset[layer].pre_acts(value)
        return value

    def mlp_out(value, hook, layer):
        if layer not in tset.by_layer:
            return clean.errors[layer].expand(n, -1, -1)
        if regime is Regime.DIRECT_ONLY:
            z = clean.z[layer].expand(n, -1, -1)
        else:
            z = tset[layer].activate(pre_acts[layer])
            if zero_bos:
                z[:, 0] = 0
        edited[layer] = _edited(z, by_layer[layer])
        return tset.decode_into(layer, edited, inputs) + clean.errors[layer]

    hooks = [(tc.cfg.hook_in, lambda v, hook, layer=tc.layer: read_input(v, hook, layer)) for tc in tset]
    hooks += [(f"blocks.{layer}.hook_mlp_out", lambda v, hook, layer=layer: mlp_out(v, hook, layer))
              for layer in range(model.cfg.n_layers)]
    if regime is not Regime.REPLACEMENT:
        hooks += [(name, lambda v, hook: clean.cache[hook.name].expand_as(v)) for name in clean.cache]
    hooks.append(("ln_final.hook_normalized", lambda v, hook: final.append(v[:, -1]) or v))
    logits = model.run_with_hooks(tokens[None].expand(n, -1), fwd_hooks=hooks)
    return Run(logits, pre_acts, final[0])


@dataclass
class TargetChange:
    token: str
    token_id: int
    before: float  # logit at the last position
    after: float
    change: float  # after - before


@dataclass
class Outcome:
    """What an intervention did to the next-token distribution at the last position."""

    prompt: str
    regime: str
    edits: list[str]
    top_before: list[tuple[str, float]]  # (token, probability)
    top_after: list[tuple[str, float]]
    targets: list[TargetChange]
    kl: float  # KL(before || after) in nats


def outcome(model, prompt: str, regime: Regime, edits: list[Edit], before: torch.Tensor, after: torch.Tensor,
            target_ids: list[int], k: int) -> Outcome:
    """Compare two last-position logit vectors (in float32 whatever the compute dtype); targets default to the k
    most probable tokens before."""
    before, after = before.float(), after.float()
    log_p, log_q = before.log_softmax(-1), after.log_softmax(-1)
    kl = float((log_p.exp() * (log_p - log_q)).sum())
    decode = model.tokenizer.decode

    def top(logp: torch.Tensor) -> list[tuple[str, float]]:
        values, ids = logp.exp().topk(min(k, len(logp)))
        return [(decode([i]), float(v)) for v, i in zip(values.tolist(), ids.tolist())]

    ids = target_ids or log_p.topk(min(k, len(log_p))).indices.tolist()
    changes = [TargetChange(decode([t]), t, float(before[t]), float(after[t]), float(after[t] - before[t])) for t in ids]
    return Outcome(prompt, regime.value, [e.spec for e in edits], top(log_p), top(log_q), changes, kl)


def intervene(model, tset: TranscoderSet, tokens: torch.Tensor, edits: list[Edit], regime: Regime = Regime.REPLACEMENT,
              target_ids: list[int] | None = None, k: int = 10, zero_bos: bool = True) -> Outcome:
    """Run `edits` (positions relative to `tokens`) on the prompt and compare with the unmodified model."""
    edits = resolve(edits, tset, len(tokens))
    clean = clean_run(model, tset, tokens, zero_bos)
    run = run_edited(model, tset, tokens, edits, regime, clean, zero_bos)
    prompt = model.tokenizer.decode(tokens.tolist())
    return outcome(model, prompt, regime, edits, clean.logits[-1], run.logits[-1], target_ids or [], k)
