"""A feature's activation statistics and top examples, read from DIR/stats/ with DuckDB."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from catalog import layout
from catalog.errors import CatalogDirError, UnknownFeature
from catalog.layout import parse_feature_id
from queries.sql import connect


@dataclass
class Example:
    activation: float
    context: int
    pos: int
    text: str  # the window around the firing token, which is shown in [brackets]


@dataclass
class FeatureStats:
    id: str
    frequency: float
    mean_act: float
    max_act: float
    live: bool
    q50: float
    q90: float
    q99: float
    examples: list[Example] = field(default_factory=list)


def feature_stats(root: Path, fid: str, k: int = 10) -> FeatureStats:
    parse_feature_id(fid)
    if not (root / layout.STATS / "features.parquet").is_file():
        raise CatalogDirError(f"{root}: no activation statistics; run `circuit-catalog ingest ... --dataset D --tokens N`")
    con = connect(root)
    try:
        row = con.execute("SELECT frequency, mean_act, max_act, live, q50, q90, q99 FROM stats WHERE id = ?", [fid]).fetchone()
        if row is None:
            raise UnknownFeature(f"unknown feature {fid}: not in this catalog's statistics")
        examples = con.execute(
            "SELECT activation, context, pos, window_start, window_tokens FROM top_examples WHERE feature = ? AND rank < ? ORDER BY rank",
            [fid, k],
        ).fetchall()
        needed = sorted({t for *_, window in examples for t in window})
        text = dict(con.execute("SELECT id, text FROM tokens WHERE list_contains(?, id)", [needed]).fetchall()) if needed else {}
    finally:
        con.close()
    out = FeatureStats(fid, *row)
    for activation, context, pos, start, window in examples:
        marked = [f"[{text[t]}]" if start + i == pos else text[t] for i, t in enumerate(window)]
        out.examples.append(Example(float(activation), int(context), int(pos), "".join(marked)))
    return out
