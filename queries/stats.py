"""A feature's activation statistics, top examples and quantile-bin examples, read from DIR/stats/ with DuckDB."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from circuit_catalog.catalog import layout
from circuit_catalog.catalog.ids import parse_feature_id
from circuit_catalog.queries.sql import connect, views

from circuit_catalog.errors import CatalogDirError, UnknownFeature


@dataclass
class Example:
    activation: float
    context: int
    pos: int
    tokens: list[str]  # the window around the firing token, as token texts
    firing: int  # index of the firing token in `tokens`
    text: str = field(init=False)  # the window as one string, the firing token in [brackets]

    def __post_init__(self) -> None:
        self.text = "".join(f"[{t}]" if i == self.firing else t for i, t in enumerate(self.tokens))


@dataclass
class Interval:
    """Examples sampled uniformly from the firing tokens with lower < activation <= upper."""

    lower: float
    upper: float
    count: int  # firing tokens in the interval
    frequency: float  # the same as a fraction of all counted tokens
    examples: list[Example] = field(default_factory=list)


@dataclass
class Component:
    """One model component's mean direct term in a feature's pre-activation over its top examples (`ingest.components`):
    `component` is `embed`, a head (`L7H3`), `MLP3`, `bias` or `rest` (the terms not kept)."""

    component: str
    kind: str
    layer: int | None
    head: int | None
    contribution: float
    examples: int


@dataclass
class FeatureStats:
    id: str
    fired: int
    frequency: float
    mean_act: float
    max_act: float
    live: bool
    q50: float
    q90: float
    q99: float
    log10_histogram: list[int]  # counts circuit_catalog.over catalog.layout.histogram_log10_edges()
    examples: list[Example] = field(default_factory=list)
    intervals: list[Interval] = field(default_factory=list)  # highest first
    components: list[Component] = field(default_factory=list)  # largest first, then bias and rest; empty if not tallied


_EXAMPLE = "activation, context, pos, window_start, window_tokens"


def feature_stats(root: Path, fid: str, k: int = 10) -> FeatureStats:
    """Figures, the top `k` examples and the quantile-bin examples of one feature."""
    parse_feature_id(fid)
    if not layout.stats_file(root, "features").is_file():
        raise CatalogDirError(f"{root}: no activation statistics; run `circuit-catalog ingest ... --dataset D --tokens N`")
    con = connect(root)
    try:
        row = con.execute("SELECT fired, frequency, mean_act, max_act, live, q50, q90, q99, log10_histogram FROM stats WHERE id = ?", [fid]).fetchone()
        if row is None:
            raise UnknownFeature(f"unknown feature {fid}: not in this catalog's statistics")
        top = con.execute(f"SELECT {_EXAMPLE} FROM top_examples WHERE feature = ? AND rank < ? ORDER BY rank", [fid, k]).fetchall()
        binned = con.execute(
            f"SELECT lower, upper, bin_count, {_EXAMPLE} FROM quantile_examples WHERE feature = ? ORDER BY bin DESC, rank", [fid]
        ).fetchall() if "quantile_examples" in views(root) else []
        components = _components(con, root, fid)
        needed = sorted({t for r in top + binned for t in r[-1]})
        text = dict(con.execute("SELECT id, text FROM tokens WHERE list_contains(?, id)", [needed]).fetchall()) if needed else {}
    finally:
        con.close()
    out = FeatureStats(fid, *row[:8], list(row[8]), components=components)

    def example(activation, context, pos, start, window) -> Example:
        return Example(float(activation), int(context), int(pos), [text[t] for t in window], pos - start)

    out.examples = [example(*r) for r in top]
    for lower, upper, count, *rest in binned:
        if not out.intervals or out.intervals[-1].lower != lower:
            out.intervals.append(Interval(float(lower), float(upper), int(count), count * out.frequency / out.fired))
        out.intervals[-1].examples.append(example(*rest))
    return out


def _components(con, root: Path, fid: str) -> list[Component]:
    if "components" not in views(root):
        return []
    rows = con.execute("SELECT component, kind, layer, head, contribution, examples FROM components WHERE feature = ? "
                       "ORDER BY kind IN ('bias', 'rest'), kind = 'rest', abs(contribution) DESC", [fid]).fetchall()
    return [Component(*r) for r in rows]


def feature_components(root: Path, fid: str) -> list[Component]:
    """A feature's component tallies, or a one-line error saying why there are none."""
    parse_feature_id(fid)
    if not layout.stats_file(root, "components").is_file():
        reason = ""
        if layout.stats_info(root).is_file():
            reason = json.loads(layout.stats_info(root).read_text()).get("components_skipped", "")
        raise CatalogDirError(f"{root}: no component tallies" + (f" ({reason})" if reason else
                              "; they are collected with the statistics: `circuit-catalog ingest ... --dataset D --tokens N`"))
    con = connect(root)
    try:
        out = _components(con, root, fid)
        if not out and con.execute("SELECT count(*) FROM stats WHERE id = ?", [fid]).fetchall()[0][0] == 0:
            raise UnknownFeature(f"unknown feature {fid}: not in this catalog's statistics")
    finally:
        con.close()
    return out
