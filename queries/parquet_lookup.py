"""Lookups answered straight from a catalog directory's Parquet files with DuckDB.

They need no graph store, so they work the moment an ingest finishes; they are also the reference
the graph-store queries are tested against.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import duckdb

from catalog import layout
from catalog.errors import CatalogDirError, UserError
from catalog.manifest import Manifest

FEATURE_ID = re.compile(r"^L(\d+)/(\d+)$")


class UnknownFeature(UserError):
    """A feature id that is malformed or not in the catalog."""


@dataclass
class Edge:
    feature: str
    weight: float
    tokens: list[str]  # the other feature's top extended de-embedding tokens, for orientation


@dataclass
class FeatureCard:
    id: str
    layer: int
    index: int
    deembed: list[tuple[str, float]]
    deembed_extended: list[tuple[str, float]]
    logits: list[tuple[str, float]]


def parse_feature_id(fid: str) -> tuple[int, int]:
    m = FEATURE_ID.match(fid)
    if not m:
        raise UnknownFeature(f"malformed feature id {fid!r}: expected L<layer>/<index>, e.g. L8/355")
    return int(m.group(1)), int(m.group(2))


class ParquetCatalog:
    """Read-only access to one catalog directory."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.manifest = Manifest.read(self.root)
        if self.manifest.status != "complete":
            raise CatalogDirError(f"{self.root}: the ingest has not finished; rerun the same ingest command to complete it")
        self.con = duckdb.connect()

    def check_feature(self, fid: str) -> tuple[int, int]:
        layer, index = parse_feature_id(fid)
        width = self.manifest.d_sae.get(str(layer))
        if width is None or index >= width:
            raise UnknownFeature(f"unknown feature {fid}: the catalog has layers {self.manifest.layers}" + (
                f" and layer {layer} has {width} features" if width is not None else ""))
        return layer, index

    def card(self, fid: str) -> FeatureCard:
        layer, index = self.check_feature(fid)
        row = self.con.execute(
            "SELECT * FROM read_parquet($p) WHERE id = $id", {"p": str(self.root / layout.FEATURES), "id": fid}
        ).fetchone()
        cols = [d[0] for d in self.con.description]
        r = dict(zip(cols, row))

        def pairs(prefix: str) -> list[tuple[str, float]]:
            return list(zip(r[f"{prefix}_tokens"] or [], r[f"{prefix}_weights"] or []))

        return FeatureCard(fid, layer, index, pairs("deembed"), pairs("deembed_ext"), pairs("logit"))

    def upstream(self, fid: str, k: int = 10, layer: int | None = None) -> list[Edge]:
        """Strongest incoming pullback edges by |weight|, strongest first."""
        dst_layer, _ = self.check_feature(fid)
        parts = [layout.pullback_part(self.root, lo, dst_layer) for lo in self.manifest.layers if lo < dst_layer]
        return self._edges(parts, "dst", "src", fid, k, layer)

    def downstream(self, fid: str, k: int = 10, layer: int | None = None) -> list[Edge]:
        """Strongest outgoing pullback edges by |weight|, strongest first."""
        src_layer, _ = self.check_feature(fid)
        parts = [layout.pullback_part(self.root, src_layer, hi) for hi in self.manifest.layers if hi > src_layer]
        return self._edges(parts, "src", "dst", fid, k, layer)

    def _edges(self, parts: list[Path], this: str, other: str, fid: str, k: int, layer: int | None) -> list[Edge]:
        if layer is not None:
            parts = [p for p in parts if f"L{layer:03d}" in p.name]
        parts = [str(p) for p in parts if p.exists()]
        if not parts:
            return []
        rows = self.con.execute(
            f"""
            SELECT e.{other}, e.weight, f.deembed_ext_tokens
            FROM read_parquet($parts) e LEFT JOIN read_parquet($features) f ON f.id = e.{other}
            WHERE e.{this} = $id
            ORDER BY abs(e.weight) DESC, e.{other}
            LIMIT $k
            """,
            {"parts": parts, "features": str(self.root / layout.FEATURES), "id": fid, "k": k},
        ).fetchall()
        return [Edge(r[0], float(r[1]), list(r[2] or [])[:5]) for r in rows]
