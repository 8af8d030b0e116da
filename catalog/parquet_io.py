"""Parquet parts that are complete or absent, and checked when read: written whole (`catalog.atomic`), their
footers and row counts read to tell a finished part from a damaged one. Also the text files and output
directories a user names, written or made with one error line when the place is unwritable."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from circuit_catalog.catalog.atomic import atomic_file

from circuit_catalog.errors import CatalogDirError, OutputError


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write `table` to `path` so a reader (or a resumed job) never sees a partial file."""
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def part_rows(path: Path) -> int | None:
    """Rows of a Parquet part per its footer; None when the file is damaged (truncated, not Parquet)."""
    try:
        return pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowException):
        return None


def part_intact(path: Path, rows: int | None) -> bool:
    """Readable, and holding the `rows` recorded when it was written (when a count was recorded)."""
    found = part_rows(path)
    return found is not None and rows in (None, found)


def check_parts(paths: list[Path]) -> None:
    """Readers' guard: a part that is not readable Parquet is one error naming it, not a traceback."""
    for path in paths:
        if part_rows(path) is None:
            raise CatalogDirError(f"{path}: damaged Parquet part (truncated or overwritten); "
                                  "rerun the ingest command that wrote the catalog to recompute it")


def make_output_dir(path: Path) -> None:
    """A directory the user named for output, made now: a file or an unwritable place there is one error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write into {path}: {exc.strerror or exc}") from None


def write_text_atomic(text: str, path: Path) -> None:
    """Write a text file (manifest, report, export) whole or not at all; an unwritable path is one error."""
    try:
        with atomic_file(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
