"""Quantile-bin sampling: exact bins and counts against brute force, uniform samples across widenings."""

from __future__ import annotations

import math

import torch
from circuit_catalog.ingest.streaming import QuantileSamples, covering_exponent, rank_within_cells

N_BINS, PER_BIN = 12, 5


def stream(seed: int = 0, n_features: int = 6, batches: int = 12):
    """Batches of (cols, values, flat) whose scale grows, so every feature's bins widen several times."""
    g = torch.Generator().manual_seed(seed)
    flat = 0
    for b in range(batches):
        n = 40
        cols = torch.randint(0, n_features, (n,), generator=g)
        values = torch.rand(n, generator=g) * 1.7 ** b * (1 + cols)
        yield cols, values, torch.arange(flat, flat + n)
        flat += n


def run(seed: int, n_features: int = 6) -> tuple[QuantileSamples, torch.Tensor, torch.Tensor, torch.Tensor]:
    samples = QuantileSamples.empty(n_features, N_BINS, PER_BIN, seed=seed)
    maximum = torch.zeros(n_features)
    seen = []
    for cols, values, flat in stream(n_features=n_features):
        maximum = torch.maximum(maximum, torch.zeros(n_features).scatter_reduce_(0, cols, values, "amax"))
        samples.update(cols, values, flat, maximum)
        seen.append((cols, values, flat))
    cols, values, flat = (torch.cat(x) for x in zip(*seen))
    return samples, cols, values, flat


def test_covering_exponent_is_the_smallest():
    m = torch.tensor([1e-6, 0.3, 12.0, 12.000001, 24.0, 7.73, 1e4, 0.0])
    e = covering_exponent(m, N_BINS)
    for mi, ei in zip(m.tolist()[:-1], e.tolist()[:-1]):
        assert mi <= N_BINS * 2.0**ei and not mi <= N_BINS * 2.0 ** (ei - 1)
    assert e[-1] < -1000  # never fired


def test_bins_and_counts_equal_brute_force():
    samples, cols, values, flat = run(seed=0)
    for f in range(samples.count.shape[0]):
        v, idx = values[cols == f], flat[cols == f]
        width = 2.0 ** samples.exponent[f].item()
        assert N_BINS / 2 < math.ceil(v.max().item() / width) <= N_BINS  # the bins tile (0, max]
        for j in range(N_BINS):
            inside = (v > j * width) & (v <= (j + 1) * width)
            assert samples.count[f, j] == inside.sum()
            kept = samples.index[f, j][samples.index[f, j] >= 0]
            assert len(kept) == min(PER_BIN, int(inside.sum()))
            assert set(kept.tolist()) <= set(idx[inside].tolist())  # real entries of this very bin
            for i, value in zip(kept.tolist(), samples.value[f, j][: len(kept)].tolist()):
                assert value == values[flat == i].item()


def test_samples_are_uniform_within_a_bin():
    """Over many seeds, every entry of a bin is kept about equally often (per_bin / count of the time)."""
    runs = 200
    hits: dict[tuple[int, int], torch.Tensor] = {}
    for seed in range(runs):
        samples, _, _, flat = run(seed, n_features=2)
        for f in range(2):
            for j in range(N_BINS):
                kept = samples.index[f, j][samples.index[f, j] >= 0]
                if (f, j) not in hits:
                    hits[(f, j)] = torch.zeros(len(flat))
                hits[(f, j)][kept] += 1
    checked = 0
    for (f, j), h in hits.items():
        members = h.nonzero()[:, 0]
        m = samples.count[f, j].item()
        p = PER_BIN / m if m else 0
        if not 0.05 <= p <= 0.5:  # too few entries to be interesting, or too many to expect each of them
            continue
        assert len(members) == m  # every entry of the bin gets picked some time
        sd = math.sqrt(runs * p * (1 - p))
        assert ((h[members] - runs * p).abs() < 5 * sd).all()
        checked += 1
    assert checked >= 5, checked


def test_rank_within_cells():
    cells = torch.tensor([2, 0, 2, 0, 2, 0, 2])
    keys = torch.tensor([0.5, 0.1, 0.2, -0.3, 0.2, float("inf"), -2.0])
    order, rank = rank_within_cells(cells, keys)
    assert order.tolist() == [3, 1, 5, 6, 2, 4, 0] and rank.tolist() == [0, 1, 2, 0, 1, 2, 3]
