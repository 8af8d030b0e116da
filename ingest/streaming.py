"""Bounded-memory selections over a stream of firing entries: ranking within cells, quantile-bin samples.

Both the streaming top-k (in `ingest.stats`) and the quantile-bin samples here keep, per cell, the
entries with the smallest keys; `rank_within_cells` is the one vectorised step they share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEVER = -(2**40)  # exponent of a feature that has not fired: any real exponent is larger


def rank_within_cells(cells: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, rank): `order` sorts the entries by cell, then float32 key ascending (ties keep input
    order); `rank[i]` is the position of entry `order[i]` within its cell. One integer sort: the key's
    bits, mapped to integers in the same order, go below the cell number (cells < 2^31)."""
    bits = keys.float().view(torch.int32).long()
    ordered = torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1) + 2**31  # IEEE order as 0 <= int < 2^32
    order = torch.argsort(cells * 2**32 + ordered, stable=True)
    _, counts = torch.unique_consecutive(cells[order], return_counts=True)
    rank = torch.arange(len(order), device=order.device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    return order, rank


def marked(cells: torch.Tensor, n_cells: int) -> torch.Tensor:
    """The distinct values of `cells`, ascending (a mask over all cells: cheaper than sorting many entries)."""
    mask = torch.zeros(n_cells, dtype=torch.bool, device=cells.device)
    mask[cells] = True
    return mask.nonzero()[:, 0]


def power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """2.0 ** exponent as float32, exactly (built from the bits; exponent in [-126, 127])."""
    return ((exponent.clamp(-126, 127) + 127) << 23).to(torch.int32).view(torch.float32)


def covering_exponent(maximum: torch.Tensor, n_bins: int) -> torch.Tensor:
    """[d_sae] int64: the smallest e with maximum <= n_bins * 2^e (NEVER where maximum is 0)."""
    m = maximum.double()
    e = torch.log2(torch.where(m > 0, m, 1.0) / n_bins).ceil().long()
    e += (m > n_bins * power_of_two(e).double()).long()  # log2 may round across a power of two
    e -= (m <= n_bins * power_of_two(e - 1).double()).long()
    return torch.where(m > 0, e, NEVER)


@dataclass
class QuantileSamples:
    """Per feature, up to `per_bin` examples drawn uniformly at random from each activation interval.

    Bins: (j * 2^e, (j+1) * 2^e] for j < n_bins, with e per feature the smallest exponent whose bins
    cover its running maximum, so they tile (0, max] in between n_bins/2 and n_bins intervals (the
    SAE-dashboard layout, with round bounds). Why this is exact in one pass: when the maximum outgrows
    the top bin, e grows by de and old bin j lies wholly inside new bin j >> de (power-of-two widths nest),
    so no kept example ever straddles an edge. Each firing entry draws a uniform random key and a bin
    keeps its `per_bin` smallest keys (a bottom-k sketch): the k smallest keys of a set are a uniform
    k-subset of it, and the k smallest keys of a union are among the k smallest of its parts, so a merge
    keeps the sample uniform. Memory is O(d_sae x n_bins x per_bin); each batch costs O(firing entries),
    and only entries whose key beats their bin's current k-th smallest are merged.
    """

    exponent: torch.Tensor  # [d_sae] int64: bin width 2^exponent; NEVER before the first firing
    count: torch.Tensor  # [d_sae, n_bins] int64: firing entries per bin
    key: torch.Tensor  # [d_sae, n_bins, per_bin] float32 random keys, ascending, inf where unused
    value: torch.Tensor  # [d_sae, n_bins, per_bin] float32 activation
    index: torch.Tensor  # [d_sae, n_bins, per_bin] int64 flat token index, -1 where unused
    generator: torch.Generator

    @classmethod
    def empty(cls, d_sae: int, n_bins: int, per_bin: int, seed: int = 0, device: torch.device | None = None) -> QuantileSamples:
        """No samples yet, on `device`; the keys are drawn on the CPU whatever the device, so a seed gives the same
        samples everywhere."""
        shape = (d_sae, n_bins, per_bin)
        return cls(
            torch.full((d_sae,), NEVER, dtype=torch.int64, device=device), torch.zeros(d_sae, n_bins, dtype=torch.int64, device=device),
            torch.full(shape, torch.inf, device=device), torch.zeros(shape, device=device),
            torch.full(shape, -1, dtype=torch.int64, device=device), torch.Generator().manual_seed(seed),
        )

    @property
    def n_bins(self) -> int:
        return self.count.shape[1]

    @property
    def per_bin(self) -> int:
        return self.key.shape[2]

    def update(self, cols: torch.Tensor, values: torch.Tensor, flat: torch.Tensor, maximum: torch.Tensor) -> None:
        """Add firing entries (feature `cols`, activation `values` > 0, token `flat`); `maximum` [d_sae]
        is the running maximum including them."""
        need = covering_exponent(maximum, self.n_bins)
        grow = (need > self.exponent).nonzero()[:, 0]
        if grow.numel():
            self._widen(grow, need[grow])
        cells = cols * self.n_bins + self.bin_of(values, self.exponent[cols])
        self.count.view(-1).index_add_(0, cells, torch.ones_like(cells))
        keys = torch.rand(len(values), generator=self.generator, device=self.generator.device).to(values.device)
        enter = keys < self.key.view(-1, self.per_bin)[cells, -1]
        if enter.any():
            self._merge(cells[enter], keys[enter], values[enter], flat[enter])

    def bin_of(self, values: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
        """j with j * 2^e < value <= (j+1) * 2^e (exact: scaling by a power of two does not round)."""
        return ((values * power_of_two(-exponent)).ceil().long() - 1).clamp(0, self.n_bins - 1)

    def _merge(self, cells: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, flat: torch.Tensor) -> None:
        """Merge candidates into their cells (feature * n_bins + bin), keeping each cell's smallest keys."""
        k = self.per_bin
        touched = marked(cells, self.count.numel())
        store = self.key.view(-1, k), self.value.view(-1, k), self.index.view(-1, k)
        all_cells = torch.cat([touched.repeat_interleave(k), cells])
        columns = [torch.cat([s[touched].reshape(-1), new]) for s, new in zip(store, (keys, values, flat))]
        order, rank = rank_within_cells(all_cells, columns[0])
        keep, rank = order[rank < k], rank[rank < k]
        for s, column in zip(store, columns):
            s[all_cells[keep], rank] = column[keep]

    def _widen(self, features: torch.Tensor, exponent: torch.Tensor) -> None:
        """Give `features` wider bins 2^exponent: old bin j joins new bin j >> (exponent - old exponent)."""
        n, k = self.n_bins, self.per_bin
        shift = (exponent - self.exponent[features]).clamp(max=62)  # a first firing shifts everything (empty) to bin 0
        at = features.device
        new_bin = torch.bitwise_right_shift(torch.arange(n, device=at)[None, :], shift[:, None])  # [F, n_bins]
        self.count[features] = torch.zeros(len(features), n, dtype=torch.int64, device=at).scatter_add_(1, new_bin, self.count[features])
        cells = (torch.arange(len(features), device=at)[:, None] * n + new_bin)[:, :, None].expand(-1, -1, k).reshape(-1)
        old = [s[features].reshape(-1) for s in (self.key, self.value, self.index)]
        order, rank = rank_within_cells(cells, old[0])
        keep, rank = order[rank < k], rank[rank < k]
        for s, column, blank in zip((self.key, self.value, self.index), old, (torch.inf, 0.0, -1)):
            fresh = torch.full((len(features) * n, k), blank, dtype=s.dtype, device=at)
            fresh[cells[keep], rank] = column[keep]
            s[features] = fresh.view(len(features), n, k)
        self.exponent[features] = exponent
