"""Interventions kept in the catalog: `interventions.parquet`, and the store's link parts derived from it.

One row per intervention (what was edited, in which regime, each target logit before and after, KL,
generated text). Rows accumulate over runs; the same intervention run again replaces its row. The
table is written first (temporary name, then rename) and the link parts are rebuilt from it, so a crash
between the two leaves links that the next write repairs, never a link to an intervention that is absent.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from circuit_catalog.catalog import layout
from circuit_catalog.catalog.lock import writer_lock
from circuit_catalog.catalog.manifest import Manifest, now
from circuit_catalog.catalog.parquet_io import write_atomic
from circuit_catalog.ingest.interventions import Edit, Outcome
from circuit_catalog.ingest.steering import Generation

from circuit_catalog.errors import CatalogDirError, UnknownFeature


def intervention_row(manifest: Manifest, tokens: list[int], prompt_id: str | None, edits: list[Edit], result: Outcome,
                     generation: Generation | None = None, generation_settings: dict | None = None) -> dict:
    """The table row; its id hashes the model, transcoders, tokens, edits, regime and generation settings."""
    key = {"model": manifest.model_weights_sha256, "transcoders": manifest.transcoder_files, "tokens": tokens,
           "edits": result.edits, "regime": result.regime, "generate": generation_settings}
    edits = [replace(e, pos=None if e.pos is None else e.pos % len(tokens)) for e in edits]  # -1 as the position it was
    features = list(dict.fromkeys(e.feature for e in edits))
    return {
        "id": hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16],
        "prompt_id": prompt_id, "prompt": result.prompt, "regime": result.regime, "spec": "; ".join(result.edits),
        "features": features,
        "feature_edits": ["; ".join(e.spec for e in edits if e.feature == f) for f in features],
        "target_ids": [t.token_id for t in result.targets], "target_tokens": [t.token for t in result.targets],
        "logit_before": [t.before for t in result.targets], "logit_after": [t.after for t in result.targets],
        "logit_change": [t.change for t in result.targets], "kl": result.kl,
        "top_before": [f"{tok!r} {p:.4f}" for tok, p in result.top_before],
        "top_after": [f"{tok!r} {p:.4f}" for tok, p in result.top_after],
        "generated_original": generation.original if generation else None,
        "generated_steered": generation.steered if generation else None,
        "created": now(),
    }


def add_intervention(root: Path, row: dict) -> None:
    """Append (or replace) one row, then rebuild the link parts, holding the catalog's writer lock."""
    root = Path(root)
    Manifest.read(root)  # a directory that is no catalog is refused before the lock would create its lock file
    with writer_lock(root):
        if Manifest.read(root).status != "complete":
            raise CatalogDirError(f"{root}: the ingest has not finished; rerun it before recording interventions")
        features = pq.read_table(root / layout.FEATURES, columns=["id"], filters=[("id", "in", row["features"])])
        missing = [f for f in row["features"] if f not in set(features.column("id").to_pylist())]
        if missing:  # a TOUCHES link to a feature the stores do not hold would break their load
            raise UnknownFeature(f"unknown feature {missing[0]}: not in the catalog {root} (ingested with other layers?)")
        path = root / layout.INTERVENTIONS
        rows = [r for r in pq.read_table(path).to_pylist() if r["id"] != row["id"]] if path.is_file() else []
        table = pa.Table.from_pylist([*rows, row], schema=layout.INTERVENTION_SCHEMA)
        write_atomic(table, path)
        write_links(root, table)


def write_links(root: Path, table: pa.Table) -> None:
    rows = table.to_pylist()
    on = [{"src": r["id"], "dst": r["prompt_id"]} for r in rows if r["prompt_id"] is not None]
    touches = [{"src": r["id"], "dst": f, "edits": e} for r in rows for f, e in zip(r["features"], r["feature_edits"])]
    changes = [{"src": r["id"], "dst": t, "before": b, "after": a, "change": c}
               for r in rows for t, b, a, c in zip(r["target_ids"], r["logit_before"], r["logit_after"], r["logit_change"])]
    write_atomic(pa.Table.from_pylist(on, schema=pa.schema([("src", pa.string()), ("dst", pa.string())])), root / layout.INTERVENTION_ON)
    write_atomic(pa.Table.from_pylist(touches, schema=pa.schema([("src", pa.string()), ("dst", pa.string()), ("edits", pa.string())])),
                 root / layout.INTERVENTION_TOUCHES)
    write_atomic(pa.Table.from_pylist(changes, schema=pa.schema([("src", pa.string()), ("dst", pa.int64()), ("before", pa.float32()),
                                                                  ("after", pa.float32()), ("change", pa.float32())])),
                 root / layout.INTERVENTION_CHANGES)
