"""Train one transcoder per layer (optionally skip transcoders): BatchTopK with an auxiliary loss for dead features
(the default), or the seed's ReLU with an L1 penalty; then measure them on held-out tokens (`evaluate.Reconstruction`)
and save them in SAELens format.

All layers train together from one forward pass per batch: the model's MLP inputs
(`blocks.L.ln2.hook_normalized`) and outputs (`blocks.L.hook_mlp_out`) are cached for every layer,
and the per-layer weights are stacked so one batched matmul serves every layer. Inside the loop,
inputs and targets are rescaled per layer (targets to unit variance) so one coefficient suits every
layer; the scales are folded back into the saved weights, which therefore act on raw activations.

BatchTopK (Bussmann et al. 2024) keeps the `k x batch` largest activations of a minibatch per layer, so L0 is k on
average while a token may use more or fewer; at inference a threshold (the running mean of the smallest kept
activation) replaces the batch, so the saved transcoder is a JumpReLU one, which every loader and circuit-tracer
read. Features silent for `dead_tokens` tokens learn from an auxiliary loss (Gao et al. 2024, "AuxK"): the
`d_model / 2` largest of them reconstruct the main reconstruction's error, and a few times during training those still
silent are resampled on badly reconstructed tokens (`resamples`). Because only ~k features are active per
token, the decoder runs as a sparse gather-sum (`embedding_bag`) rather than a dense matmul; the encoder's matmuls
run in bfloat16 where the device has native bf16 (`matmul_dtype`), with float32 master weights.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from circuit_catalog.catalog import layout
from circuit_catalog.catalog.atomic import atomic_directory
from circuit_catalog.ingest.datasets import token_contexts
from circuit_catalog.ingest.device import dtype_name, matmul_dtype_for
from circuit_catalog.ingest.evaluate import Reconstruction, evaluate_transcoders
from circuit_catalog.ingest.models import check_context
from circuit_catalog.ingest.outlier_features import fit_outlier_feature
from circuit_catalog.ingest.transcoder import Transcoder, TranscoderConfig, TranscoderSet
from circuit_catalog.ingest.transcoder_formats import load_transcoders, save_saelens
from circuit_catalog.progress import tqdm

from circuit_catalog.errors import OutputError, TranscoderError

BUFFER_LIMIT_BYTES = 12 << 30
TRAIN_ACTIVATIONS = ("batchtopk", "relu")
RESAMPLE_TOKENS = 4096  # buffer tokens from which dead features draw their new directions
CURVE_POINTS = 100  # training-curve points recorded per run (loss, FVU, L0, dead fraction, learning rate)


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
    activation: str = "batchtopk"  # or "relu": the seed's ReLU with an L1 penalty
    k: int = 32  # batchtopk: mean active features per token
    l1_coefficient: float = 0.02  # relu only
    aux_coefficient: float = 1 / 32  # batchtopk: weight of the dead features' auxiliary loss
    dead_tokens: int = 5000  # batchtopk: a feature silent for this many training tokens counts as dead
    # batchtopk: times, evenly spread before the decay, that features silent for the second half of the steps since the
    # previous time (or the start), and for `dead_tokens` at least, are re-initialised on badly reconstructed tokens
    # (Bricken et al. 2023's resampling)
    resamples: int = 6
    # batchtopk: a resampled feature's encoder column has the live features' mean norm (a column much smaller than theirs
    # is moved by Adam's ~lr-sized steps faster than it can learn, and dies again) and its bias makes it fire on this
    # fraction of the sample: on tokens along its direction. Measured (README, "Training"): 0.02 left layer 29 at 17-20%
    # dead, 0.25 at 9%; firing on about half the tokens (the centring bias) cost more FVU. Records from before this start
    # read None, and are not reused for it
    resample_firing: float | None = 0.25
    warmup: float = 0.05  # fraction of the steps over which the learning rate rises linearly from 0
    decay: float = 0.2  # fraction of the steps, at the end, over which it falls linearly to 0
    eval_tokens: int = 4096
    curve_ce: int = 0  # times during training the all-layers CE loss recovered is measured on the held-out tokens
    skip: bool = False  # add an affine skip connection W_skip (a skip transcoder)
    # >0: a token whose target lies more than this many times the median token's squared distance from the mean
    # (massive activations) is left out of the scale, the selection and the loss
    outlier_factor: float = 200.0
    # batchtopk: after training, one feature per layer is fitted to those tokens in closed form (`outlier_features`);
    # without it their output is left to the error term
    outlier_feature: bool = True
    seed: int = 0
    hook_in: str = "ln2.hook_normalized"
    hook_out: str = "hook_mlp_out"
    dtype: str = "float32"  # of the model's forward passes that collect the activations
    matmul_dtype: str = "float32"  # of the training's encoder matmuls ("bfloat16": autocast; weights stay float32)


@dataclass
class LayerMetrics:
    layer: int
    fvu: float  # fraction of variance unexplained on held-out tokens
    l0: float  # mean active features per token
    dead_fraction: float  # features that never fired on the held-out tokens


@dataclass
class CurvePoint:
    """The training's state at one step, averaged over layers (FVU and L0 on the step's minibatch)."""

    step: int
    tokens: int  # training tokens seen
    seconds: float  # since the first step
    lr: float
    loss: float
    fvu: float  # the minibatch's squared error over the targets' variance (typical tokens, as measured on the first batch)
    l0: float
    dead_fraction: float  # silent for `dead_tokens` tokens (relu: since the last curve point)
    ce_recovered: float | None = None  # all layers replaced, held-out tokens (at `curve_ce` points)


@dataclass
class TrainResult:
    config: TrainConfig
    metrics: list[LayerMetrics] = field(default_factory=list)
    curve: list[CurvePoint] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each phase: collect, train, evaluate
    outlier_features: dict[int, int] = field(default_factory=dict)  # layer -> the feature fitted to its outlier tokens

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

    def __init__(self, cfg: TrainConfig, d: int, x: torch.Tensor, y: torch.Tensor):
        super().__init__()
        n_layers, d_sae = len(cfg.layers), cfg.d_sae
        self.cfg = cfg
        # per-layer scales from the first batch: inputs to unit mean squared norm, targets to unit
        # variance (outliers apart). With unit-norm decoder rows and W_enc = W_dec^T, parameters are then O(1/sqrt(d)),
        # which the seed's Adam learning rate moves by about 1% a step.
        self.register_buffer("s_in", x.pow(2).sum(-1).mean(-1).sqrt().clamp_min(1e-6))
        q = (y - y.mean(1, keepdim=True)).pow(2).sum(-1)  # [n_layers, n] each token's squared distance from the mean
        limit = cfg.outlier_factor * q.median(1).values if cfg.outlier_factor > 0 else torch.full_like(q[:, 0], torch.inf)
        typical = q <= limit[:, None]
        self.register_buffer("s_out", (torch.where(typical, q, 0.0).sum(-1) / typical.sum(-1)).sqrt().clamp_min(1e-6))
        # `typical`'s test in training units
        self.register_buffer("y_mean", y.mean(1, keepdim=True) / self.s_out[:, None, None])
        self.register_buffer("outlier_limit", limit / self.s_out.pow(2))
        W_dec = torch.randn(n_layers, d_sae, d, device=x.device)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = torch.nn.Parameter(W_dec)
        self.W_enc = torch.nn.Parameter(W_dec.transpose(1, 2).contiguous())
        self.b_enc = torch.nn.Parameter(torch.zeros(n_layers, 1, d_sae, device=x.device))
        self.b_dec = torch.nn.Parameter((y / self.s_out[:, None, None]).mean(1, keepdim=True))
        # skip transcoders (seed 004): an affine path x @ W_skip beside the features, starting at zero
        self.W_skip = torch.nn.Parameter(torch.zeros(n_layers, d, d, device=x.device)) if cfg.skip else None
        # batchtopk: the inference threshold per layer (`calibrate`), and the step at which each feature last fired
        # (for the dead features' auxiliary loss and the curve's dead fraction)
        self.register_buffer("threshold", torch.zeros(n_layers, device=x.device))
        self.register_buffer("last_fired", torch.zeros(n_layers, d_sae, dtype=torch.long, device=x.device))

    def typical(self, y_n: torch.Tensor) -> torch.Tensor:
        """[n_layers, B] True where a target (in training units) is no outlier (`outlier_factor`)."""
        return (y_n - self.y_mean).pow(2).sum(-1) <= self.outlier_limit[:, None]

    def encoder_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [n_layers, B, d] raw -> x W_enc [n_layers, B, d_sae], the bias apart, in `matmul_dtype` (a bfloat16
        product is rounded to bfloat16 whatever it is then cast to, so it stays so: half the bytes to select from)."""
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.cfg.matmul_dtype == "bfloat16"):
            return torch.bmm(x / self.s_in[:, None, None], self.W_enc)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """x [n_layers, B, d] raw -> dense encoder pre-activations [n_layers, B, d_sae] in float32."""
        return self.encoder_matmul(x).float() + self.b_enc

    def skip_path(self, x: torch.Tensor) -> torch.Tensor | float:
        if self.W_skip is None:
            return 0.0
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.cfg.matmul_dtype == "bfloat16"):
            return torch.bmm(x / self.s_in[:, None, None], self.W_skip).float()

    def decode_sparse(self, rows: torch.Tensor, features: torch.Tensor, values: torch.Tensor, n_rows: int) -> torch.Tensor:
        """Sum of `values` x decoder rows: entry i adds values[i] * W_dec[layer of row i, features[i]] to row rows[i]
        (rows sorted, `n_rows` = n_layers x B) -> [n_rows, d]. A gather-sum, so the ~k active features of a token cost
        k rows of the decoder, not all of it."""
        n_layers, d_sae, d = self.W_dec.shape
        per_layer = n_rows // n_layers
        counts = torch.bincount(rows, minlength=n_rows)
        offsets = torch.cumsum(counts, 0) - counts
        flat = (rows // per_layer) * d_sae + features
        return F.embedding_bag(flat, self.W_dec.reshape(-1, d), offsets, mode="sum", per_sample_weights=values)

    def batch_topk(self, product: torch.Tensor, step: int | None = None,
                   typical: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """From `encoder_matmul`'s product: keep the k x B largest positive pre-activations of each layer (of the
        `typical` tokens [n_layers, B] if given) -> (rows, features, values) for `decode_sparse`, and the smallest kept
        value per layer; at a training `step`, marks the features that fired. Selected without gradients, then only the
        kept values are read with them (a gather)."""
        n_layers, B, d_sae = product.shape
        with torch.no_grad():
            scores = product + self.b_enc.to(product.dtype)
            if typical is not None:
                scores[~typical] = -torch.inf  # in place, on the few rows of outliers only
            scores = scores.reshape(n_layers, -1)
            kept = scores.topk(min(self.cfg.k * B, scores.shape[1]), dim=1, sorted=False).indices.sort(dim=1).values
            features = kept % d_sae
        values = product.reshape(n_layers, -1).gather(1, kept).float() + self.b_enc[:, 0].gather(1, features)
        positive = values > 0
        with torch.no_grad():
            smallest = torch.where(positive, values, torch.inf).min(1).values
            if step is not None:
                hits = torch.zeros(n_layers, d_sae, device=product.device).scatter_add_(1, features, positive.float())
                self.last_fired[hits > 0] = step
        rows = torch.arange(n_layers, device=product.device)[:, None] * B + kept // d_sae
        keep = positive.reshape(-1)
        return rows.reshape(-1)[keep], features.reshape(-1)[keep], values.reshape(-1)[keep], smallest

    def reconstruct(self, x: torch.Tensor, typical: torch.Tensor, step: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """BatchTopK's reconstruction of a batch x [n_layers, B, d] (`typical` as in `batch_topk`) -> (the encoder
        product, the kept activations' rows and values, the reconstruction [n_layers, B, d] in training units)."""
        n_layers, B, _ = x.shape
        product = self.encoder_matmul(x)
        rows, features, values, _ = self.batch_topk(product, step, typical)
        recon = self.decode_sparse(rows, features, values, n_layers * B).reshape(n_layers, B, -1) + self.b_dec + self.skip_path(x)
        return product, rows, values, recon

    @torch.no_grad()
    def calibrate(self, x_buf: torch.Tensor, y_buf: torch.Tensor, batches: int = 64) -> None:
        """The inference threshold per layer, with the final weights: the mean over `batches` training minibatches
        of the smallest activation BatchTopK keeps (Bussmann et al.), so a token's L0 is k on average without a batch.
        Selected as in training, outlier tokens apart (their targets say which they are)."""
        n = x_buf.shape[1]
        draw = torch.Generator(device=x_buf.device).manual_seed(self.cfg.seed)  # the training's own draws untouched
        picks = torch.randperm(n, generator=draw, device=x_buf.device)[: batches * self.cfg.minibatch].split(self.cfg.minibatch)
        device = self.W_enc.device

        def smallest_kept(mb: torch.Tensor) -> torch.Tensor:
            typical = self.typical(y_buf[:, mb].to(device).float() / self.s_out[:, None, None])
            return self.batch_topk(self.encoder_matmul(x_buf[:, mb].to(device).float()), typical=typical)[3]

        smallest = torch.stack([smallest_kept(mb) for mb in picks])
        self.threshold.copy_(torch.nan_to_num(smallest, posinf=float("nan")).nanmean(0).nan_to_num(0.0))

    def aux_loss(self, product: torch.Tensor, error: torch.Tensor, step: int) -> torch.Tensor:
        """Dead features (silent for `dead_tokens` tokens) reconstruct the main error: the d/2 largest per token.

        Only the dead columns are gathered (padded to the layer with most), so the decoder is a dense [B x dead] matmul
        over their rows: a few hundred dead features cost a small matmul, where a gather-sum of d/2 rows a token cost
        more than the rest of the step."""
        n_layers, B, d_sae = product.shape
        dead = (step - self.last_fired) * B > self.cfg.dead_tokens
        m = int(dead.sum(1).max())
        if m == 0:
            return product.new_zeros((), dtype=torch.float32)
        columns = dead.to(torch.int8).sort(dim=1, descending=True, stable=True).indices[:, :m]  # dead ones first
        valid = dead.gather(1, columns)[:, None, :]
        pre = product.gather(2, columns[:, None, :].expand(-1, B, -1)).float() + self.b_enc[:, 0].gather(1, columns)[:, None, :]
        acts = torch.where(valid, torch.relu(pre), 0.0)
        k_aux = error.shape[-1] // 2
        if m > k_aux:  # the k_aux largest per token, selected without gradients
            with torch.no_grad():
                keep = torch.zeros_like(acts, dtype=torch.bool).scatter_(-1, acts.topk(k_aux, dim=-1).indices, True)
            acts = torch.where(keep, acts, 0.0)
        recon = torch.bmm(acts, self.W_dec.gather(1, columns[..., None].expand(-1, -1, self.W_dec.shape[-1])))
        return (recon - error).pow(2).sum(-1).mean(-1).sum()

    @torch.no_grad()
    def resample(self, x: torch.Tensor, y_n: torch.Tensor, silent_since: int, step: int, draw: torch.Generator) -> torch.Tensor:
        """Re-initialise the features silent since step `silent_since` on tokens of `x`, `y_n` [n_layers, N, d]
        (a sample of the buffer): each takes a token drawn with probability proportional to its squared error (typical
        tokens only); its decoder row becomes the unit error there, its encoder column the token's centred input direction
        at the norm of the layer's live columns, its bias such that it fires on the `resample_firing` of the sample that
        lies furthest along that direction (which holds that token unless others lie further out along it).
        -> the [n_layers, d_sae] mask of those features (whose optimiser state the caller resets)."""
        dead = self.last_fired <= silent_since
        typical = self.typical(y_n)
        error = (y_n - self.reconstruct(x, typical)[3]) * typical[..., None]
        weight = error.pow(2).sum(-1)
        x_n = x / self.s_in[:, None, None]
        firing = min(max(1, round(self.cfg.resample_firing * x.shape[1])), x.shape[1] - 1)
        for i in range(len(dead)):
            f = dead[i].nonzero().squeeze(1)
            if len(f) == 0 or weight[i].sum() <= 0:
                continue
            t = torch.multinomial(weight[i].cpu(), len(f), replacement=len(f) > int((weight[i] > 0).sum()), generator=draw)
            t = t.to(x.device)
            live = ~dead[i] if (~dead[i]).any() else torch.ones_like(dead[i])
            norm = self.W_enc[i][:, live].norm(dim=0).mean()
            self.W_dec[i, f] = F.normalize(error[i, t], dim=-1)
            self.W_enc[i, :, f] = (F.normalize(x_n[i, t] - x_n[i].mean(0), dim=-1) * norm).T
            top = (x_n[i] @ self.W_enc[i, :, f]).topk(firing + 1, dim=0).values  # [firing + 1, dead]
            self.b_enc[i, 0, f] = -(top[-2] + top[-1]) / 2  # halfway between the last that fires and the first that does not
        self.last_fired[dead] = step  # a fresh window before they count as dead again
        return dead

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    def export(self, model_name: str) -> list[Transcoder]:
        """Fold the scales back: z_raw = s_out * z, so W_dec keeps unit-norm rows; a BatchTopK transcoder becomes a
        JumpReLU one with its layer's threshold on every feature."""
        cfg, out = self.cfg, []
        for i, layer in enumerate(cfg.layers):
            s_in, s_out = self.s_in[i].item(), self.s_out[i].item()
            d = self.W_enc.shape[1]
            hook_in, hook_out = hook_names(cfg, layer)
            jump = cfg.activation == "batchtopk"
            tc_cfg = TranscoderConfig(layer=layer, d_in=d, d_sae=cfg.d_sae, d_out=d, hook_in=hook_in, hook_out=hook_out,
                                      model_name=model_name, activation="jumprelu" if jump else "relu")
            out.append(Transcoder(
                tc_cfg,
                (self.W_enc[i] * (s_out / s_in)).detach().clone(),
                (self.b_enc[i, 0] * s_out).detach().clone(),
                self.W_dec[i].detach().clone(),
                (self.b_dec[i, 0] * s_out).detach().clone(),
                W_skip=None if self.W_skip is None else (self.W_skip[i] * (s_out / s_in)).detach().clone(),
                threshold=torch.full((cfg.d_sae,), self.threshold[i].item() * s_out, device=self.threshold.device) if jump else None,
            ))
        return out


def learning_rate_factor(step: int, total: int, warmup: float, decay: float) -> float:
    """Linear warm-up over the first `warmup` of the steps, constant, then linear decay to 0 over the last `decay`."""
    up, down = max(1, round(warmup * total)), round(decay * total)
    if step < up:
        return (step + 1) / up
    if down and step >= total - down:
        return max(0.0, (total - step) / down)
    return 1.0


def train_transcoders(model, cfg: TrainConfig, out_dir: Path, progress: bool = True) -> TrainResult:
    """Train, evaluate on held-out contexts, and save one SAELens directory per layer under `out_dir`."""
    bad = [layer for layer in cfg.layers if not 0 <= layer < model.cfg.n_layers]
    if bad:
        raise TranscoderError(f"layer(s) {bad} outside the model's 0..{model.cfg.n_layers - 1}")
    if out_dir.exists() and not out_dir.is_dir():  # found out now, not after the training
        raise OutputError(f"{out_dir}: is a file, not a directory for the transcoders")
    if cfg.activation not in TRAIN_ACTIVATIONS:
        raise TranscoderError(f"unknown training activation {cfg.activation!r}: expected one of {', '.join(TRAIN_ACTIVATIONS)}")
    if cfg.activation == "batchtopk" and not 0 < cfg.k <= cfg.d_sae:
        raise TranscoderError(f"k = {cfg.k} must be between 1 and d_sae = {cfg.d_sae}")
    if cfg.activation == "batchtopk" and cfg.resamples > 0 and not (cfg.resample_firing is not None and 0 < cfg.resample_firing < 1):
        raise TranscoderError(f"resample_firing = {cfg.resample_firing} must lie strictly between 0 and 1")
    check_context(model, cfg.ctx_len)
    if dtype_name(model.W_E.dtype) != cfg.dtype:
        raise ValueError(f"the model runs in {dtype_name(model.W_E.dtype)}, the config says {cfg.dtype}")
    cfg = replace(cfg, matmul_dtype=matmul_dtype_for(cfg.matmul_dtype, model.W_E.device))
    torch.manual_seed(cfg.seed)
    tokens = token_contexts(model.tokenizer, cfg.dataset, cfg.n_tokens + cfg.eval_tokens, cfg.ctx_len)
    n_eval = max(1, -(-cfg.eval_tokens // cfg.ctx_len))
    eval_tokens, train_tokens = tokens[:n_eval], tokens[n_eval:]
    if len(train_tokens) == 0:
        raise TranscoderError("no training tokens: increase --tokens")
    started = time.perf_counter()
    x_buf, y_buf = _activation_buffer(model, train_tokens, cfg, progress)
    seconds = {"collect": time.perf_counter() - started}
    d, n, device = model.cfg.d_model, x_buf.shape[1], model.W_E.device
    first = torch.randperm(n, device=x_buf.device)[: min(n, 8192)]
    net = _StackedTranscoders(cfg, d, x_buf[:, first].float(), y_buf[:, first].float()).to(device)
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg.lr, fused=True)
    steps_per_epoch = -(-n // cfg.minibatch)
    total = cfg.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: learning_rate_factor(step, total, cfg.warmup, cfg.decay))
    curve = _Curve(model, net, cfg, x_buf, y_buf, eval_tokens, total)
    resample_at = resample_steps(cfg, total)
    resampled_at, draw = 0, torch.Generator(device=x_buf.device).manual_seed(cfg.seed)  # the training's own draws untouched
    bar = tqdm(total=total, desc="training", unit="step", disable=not progress)
    step, started = 0, time.perf_counter()
    for _ in range(cfg.epochs):
        for mb in torch.randperm(n, device=x_buf.device).split(cfg.minibatch):
            x, y_n = x_buf[:, mb].to(device).float(), y_buf[:, mb].to(device).float() / net.s_out[:, None, None]
            loss, mse, l0 = _step_loss(net, x, y_n, step)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            net.normalise_decoder()
            step += 1
            if step in resample_at:
                sample = torch.randperm(n, generator=draw, device=x_buf.device)[:RESAMPLE_TOKENS]
                dead = net.resample(x_buf[:, sample].to(device).float(), y_buf[:, sample].to(device).float() / net.s_out[:, None, None],
                                    silent_since(cfg, resampled_at, step), step, draw)
                _reset_optimiser_state(optimiser, net, dead)
                resampled_at = step
            bar.update()
            point = curve.record(step, step * cfg.minibatch, time.perf_counter() - started, optimiser.param_groups[0]["lr"],
                                 loss, mse, l0)
            if point is not None:
                bar.set_postfix(fvu=f"{point.fvu:.3f}", l0=f"{point.l0:.1f}", dead=f"{point.dead_fraction:.0%}")
    bar.close()
    if cfg.activation == "batchtopk":
        net.calibrate(x_buf, y_buf)
    seconds["train"] = time.perf_counter() - started - curve.ce_seconds
    seconds["curve_ce"] = curve.ce_seconds
    transcoders = net.export(getattr(model.cfg, "model_name", ""))
    started = time.perf_counter()
    outlier_features = _fit_outlier_features(net, transcoders, x_buf, y_buf) if cfg.outlier_feature else {}
    seconds["outlier_features"] = time.perf_counter() - started
    del x_buf, y_buf, curve.x_buf, curve.y_buf
    started = time.perf_counter()
    metrics = evaluate(model, TranscoderSet({t.layer: t for t in transcoders}), eval_tokens, cfg)
    seconds["evaluate"] = time.perf_counter() - started
    result = TrainResult(cfg, metrics, curve.points, {k: round(v, 2) for k, v in seconds.items()}, outlier_features)
    _save_atomically(transcoders, result, out_dir)
    return result


def _fit_outlier_features(net: _StackedTranscoders, transcoders: list[Transcoder], x_buf: torch.Tensor,
                          y_buf: torch.Tensor) -> dict[int, int]:
    """The exported `transcoders` (in place) each given a feature for the buffer's outlier tokens, as `typical` tells
    them (`outlier_features`) -> layer -> that feature, for the layers that have one."""
    device = net.s_out.device
    typical = torch.cat([net.typical(y_buf[:, at : at + 8192].to(device).float() / net.s_out[:, None, None]).cpu()
                         for at in range(0, y_buf.shape[1], 8192)], 1)
    fitted = {}
    for i, tc in enumerate(transcoders):
        feature = fit_outlier_feature(tc, x_buf[i], y_buf[i], ~typical[i])
        if feature is not None:
            fitted[tc.layer] = feature
    return fitted


def resample_steps(cfg: TrainConfig, total: int) -> set[int]:
    """The steps after which dead features are resampled: `resamples` of them, evenly spread before the decay, each
    followed by two dead windows (`dead_tokens`) of training at least. A resampled feature starts at the live features'
    scale and needs steps to learn: in a 128-step run (bench/train.py) the resampling 41 steps before the end left
    layer 10 at held-out FVU 4.6."""
    if cfg.activation != "batchtopk" or cfg.resamples <= 0:
        return set()
    before_decay = total - round(cfg.decay * total)
    settle = 2 * -(-cfg.dead_tokens // cfg.minibatch)
    return {s for i in range(cfg.resamples) if 0 < (s := round(before_decay * (i + 1) / (cfg.resamples + 1))) <= total - settle}


def silent_since(cfg: TrainConfig, previous: int, step: int) -> int:
    """A feature is resampled at `step` if it has not fired since the step this returns: the second half of the steps
    since the `previous` resampling, and at least `dead_tokens` tokens (so a short run's close resamplings do not take
    a rare feature for a dead one)."""
    return min((previous + step) // 2, step - -(-cfg.dead_tokens // cfg.minibatch))


def _reset_optimiser_state(optimiser: torch.optim.Optimizer, net: _StackedTranscoders, features: torch.Tensor) -> None:
    """Adam's moments of the `features` [n_layers, d_sae] zeroed: resampled weights start with no momentum."""
    for param, mask in ((net.W_dec, features[:, :, None]), (net.W_enc, features[:, None, :]), (net.b_enc, features[:, None, :])):
        for name in ("exp_avg", "exp_avg_sq"):
            if name in optimiser.state.get(param, {}):
                optimiser.state[param][name].masked_fill_(mask, 0.0)


def _step_loss(net: _StackedTranscoders, x: torch.Tensor, y_n: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss to minimise, squared error per layer ~ FVU, active features per token per layer) on one minibatch; the
    squared error is the typical tokens' (`outlier_factor`)."""
    cfg = net.cfg
    n_layers, B, _ = y_n.shape
    typical = net.typical(y_n)
    weight = typical.float() / typical.sum(-1, keepdim=True).clamp_min(1)

    def mse(recon: torch.Tensor) -> torch.Tensor:
        return ((recon - y_n).pow(2).sum(-1) * weight).sum(-1)

    if cfg.activation == "relu":
        z = torch.relu(net.pre_acts(x))
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.matmul_dtype == "bfloat16"):
            recon = torch.bmm(z, net.W_dec).float() + net.b_dec + net.skip_path(x)
        error = mse(recon)
        l1 = (z.sum(-1) * weight).sum(-1)  # decoder rows are unit norm, so this is the weighted L1
        with torch.no_grad():
            net.last_fired[(z > 0).any(1)] = step
        return (error + cfg.l1_coefficient * l1).sum(), error.detach(), (z > 0).sum(-1).float().mean(-1)
    product, rows, _, recon = net.reconstruct(x, typical, step)
    active = torch.bincount(rows // B, minlength=n_layers)
    error = mse(recon)
    aux = net.aux_loss(product, ((y_n - recon) * typical[..., None]).detach(), step)
    return error.sum() + cfg.aux_coefficient * aux, error.detach(), active.float() / B


class _Curve:
    """The training curve: `CURVE_POINTS` points over the run, `curve_ce` of them with CE recovered measured."""

    def __init__(self, model, net: _StackedTranscoders, cfg: TrainConfig, x_buf: torch.Tensor, y_buf: torch.Tensor,
                 eval_tokens: torch.Tensor, total: int):
        self.model, self.net, self.cfg, self.eval_tokens = model, net, cfg, eval_tokens
        self.x_buf, self.y_buf = x_buf, y_buf  # for `calibrate`
        self.every = max(1, total // CURVE_POINTS)
        self.ce_steps = {round(total * (i + 1) / cfg.curve_ce) for i in range(cfg.curve_ce)} if cfg.curve_ce else set()
        self.total = total
        self.points: list[CurvePoint] = []
        self.sums = [0.0, 0.0, 0.0, 0]  # loss, FVU, L0, steps since the last point
        self.ce_seconds = 0.0  # spent measuring CE recovered: not training time

    def record(self, step: int, tokens: int, seconds: float, lr: float, loss: torch.Tensor, mse: torch.Tensor,
               l0: torch.Tensor) -> CurvePoint | None:
        """Accumulate one step; every `every` steps (and at the last) average into a point."""
        self.sums[0] += loss.item()
        self.sums[1] += mse.mean().item()
        self.sums[2] += l0.mean().item()
        self.sums[3] += 1
        if step % self.every and step != self.total and step not in self.ce_steps:
            return None
        n = self.sums[3]
        silent_for = (step - self.net.last_fired) * self.cfg.minibatch
        window = self.cfg.dead_tokens if self.cfg.activation == "batchtopk" else n * self.cfg.minibatch
        point = CurvePoint(step, tokens, round(seconds - self.ce_seconds, 2), lr, self.sums[0] / n, self.sums[1] / n, self.sums[2] / n,
                           (silent_for > window).float().mean().item())
        if step in self.ce_steps:
            started = time.perf_counter()
            point.ce_recovered = self.ce_recovered()
            self.ce_seconds += time.perf_counter() - started
        self.points.append(point)
        self.sums = [0.0, 0.0, 0.0, 0]
        return point

    def ce_recovered(self) -> float:
        """All layers replaced by the transcoders as they stand (BatchTopK thresholds calibrated first), on the
        held-out tokens."""
        if self.cfg.activation == "batchtopk":
            self.net.calibrate(self.x_buf, self.y_buf)
        tset = TranscoderSet({t.layer: t for t in self.net.export(getattr(self.model.cfg, "model_name", ""))})
        return evaluate_transcoders(self.model, tset, self.eval_tokens, per_layer=False, progress=False).ce_recovered_all


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
        record = {"config": asdict(result.config), "metrics": [asdict(m) for m in result.metrics],
                  "curve": [asdict(p) for p in result.curve], "seconds": result.seconds,
                  "outlier_features": {str(layer): f for layer, f in result.outlier_features.items()}}
        (tmp / layout.TRAINING).write_text(json.dumps(record, indent=2))


def trained_contexts(transcoders: Path, dataset: str, ctx_len: int) -> int | None:
    """How many leading contexts of `dataset` (cut at `ctx_len`) the transcoders in `transcoders` were trained and
    checked on, from their training record; None when there is no record, or it is of another dataset or cut."""
    record_path = Path(transcoders) / layout.TRAINING
    try:
        c = json.loads(record_path.read_text())["config"]
    except (OSError, ValueError, KeyError):
        return None
    if c.get("dataset") != dataset or c.get("ctx_len") != ctx_len:
        return None
    return -(-(c["n_tokens"] + c["eval_tokens"]) // ctx_len)


def reusable(out_dir: Path, cfg: TrainConfig) -> TrainResult | None:
    """The saved result if `out_dir` holds a finished training run with exactly this config."""
    record_path = out_dir / layout.TRAINING
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
        # a field added since then reads as its default, except the training method's, which older runs predate
        legacy = {"activation": "relu", "warmup": 0.0, "decay": 0.0, "matmul_dtype": "float32", "outlier_factor": 0.0,
                  "resamples": 0, "outlier_feature": False, "resample_firing": None}
        recorded = TrainConfig(**{**legacy, **record["config"]})
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    if recorded != cfg:
        return None
    try:
        load_transcoders(out_dir)
    except TranscoderError:
        return None
    return TrainResult(cfg, [LayerMetrics(**m) for m in record["metrics"]], [CurvePoint(**p) for p in record.get("curve", [])],
                       record.get("seconds", {}), {int(layer): f for layer, f in record.get("outlier_features", {}).items()})
