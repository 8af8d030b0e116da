"""The ingest's receipt: a no-op rerun answered without loading the model.

Deciding that a catalog is complete needs the model's weights digest (the manifest's), so a rerun used to load the
model (10+ s on SmolLM2) to find nothing to do. After a successful ingest the receipt records a digest of the
request (every argument that shapes the catalog) and of the files involved: the model's and transcoders' files and
a dataset file by path, size and modification time, and the catalog's own files the ingest wrote. A rerun whose
digest matches has nothing to do: the same request over unchanged inputs and an untouched catalog. Anything else
(another argument, a touched input, a removed or rewritten part) takes the full path, which checks everything. A run
that stops half-way needs no clean-up: whatever it wrote changed the catalog's files, so the old receipt no longer
matches.
Inputs passed as objects in memory have no files to fingerprint: no receipt then.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from circuit_catalog.catalog import layout
from circuit_catalog.queries.rows import plain

RECEIPT = layout.INGEST_RECEIPT
# what the ingest does not write, or writes for others: the store, reports, evaluations, interventions
_NOT_INGEST = (layout.GRAPH, layout.REPORTS, layout.EVAL, "interventions", layout.WRITER_LOCK, RECEIPT)


def request_digest(catalog_dir: Path, request: dict) -> str | None:
    """The digest of `request` (model and transcoders as given, other arguments) with the state of its files and of
    the catalog's; None when the model or transcoders are objects in memory."""
    model, transcoders = request["model"], request["transcoders"]
    if not isinstance(model, (str, Path)) or not isinstance(transcoders, (str, Path)):
        return None
    inputs = {"model": [str(model), *file_state(Path(model))], "transcoders": [str(transcoders), *file_state(Path(transcoders))]}
    dataset = request.get("dataset")
    if dataset is not None:
        inputs["dataset"] = [str(dataset), *file_state(Path(str(dataset)))]
    catalog = [row for row in file_state(Path(catalog_dir)) if not row[0].startswith(_NOT_INGEST) and not row[0].startswith(".")]
    if not catalog:
        return None
    body = json.dumps({"request": plain(request), "inputs": inputs, "catalog": catalog}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def matches(catalog_dir: Path, digest: str | None) -> bool:
    """Whether the catalog's receipt is this digest (a no-op rerun)."""
    path = Path(catalog_dir) / RECEIPT
    if digest is None or not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("digest") == digest
    except (OSError, ValueError):
        return False


def write_receipt(catalog_dir: Path, request: dict) -> None:
    """Record the request against the catalog as it now is (after the ingest's writes)."""
    from circuit_catalog.catalog.atomic import atomic_file

    digest = request_digest(catalog_dir, request)
    if digest is not None:
        with atomic_file(Path(catalog_dir) / RECEIPT) as tmp:
            tmp.write_text(json.dumps({"digest": digest}) + "\n")


def file_state(path: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of a file, or of every file under a directory, sorted; [] if absent."""
    if path.is_file():
        st = path.stat()
        return [(path.name, st.st_size, st.st_mtime_ns)]
    if not path.is_dir():
        return []
    return sorted((p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file())
