"""How faithful transcoders are: reconstruction (MSE, FVU, L0, dead) and next-token cross-entropy with
MLPs replaced by transcoders, zero-ablated or mean-ablated, one at a time and all together.

CE loss recovered = (CE_mean_ablated - CE_replaced) / (CE_mean_ablated - CE_original): 1 when the
transcoder is as good as the MLP, 0 when it is no better than the MLP's mean output. KL is
KL(original || replaced) of the next-token distributions, per token. BOS positions are neither
reconstructed nor predicted from (as in training). `Reconstruction` is the one definition of the
reconstruction figures: training reports it on its held-out tokens too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from circuit_catalog.ingest.transcoder import TranscoderSet
from circuit_catalog.progress import tqdm

Replacement = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (mlp input, mlp output) -> new output


@dataclass
class Ablations:
    """Mean next-token CE (nats) and KL to the original with some MLPs replaced, zeroed, or mean-ablated."""

    ce_replaced: float
    ce_zero: float
    ce_mean: float
    kl_replaced: float

    def recovered(self, ce_original: float) -> float:
        return (self.ce_mean - self.ce_replaced) / (self.ce_mean - ce_original)


class Reconstruction:
    """One layer's reconstruction figures, accumulated batch by batch: MSE, FVU, L0 and dead features.

    The one definition `train` (on its held-out tokens) and `eval` report. FVU is the squared error over the
    targets' variance about their mean, summed over d_out; the variance comes from running sums (the mean's
    in float64), so no batch needs another in memory.
    """

    def __init__(self, d_sae: int, d_out: int, device: torch.device | str | None = None):
        self.n = 0  # tokens
        self.sq_err = 0.0
        self.y_sum = torch.zeros(d_out, dtype=torch.float64, device=device)
        self.y_sq = 0.0
        self.active = 0.0  # active features, summed over tokens
        self.fired = torch.zeros(d_sae, dtype=torch.bool, device=device)

    def add(self, recon: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> None:
        """One batch: reconstruction and target `[..., d_out]`, feature activations `[..., d_sae]` (BOS left out)."""
        self.n += y[..., 0].numel()
        self.sq_err += (recon - y).float().pow(2).sum().item()
        self.y_sum += y.sum(tuple(range(y.dim() - 1)), dtype=torch.float64)
        self.y_sq += y.float().pow(2).sum().item()
        self.active += (z > 0).sum().item()
        self.fired |= (z > 0).reshape(-1, z.shape[-1]).any(0)

    @property
    def mse(self) -> float:
        """Squared error summed over d_out, per token."""
        return self.sq_err / self.n

    @property
    def fvu(self) -> float:
        variance = self.y_sq - self.y_sum.pow(2).sum().item() / self.n
        return self.sq_err / max(variance, 1e-12)

    @property
    def l0(self) -> float:
        """Mean active features per token."""
        return self.active / self.n

    @property
    def live(self) -> int:
        return int(self.fired.sum())

    @property
    def dead(self) -> int:
        """Features that never fired."""
        return len(self.fired) - self.live

    @property
    def mean(self) -> torch.Tensor:
        """The targets' mean `[d_out]` (what mean ablation puts in)."""
        return (self.y_sum / self.n).float()


@dataclass
class LayerEval:
    layer: int
    mse: float
    fvu: float
    l0: float
    dead: int  # features that never fired on the evaluation tokens
    live: int
    ablations: Ablations = None
    ce_recovered: float = 0.0


@dataclass
class EvalResult:
    n_tokens: int
    ce_original: float
    layers: list[LayerEval] = field(default_factory=list)
    all_layers: Ablations = None
    ce_recovered_all: float = 0.0


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities at the predicting positions 1.. (not BOS, not the last), in float32."""
    return logits[:, 1:-1].float().log_softmax(-1)


def _ce_and_kl(logits: torch.Tensor, tokens: torch.Tensor, reference: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE of predicting tokens[:, 2:] from positions 1.., and summed KL(reference || logits), `reference`
    being the original model's `_log_probs` (computed once per batch, not once per pass)."""
    logp = _log_probs(logits)
    ce = -logp.gather(-1, tokens[:, 2:, None]).sum()
    if reference is None:
        return ce, ce.new_zeros(())
    return ce, (reference.exp() * (reference - logp)).sum()


@torch.no_grad()
def evaluate_transcoders(model, tset: TranscoderSet, tokens: torch.Tensor, batch_contexts: int = 8,
                         replacements: dict[int, Replacement] | None = None, progress: bool = True,
                         per_layer: bool = True) -> EvalResult:
    """Evaluate on `tokens` [n_contexts, ctx_len]. `replacements` overrides how a layer's MLP output is
    replaced (default: its transcoder); the tests use it to plug in exact stand-ins. Without `per_layer`, only
    the reconstruction figures and every layer replaced at once (what the training curve measures; each layer alone
    costs three more forward passes).

    With a cross-layer transcoder, a layer's replacement is what every earlier layer's features (encoded from
    that run's own inputs) write into it, so replacing layer L alone reads the clean earlier layers and
    replacing all layers reads each layer's input in the replaced model, as circuit-tracer runs a CLT.

    Runs on the model's device (batches of `tokens` are moved there) in its dtype; losses and sums in float32/64."""
    replacements = replacements or {}
    device = model.W_E.device
    layers = tset.layers
    hook_in = {layer: tset[layer].cfg.hook_in for layer in layers}
    hook_out = {layer: tset[layer].cfg.hook_out for layer in layers}

    # one layer replaced alone changes nothing before its MLP output: that pass can start from the clean residual
    # stream after the layer (with the new output swapped in), when the output is an MLP's, added to that stream
    resume = per_layer and all(hook_out[layer] == f"blocks.{layer}.hook_mlp_out" for layer in layers)
    resid = {layer: f"blocks.{layer}.hook_resid_post" for layer in layers} if resume else {}

    # pass 1: the original model; reconstruction statistics and each MLP's mean output
    recon_stats = {layer: Reconstruction(tset[layer].cfg.d_sae, model.cfg.d_model, device) for layer in layers}
    n_recon, ce_original, n_pred = 0, 0.0, 0
    batches = [tokens[i : i + batch_contexts].to(device) for i in range(0, len(tokens), batch_contexts)]
    originals = []
    clean: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []  # per batch, layer -> (stream without the MLP's
    # writes after BOS, the replacement's writes there)
    for batch in tqdm(batches, desc="evaluating (original)", disable=not progress):
        names = [*hook_in.values(), *hook_out.values(), *resid.values()]
        logits, cache = model.run_with_cache(batch, names_filter=names)
        originals.append(_log_probs(logits))
        clean.append({})
        ce, _ = _ce_and_kl(logits, batch, None)
        ce_original += ce.item()
        n_pred += batch[:, 2:].numel()
        n_recon += batch[:, 1:].numel()
        xs = {layer: cache[hook_in[layer]][:, 1:] for layer in layers}
        zs = {layer: tset[layer].encode(xs[layer]) for layer in layers}
        for layer in layers:
            x, y, z = xs[layer], cache[hook_out[layer]][:, 1:], zs[layer]
            recon = replacements[layer](x, y) if layer in replacements else tset.decode_into(layer, zs, xs)
            recon_stats[layer].add(recon, y, z)
            if resume:
                stream = cache[resid[layer]].clone()
                stream[:, 1:] -= y
                clean[-1][layer] = (stream, recon)
    means = {layer: stats.mean.to(model.W_E.dtype) for layer, stats in recon_stats.items()}  # an MLP output, in its dtype

    def run(batch: torch.Tensor, original: torch.Tensor, targets: list[int], how: str) -> tuple[float, float]:
        """One forward pass with `targets`' MLP outputs replaced (BOS position kept original)."""
        xs: dict[int, torch.Tensor] = {}
        zs: dict[int, torch.Tensor] = {}

        def capture(act: torch.Tensor, layer: int) -> None:
            xs[layer] = act
            if how == "replace" and layer not in replacements:
                zs[layer] = tset[layer].encode(act)

        def new_output(act: torch.Tensor, layer: int) -> torch.Tensor:
            if how == "zero":
                out = torch.zeros_like(act)
            elif how == "mean":
                out = means[layer].expand_as(act).clone()
            elif layer in replacements:
                out = replacements[layer](xs[layer], act)
            else:
                out = tset.decode_into(layer, zs, xs)
            out[:, 0] = act[:, 0]
            return out

        # every layer up to the last target is read: with a CLT, earlier features write into the targets
        readers = [layer for layer in layers if layer <= max(targets)] if tset.cross_layer else targets
        hooks = [(hook_in[layer], lambda act, hook, layer=layer: capture(act, layer)) for layer in readers]
        hooks += [(hook_out[layer], lambda act, hook, layer=layer: new_output(act, layer)) for layer in targets]
        ce, kl = _ce_and_kl(model.run_with_hooks(batch, fwd_hooks=hooks), batch, original)
        return ce.item(), kl.item()

    def resumed(batch: torch.Tensor, original: torch.Tensor, kept: dict[int, tuple[torch.Tensor, torch.Tensor]],
                layer: int, how: str) -> tuple[float, float]:
        """`run` with `layer` alone replaced, from the clean stream after it (equal up to float rounding)."""
        stream, recon = kept[layer]
        stream = stream.clone()
        stream[:, 1:] += {"replace": recon, "zero": 0.0, "mean": means[layer]}[how]
        ce, kl = _ce_and_kl(model(stream, start_at_layer=layer + 1), batch, original)
        return ce.item(), kl.item()

    def ablations(targets: list[int]) -> Ablations:
        totals = {how: [0.0, 0.0] for how in ("replace", "zero", "mean")}
        for batch, original, kept in zip(batches, originals, clean):
            for how in totals:
                ce, kl = resumed(batch, original, kept, targets[0], how) if resume and len(targets) == 1 else run(batch, original, targets, how)
                totals[how][0] += ce
                totals[how][1] += kl
        return Ablations(totals["replace"][0] / n_pred, totals["zero"][0] / n_pred, totals["mean"][0] / n_pred,
                         totals["replace"][1] / n_pred)

    result = EvalResult(n_recon, ce_original / n_pred)
    for layer in tqdm(layers if per_layer else [], desc="evaluating (per layer)", disable=not progress):
        ab, stats = ablations([layer]), recon_stats[layer]
        result.layers.append(LayerEval(layer, stats.mse, stats.fvu, stats.l0, stats.dead, stats.live, ab,
                                       ab.recovered(result.ce_original)))
    result.all_layers = ablations(layers)
    result.ce_recovered_all = result.all_layers.recovered(result.ce_original)
    return result
