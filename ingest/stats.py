"""Activation statistics over a dataset, collected in one streaming pass with bounded memory.

Per feature: firing count and frequency, mean and max activation, a histogram of log10(activation)
over fixed bins (so quantiles can be read off it), the top-k activating examples kept by a streaming
top-k, and a few examples sampled uniformly from each interval of its activation range (the SAE
dashboards' layout; see `ingest.streaming.QuantileSamples`). Memory is O(features x (bins + k +
intervals x per-interval)) whatever the number of tokens. BOS positions are left out, as in training:
their activations are attention-sink outliers.

Per layer: the mean over the same tokens of 1 / the norm scale at the transcoder's input (`ln2.hook_scale`, the
RMSNorm/LayerNorm denominator; 1 for a transcoder reading the raw residual stream), `inv_scale`. Weights-only edges
leave the reader's scale out (`ingest.pullbacks`); multiplied by this they read as a typical in-context effect, on one
scale across layers (`queries.lookups`, `--normalise`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from circuit_catalog.catalog import layout
from circuit_catalog.catalog.layout import HIST_BINS, HIST_LOG10_MAX, HIST_LOG10_MIN, histogram_log10_edges
from circuit_catalog.ingest.residual import scale_hook
from circuit_catalog.ingest.streaming import QuantileSamples, marked, power_of_two, rank_within_cells
from circuit_catalog.ingest.transcoder import TranscoderSet
from circuit_catalog.progress import tqdm

INV_SCALE_DEFINITION = ("stats/layers.parquet inv_scale: mean over the counted tokens (BOS left out) of 1 / the norm "
                        "scale at the transcoder's input (ln2.hook_scale); 1 for a reader of the raw residual stream")
LIVE_FREQUENCY = 1e-4  # the seed's threshold: live = fires more often than once in 10,000 tokens
QUANTILE_BINS, PER_BIN = 12, 5  # intervals of (0, max] (between 7 and 12 of them) and examples kept per interval


@dataclass
class LayerStats:
    """Accumulators for one layer's features."""

    fired: torch.Tensor  # [d_sae] int64: tokens with activation > 0
    total: torch.Tensor  # [d_sae] float64: sum of activations
    maximum: torch.Tensor  # [d_sae] float32
    histogram: torch.Tensor  # [d_sae, HIST_BINS] int64 over log10(activation)
    top_values: torch.Tensor  # [d_sae, k] float32, descending
    top_index: torch.Tensor  # [d_sae, k] int64: flat token index (context * ctx_len + pos), -1 if unused
    samples: QuantileSamples  # examples drawn from each interval of the activation range
    inv_scale: torch.Tensor  # [] float64: sum of 1 / the input's norm scale over the counted tokens

    @classmethod
    def empty(cls, d_sae: int, k: int, n_bins: int = QUANTILE_BINS, per_bin: int = PER_BIN, seed: int = 0,
              device: torch.device | None = None) -> LayerStats:
        """Accumulators on `device`, the device of the activations they will take."""
        return cls(
            torch.zeros(d_sae, dtype=torch.int64, device=device), torch.zeros(d_sae, dtype=torch.float64, device=device),
            torch.zeros(d_sae, device=device), torch.zeros(d_sae, HIST_BINS, dtype=torch.int64, device=device),
            torch.zeros(d_sae, k, device=device), torch.full((d_sae, k), -1, dtype=torch.int64, device=device),
            QuantileSamples.empty(d_sae, n_bins, per_bin, seed, device), torch.zeros((), dtype=torch.float64, device=device),
        )

    def cpu(self) -> LayerStats:
        """The accumulators on the CPU, for writing (the generator stays where it is: it draws on the CPU)."""
        def moved(obj):
            return replace(obj, **{f.name: getattr(obj, f.name).cpu() for f in fields(obj) if isinstance(getattr(obj, f.name), torch.Tensor)})
        return replace(moved(self), samples=moved(self.samples))

    def update(self, acts: torch.Tensor, flat_index: torch.Tensor) -> None:
        """acts [n_tokens, d_sae] (>= 0); flat_index [n_tokens] global token positions.

        One dense pass finds the firing entries; everything after works on those few (features are
        sparse), and the top-k merge touches only features whose new values beat their k-th best.
        """
        rows, cols = (acts > 0).nonzero(as_tuple=True)
        if not rows.numel():
            return
        values = acts[rows, cols].float()  # float32 accumulators whatever the compute dtype
        d_sae, k = self.top_values.shape
        self.fired += torch.bincount(cols, minlength=d_sae)
        self.total.index_add_(0, cols, values.double())
        self.maximum = torch.maximum(self.maximum, torch.zeros_like(self.maximum).scatter_reduce_(0, cols, values, "amax"))
        self.histogram.view(-1).index_add_(0, cols * HIST_BINS + bin_of(values), torch.ones_like(cols))
        flat = flat_index[rows]
        self.samples.update(cols, values, flat, self.maximum)
        better = values > self.top_values[cols, -1]
        if not better.any():
            return
        new_c, new_v, new_i = cols[better], values[better], flat[better]
        touched = marked(new_c, d_sae)
        all_c = torch.cat([touched.repeat_interleave(k), new_c])
        all_v = torch.cat([self.top_values[touched].reshape(-1), new_v])
        all_i = torch.cat([self.top_index[touched].reshape(-1), new_i])
        order, rank = rank_within_cells(all_c, -all_v)  # by feature, then value descending
        keep, rank = order[rank < k], rank[rank < k]
        self.top_values[all_c[keep], rank] = all_v[keep]
        self.top_index[all_c[keep], rank] = all_i[keep]


def bin_of(acts: torch.Tensor) -> torch.Tensor:
    """Histogram bin of positive activations (clamped into the fixed log10 range)."""
    position = (acts.log10() - HIST_LOG10_MIN) / (HIST_LOG10_MAX - HIST_LOG10_MIN) * HIST_BINS
    return position.floor().clamp(0, HIST_BINS - 1).to(torch.int64)


def bin_edges() -> np.ndarray:
    """The HIST_BINS + 1 activation values bounding the histogram bins."""
    return 10 ** np.array(histogram_log10_edges())


@torch.no_grad()
def collect_stats(model, tset: TranscoderSet, tokens: torch.Tensor, k: int = 20, batch_contexts: int = 8,
                  progress: bool = True, layers: list[int] | None = None) -> dict[int, LayerStats]:
    """One pass over `tokens` [n_contexts, ctx_len]: the statistics of every layer of `layers` (None: all) from one
    forward pass per batch (run up to the last of them).

    A layer's statistics are the same whichever other layers are collected with it (its own accumulators, seeded by
    its layer; the same batches): the statistics are sharded by layer group across workers (`ingest.job.write_stats`).
    Accumulated on the model's device (batches of `tokens` are moved there), returned on the CPU."""
    device = model.W_E.device
    chosen = [tset[layer] for layer in (tset.layers if layers is None else layers)]
    stats = {tc.layer: LayerStats.empty(tc.cfg.d_sae, k, seed=tc.layer, device=device) for tc in chosen}
    scales = {tc.layer: scale_hook(tc) for tc in chosen}
    hooks = [tc.cfg.hook_in for tc in chosen] + [h for h in scales.values() if h is not None]
    ctx_len = tokens.shape[1]
    bar = tqdm(total=tokens.numel(), desc="activation statistics", unit="tok", disable=not progress)
    for start in range(0, len(tokens), batch_contexts):
        batch = tokens[start : start + batch_contexts].to(device)
        _, cache = model.run_with_cache(batch, names_filter=hooks, stop_at_layer=max(stats) + 1)
        flat = torch.arange(start * ctx_len, (start + len(batch)) * ctx_len, device=device)
        for tc in chosen:
            acts = tc.encode(cache[tc.cfg.hook_in])  # [batch, ctx_len, d_sae]
            acts[:, 0] = 0  # BOS left out (zeroing is cheaper than slicing the inputs into a copy)
            stats[tc.layer].update(acts.view(-1, tc.cfg.d_sae), flat)
            hook = scales[tc.layer]  # [batch, ctx_len, 1]; BOS left out here too
            stats[tc.layer].inv_scale += cache[hook][:, 1:].double().reciprocal().sum() if hook else batch[:, 1:].numel()
        bar.update(batch.numel())
    bar.close()
    return {layer: s.cpu() for layer, s in stats.items()}


def quantiles_from_histogram(histogram: np.ndarray, fired: np.ndarray, qs: tuple[float, ...]) -> np.ndarray:
    """[d_sae, len(qs)] approximate quantiles of the positive activations (upper edge of the bin reached)."""
    edges = bin_edges()
    cumulative = histogram.cumsum(1)
    out = np.zeros((histogram.shape[0], len(qs)), dtype=np.float32)
    for j, q in enumerate(qs):
        target = np.ceil(q * fired)[:, None]
        first = (cumulative >= np.maximum(target, 1)).argmax(1)
        out[:, j] = np.where(fired > 0, edges[first + 1], 0.0)
    return out


WINDOW_BEFORE, WINDOW_AFTER = 8, 4  # context tokens kept around each example


def stats_tables(tset: TranscoderSet, stats: dict[int, LayerStats], tokens: torch.Tensor) -> dict:
    """Arrow tables for `DIR/stats/`, by file name: features, top_examples, quantile_examples, tokens, layers."""
    import pyarrow as pa
    from circuit_catalog.catalog.ids import feature_ids

    n_contexts, ctx_len = tokens.shape
    n_counted = n_contexts * (ctx_len - 1)
    feature_tables, top_tables, quantile_tables = [], [], []
    flat_tokens = tokens.reshape(-1).numpy()
    for tc in tset:
        s = stats[tc.layer]
        fired = s.fired.numpy()
        hist = s.histogram.numpy()
        q = quantiles_from_histogram(hist, fired, (0.5, 0.9, 0.99))
        d_sae = tc.cfg.d_sae
        ids = feature_ids(tc.layer, pa.array(np.arange(d_sae)))
        frequency = fired / n_counted
        feature_tables.append(pa.table({
            "id": ids, "layer": pa.array(np.full(d_sae, tc.layer), pa.int32()), "index": pa.array(np.arange(d_sae), pa.int32()),
            "fired": pa.array(fired), "frequency": pa.array(frequency),
            "mean_act": pa.array(np.where(fired > 0, s.total.numpy() / np.maximum(fired, 1), 0.0).astype(np.float32)),
            "max_act": pa.array(s.maximum.numpy()), "live": pa.array(frequency > LIVE_FREQUENCY),
            "q50": pa.array(q[:, 0]), "q90": pa.array(q[:, 1]), "q99": pa.array(q[:, 2]),
            "log10_histogram": pa.array(list(hist), pa.list_(pa.int64())),
        }))
        feature, rank = np.nonzero((s.top_values > 0).numpy())
        top_tables.append(pa.table({
            "feature": feature_ids(tc.layer, pa.array(feature)), "rank": pa.array(rank, pa.int32()),
            **example_columns(s.top_index.numpy()[feature, rank], s.top_values.numpy()[feature, rank], flat_tokens, ctx_len),
        }))
        quantile_tables.append(quantile_table(tc.layer, s.samples, flat_tokens, ctx_len))
    dataset_tokens = pa.table({
        "context": pa.array(np.repeat(np.arange(n_contexts), ctx_len)), "pos": pa.array(np.tile(np.arange(ctx_len), n_contexts), pa.int32()),
        "token_id": pa.array(flat_tokens),
    })
    layers = pa.table({
        "layer": pa.array([tc.layer for tc in tset], pa.int32()), "hook_scale": pa.array([scale_hook(tc) for tc in tset], pa.string()),
        "inv_scale": pa.array([stats[tc.layer].inv_scale.item() / n_counted for tc in tset], pa.float64()),
    }, schema=layout.LAYER_SCALE_SCHEMA)
    return {"features": pa.concat_tables(feature_tables), "top_examples": pa.concat_tables(top_tables),
            "quantile_examples": pa.concat_tables(quantile_tables), "tokens": dataset_tokens, "layers": layers}


def quantile_table(layer: int, samples: QuantileSamples, flat_tokens: np.ndarray, ctx_len: int):
    """One row per sampled example: its feature, interval (`bin`, `lower` < activation <= `upper`,
    `bin_count` firing tokens in it), `rank` by activation within the interval, then the example columns."""
    import pyarrow as pa
    from circuit_catalog.catalog.ids import feature_ids

    feature, bin_, slot = (samples.index >= 0).nonzero(as_tuple=True)
    values = samples.value[feature, bin_, slot]
    order, rank = rank_within_cells(feature * samples.n_bins + bin_, -values)
    feature, bin_, slot, values = feature[order], bin_[order], slot[order], values[order]
    width = power_of_two(samples.exponent[feature])
    return pa.table({
        "feature": feature_ids(layer, pa.array(feature.numpy())), "bin": pa.array(bin_.numpy(), pa.int32()),
        "lower": pa.array((bin_ * width).numpy()), "upper": pa.array(((bin_ + 1) * width).numpy()),
        "bin_count": pa.array(samples.count[feature, bin_].numpy()), "rank": pa.array(rank.numpy(), pa.int32()),
        **example_columns(samples.index[feature, bin_, slot].numpy(), values.numpy(), flat_tokens, ctx_len),
    })


def example_columns(flat: np.ndarray, activation: np.ndarray, flat_tokens: np.ndarray, ctx_len: int) -> dict:
    """The columns every example table shares: context, pos, activation, token_id, window_start and
    window_tokens (WINDOW_BEFORE tokens before the firing one to WINDOW_AFTER after, within its context).
    Vectorised: a catalog holds millions of examples."""
    import pyarrow as pa

    context, pos = flat // ctx_len, flat % ctx_len
    start = np.maximum(0, pos - WINDOW_BEFORE)
    length = np.minimum(ctx_len, pos + WINDOW_AFTER + 1) - start
    offsets = np.concatenate([[0], np.cumsum(length)])
    gather = np.repeat(context * ctx_len + start - offsets[:-1], length) + np.arange(offsets[-1])
    return {
        "context": pa.array(context, pa.int64()), "pos": pa.array(pos, pa.int32()), "activation": pa.array(activation, pa.float32()),
        "token_id": pa.array(flat_tokens[flat], pa.int64()), "window_start": pa.array(start, pa.int32()),
        "window_tokens": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat_tokens[gather], pa.int64())),
    }
