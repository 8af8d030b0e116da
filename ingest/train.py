"""Train one ReLU transcoder (optionally a skip transcoder) per layer, as the transcoder paper did: L1 penalty,
Adam, unit-norm decoder rows; then measure them on held-out tokens (`evaluate.Reconstruction`) and save them in
SAELens format.

All layers train together from one forward pass per batch: the model's MLP inputs
(`blocks.L.ln2.hook_normalized`) and outputs (`blocks.L.hook_mlp_out`) are cached for every layer,
and the per-layer weights are stacked so one batched matmul serves every layer. Inside the loop,
inputs and targets are rescaled per layer (targets to unit variance) so one L1 coefficient suits every
layer; the scales are folded back into the saved weights, which therefore act on raw activations.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from circuit_catalog.catalog.atomic import atomic_directory
from circuit_catalog.ingest.datasets import token_contexts
from circuit_catalog.ingest.device import dtype_name
from circuit_catalog.ingest.evaluate import Reconstruction
from circuit_catalog.ingest.models import check_context
from circuit_catalog.ingest.transcoder import Transcoder, TranscoderConfig, TranscoderSet
from circuit_catalog.ingest.transcoder_formats import load_transcoders, save_saelens
from circuit_catalog.progress import tqdm

from circuit_catalog.errors import OutputError, TranscoderError

TRAINING_RECORD = "training.json"
BUFFER_LIMIT_BYTES = 12 << 30


@dataclass(kw_only=True)
class TrainConfig:
    """Everything that decides the result; recorded next to the weights and compared before reuse."""

    model: str
    dataset: str
    layers: list[int]
    d_sae: int
    n_tokens: int
    ctx_len: int = 128
    batch_contexts: int = 16
    minibatch: int = 128
    epochs: int = 1
    lr: float = 4e-4
    l1_coefficient: float = 0.02
    eval_tokens: int = 4096
    skip: bool = False  # add an affine skip connection W_skip (a skip transcoder)
    seed: int = 0
    hook_in: str = "ln2.hook_normalized"
    hook_out: str = "hook_mlp_out"
    dtype: str = "float32"  # of the model's forward passes that collect the activations (training is float32)


@dataclass
class LayerMetrics:
    layer: int
    fvu: float  # fraction of variance unexplained on held-out tokens
    l0: float  # mean active features per token
    dead_fraction: float  # features that never fired on the held-out tokens


@dataclass
class TrainResult:
    config: TrainConfig
    metrics: list[LayerMetrics] = field(default_factory=list)

    @property
    def mean_fvu(self) -> float:
        return sum(m.fvu for m in self.metrics) / len(self.metrics)


def hook_names(cfg: TrainConfig, layer: int) -> tuple[str, str]:
    return f"blocks.{layer}.{cfg.hook_in}", f"blocks.{layer}.{cfg.hook_out}"


def collect(model, tokens: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass -> (x, y), each [n_layers, n_tokens, d_model] on the model's device in its dtype; position 0
    (BOS) left out.

    BOS activations are outliers of a different scale (attention sinks); like most published
    transcoders we neither train nor evaluate on them.
    """
    names = [h for layer in cfg.layers for h in hook_names(cfg, layer)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(model.W_E.device), names_filter=names, stop_at_layer=max(cfg.layers) + 1)
    x = torch.stack([cache[hook_names(cfg, layer)[0]][:, 1:].reshape(-1, model.cfg.d_model) for layer in cfg.layers])
    y = torch.stack([cache[hook_names(cfg, layer)[1]][:, 1:].reshape(-1, model.cfg.d_model) for layer in cfg.layers])
    return x, y


class _StackedTranscoders(torch.nn.Module):
    """Weights for all layers stacked on dim 0, trained in normalised units, in float32 whatever the model's dtype.

    Built on the device of the first batch it is given (the host-memory buffer's, so a seed gives the same start
    on every device), then moved to the model's."""

    def __init__(self, n_layers: int, d: int, d_sae: int, x: torch.Tensor, y: torch.Tensor, skip: bool = False):
        super().__init__()
        # per-layer scales from the first batch: inputs to unit mean squared norm, targets to unit
        # variance. With unit-norm decoder rows and W_enc = W_dec^T, parameters are then O(1/sqrt(d)),
        # which the seed's Adam learning rate moves by about 1% a step.
        self.register_buffer("s_in", x.pow(2).sum(-1).mean(-1).sqrt().clamp_min(1e-6))
        y_var = (y - y.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1)
        self.register_buffer("s_out", y_var.sqrt().clamp_min(1e-6))
        W_dec = torch.randn(n_layers, d_sae, d, device=x.device)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = torch.nn.Parameter(W_dec)
        self.W_enc = torch.nn.Parameter(W_dec.transpose(1, 2).clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(n_layers, 1, d_sae, device=x.device))
        self.b_dec = torch.nn.Parameter((y / self.s_out[:, None, None]).mean(1, keepdim=True))
        # skip transcoders (seed 004): an affine path x @ W_skip beside the features, starting at zero
        self.W_skip = torch.nn.Parameter(torch.zeros(n_layers, d, d, device=x.device)) if skip else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n_layers, B, d] raw -> (reconstruction in normalised units, feature activations)."""
        z = torch.relu(torch.bmm(x / self.s_in[:, None, None], self.W_enc) + self.b_enc)
        out = torch.bmm(z, self.W_dec) + self.b_dec
        if self.W_skip is not None:
            out = out + torch.bmm(x / self.s_in[:, None, None], self.W_skip)
        return out, z

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    def export(self, cfg: TrainConfig, model_name: str) -> list[Transcoder]:
        """Fold the scales back: z_raw = s_out * z, so W_dec keeps unit-norm rows."""
        out = []
        for i, layer in enumerate(cfg.layers):
            s_in, s_out = self.s_in[i].item(), self.s_out[i].item()
            d = self.W_enc.shape[1]
            hook_in, hook_out = hook_names(cfg, layer)
            tc_cfg = TranscoderConfig(layer=layer, d_in=d, d_sae=cfg.d_sae, d_out=d, hook_in=hook_in, hook_out=hook_out, model_name=model_name)
            out.append(Transcoder(
                tc_cfg,
                (self.W_enc[i] * (s_out / s_in)).detach().clone(),
                (self.b_enc[i, 0] * s_out).detach().clone(),
                self.W_dec[i].detach().clone(),
                (self.b_dec[i, 0] * s_out).detach().clone(),
                W_skip=None if self.W_skip is None else (self.W_skip[i] * (s_out / s_in)).detach().clone(),
            ))
        return out


def train_transcoders(model, cfg: TrainConfig, out_dir: Path, progress: bool = True) -> TrainResult:
    """Train, evaluate on held-out contexts, and save one SAELens directory per layer under `out_dir`."""
    bad = [layer for layer in cfg.layers if not 0 <= layer < model.cfg.n_layers]
    if bad:
        raise TranscoderError(f"layer(s) {bad} outside the model's 0..{model.cfg.n_layers - 1}")
    if out_dir.exists() and not out_dir.is_dir():  # found out now, not after the training
        raise OutputError(f"{out_dir}: is a file, not a directory for the transcoders")
    check_context(model, cfg.ctx_len)
    if dtype_name(model.W_E.dtype) != cfg.dtype:
        raise ValueError(f"the model runs in {dtype_name(model.W_E.dtype)}, the config says {cfg.dtype}")
    torch.manual_seed(cfg.seed)
    tokens = token_contexts(model.tokenizer, cfg.dataset, cfg.n_tokens + cfg.eval_tokens, cfg.ctx_len)
    n_eval = max(1, -(-cfg.eval_tokens // cfg.ctx_len))
    eval_tokens, train_tokens = tokens[:n_eval], tokens[n_eval:]
    if len(train_tokens) == 0:
        raise TranscoderError("no training tokens: increase --tokens")
    x_buf, y_buf = _activation_buffer(model, train_tokens, cfg, progress)
    d, n_layers, n, device = model.cfg.d_model, len(cfg.layers), x_buf.shape[1], model.W_E.device
    first = torch.randperm(n, device=x_buf.device)[: min(n, 8192)]
    net = _StackedTranscoders(n_layers, d, cfg.d_sae, x_buf[:, first].float(), y_buf[:, first].float(), skip=cfg.skip).to(device)
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg.lr, fused=True)
    steps_per_epoch = -(-n // cfg.minibatch)
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="training", unit="step", disable=not progress)
    for _ in range(cfg.epochs):
        for mb in torch.randperm(n, device=x_buf.device).split(cfg.minibatch):
            x, y_n = x_buf[:, mb].to(device).float(), y_buf[:, mb].to(device).float() / net.s_out[:, None, None]
            recon, z = net(x)
            mse = (recon - y_n).pow(2).sum(-1).mean(-1)  # per layer, ~FVU
            l1 = z.sum(-1).mean(-1)  # decoder rows are unit norm, so this is the weighted L1
            loss = (mse + cfg.l1_coefficient * l1).sum()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            net.normalise_decoder()
            bar.update()
            if bar.n % 50 == 0:
                bar.set_postfix(fvu=f"{mse.mean().item():.3f}", l0=f"{(z > 0).float().sum(-1).mean().item():.1f}")
    bar.close()
    del x_buf, y_buf
    transcoders = net.export(cfg, getattr(model.cfg, "model_name", ""))
    result = TrainResult(cfg, evaluate(model, TranscoderSet({t.layer: t for t in transcoders}), eval_tokens, cfg))
    _save_atomically(transcoders, result, out_dir)
    return result


def _activation_buffer(model, tokens: torch.Tensor, cfg: TrainConfig, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MLP inputs and outputs of every layer for all training tokens, in float16: [n_layers, N, d] each.

    One forward pass per batch serves every layer; the buffer lets training take several epochs
    without paying for the forward passes again (they cost as much as the training itself here).
    It lives in host memory whatever the model's device (up to BUFFER_LIMIT_BYTES, more than many GPUs
    hold beside a model); minibatches are moved to the device.
    """
    n = tokens.shape[0] * (tokens.shape[1] - 1)
    need = 2 * len(cfg.layers) * n * model.cfg.d_model * 2
    if need > BUFFER_LIMIT_BYTES:
        raise TranscoderError(
            f"the activation buffer would take {need / 2**30:.1f} GiB (> {BUFFER_LIMIT_BYTES / 2**30:.0f}); "
            "train fewer --layers at a time or use fewer --tokens"
        )
    x_buf = torch.empty(len(cfg.layers), n, model.cfg.d_model, dtype=torch.float16)
    y_buf = torch.empty_like(x_buf)
    bar = tqdm(total=n, desc="collecting activations", unit="tok", disable=not progress)
    at = 0
    for start in range(0, len(tokens), cfg.batch_contexts):
        x, y = collect(model, tokens[start : start + cfg.batch_contexts], cfg)
        x_buf[:, at : at + x.shape[1]] = x.to(x_buf.device)
        y_buf[:, at : at + x.shape[1]] = y.to(y_buf.device)
        at += x.shape[1]
        bar.update(x.shape[1])
    bar.close()
    if not (torch.isfinite(x_buf).all() and torch.isfinite(y_buf).all()):
        raise TranscoderError("activations overflow float16 (or the model produced NaN); check the model and dataset")
    return x_buf, y_buf


@torch.no_grad()
def evaluate(model, tset: TranscoderSet, tokens: torch.Tensor, cfg: TrainConfig) -> list[LayerMetrics]:
    """FVU, L0 and dead fraction per layer on `tokens`, BOS excluded (as `eval` measures them); in float32 (the
    transcoders' dtype)."""
    stats = {layer: Reconstruction(cfg.d_sae, model.cfg.d_model, model.W_E.device) for layer in cfg.layers}
    for start in range(0, len(tokens), cfg.batch_contexts):
        x, y = collect(model, tokens[start : start + cfg.batch_contexts], cfg)
        x, y = x.float(), y.float()
        for i, layer in enumerate(cfg.layers):
            z = tset[layer].encode(x[i])
            stats[layer].add(tset[layer].decode(z, x[i]), y[i], z)
    return [LayerMetrics(layer, s.fvu, s.l0, s.dead / cfg.d_sae) for layer, s in stats.items()]


def _save_atomically(transcoders: list[Transcoder], result: TrainResult, out_dir: Path) -> None:
    """Write everything beside `out_dir`, then swap it in: never a half-written set."""
    with atomic_directory(out_dir) as tmp:
        for tc in transcoders:
            save_saelens(tc, tmp / f"layer_{tc.layer}")
        record = {"config": asdict(result.config), "metrics": [asdict(m) for m in result.metrics]}
        (tmp / TRAINING_RECORD).write_text(json.dumps(record, indent=2))


def reusable(out_dir: Path, cfg: TrainConfig) -> TrainResult | None:
    """The saved result if `out_dir` holds a finished training run with exactly this config."""
    record_path = out_dir / TRAINING_RECORD
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
        recorded = TrainConfig(**record["config"])  # a field added since then reads as its default
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    if recorded != cfg:
        return None
    try:
        load_transcoders(out_dir)
    except TranscoderError:
        return None
    return TrainResult(cfg, [LayerMetrics(**m) for m in record["metrics"]])
