"""Catalog-wide tallies over the prompts' graphs, counted once per prompt set and loaded into the stores.

`recurring` (the features found in the most prompts' pruned graphs) aggregated every kept node of every prompt on
each call: 58 ms at 20 prompts, and more with every prompt added. Counted here instead, whenever the prompt set has
changed, the store holds one `FeatureTally` row per feature, keyed by its rank in `recurring`'s order, and the query
reads the top k by key. The counts are those the query made: per feature, the prompts whose pruned graph holds it (at any position),
its summed influence over those nodes, ranked by prompts, then influence (both descending), then id.

The part records the digest of the prompt index it was counted from. `ingest --prompts` counts it after the graphs
(so its receipt covers it), and every store load and Neo4j import export first counts it again if the prompt set has
changed since, so a catalog from before the tallies, or prompts added by any other route, are counted before loading.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from circuit_catalog.catalog import layout
from circuit_catalog.catalog.graph_schema import digest
from circuit_catalog.catalog.lock import writer_lock
from circuit_catalog.catalog.parquet_io import check_parts, write_atomic

PROMPT_INDEX_KEY = b"prompt_index_sha256"  # the part's metadata: the prompt index it was counted from

FEATURES = """
SELECT row_number() OVER (ORDER BY prompts DESC, influence DESC, feature) AS rank, feature, prompts, influence
FROM (SELECT feature_id AS feature, count(DISTINCT prompt_id) AS prompts, sum(influence) AS influence
      FROM read_parquet($nodes) WHERE kept AND kind = 'feature' GROUP BY feature_id)
ORDER BY rank
"""


def refresh_tallies(root: Path) -> None:
    """Count the tallies again if the prompt set changed since they were counted (none without prompts)."""
    root = Path(root)
    part = root / layout.FEATURE_TALLY
    if digest(root / layout.PROMPT_INDEX) == _counted_from(part):
        return
    with writer_lock(root):
        index = digest(root / layout.PROMPT_INDEX)  # again: the prompt set another writer may have changed meanwhile
        if index is None:
            part.unlink(missing_ok=True)
            return
        nodes = layout.part_files(root, layout.prompt_part_glob("nodes"))
        check_parts(nodes)
        write_atomic(feature_tally(nodes).replace_schema_metadata({PROMPT_INDEX_KEY: index}), part)


def feature_tally(nodes: list[Path]) -> pa.Table:
    """FEATURE_TALLY_SCHEMA rows from prompt graphs' nodes.parquet parts, first rank first."""
    import duckdb

    if not nodes:
        return layout.FEATURE_TALLY_SCHEMA.empty_table()
    with duckdb.connect() as con:
        return con.sql(FEATURES, params={"nodes": [str(p) for p in nodes]}).to_arrow_table().cast(layout.FEATURE_TALLY_SCHEMA)


def _counted_from(part: Path) -> str | None:
    """The prompt index digest a tally part was counted from; None if there is none (or it is unreadable)."""
    try:
        return (pq.read_schema(part).metadata or {}).get(PROMPT_INDEX_KEY, b"").decode() or None
    except (OSError, pa.ArrowException):
        return None
