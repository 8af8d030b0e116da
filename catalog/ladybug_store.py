"""The embedded default store: LadybugDB (the maintained Kùzu fork), in-process, at `DIR/graph`.

Loading builds a fresh database under a temporary name with `COPY ... FROM` the Parquet parts
(row-by-row MERGE is ~300 rows/s there; COPY loads millions per second), then renames it into place
and writes a marker with the catalog's signature. A crash mid-load leaves no marker, so the next
load redoes it; a marker that no longer matches the catalog means the store is stale and is rebuilt,
and so is a store that no longer opens (truncated, or left mid-checkpoint), which `load` tries first.
Loading holds the catalog's writer lock; readers keep the old store open until the rename.
Queries open the database read-only, behind the read-clause check in `catalog.store`.

Loads and queries get a buffer pool of half the machine's memory, not LadybugDB's default 80%: a COPY holds its rows
there and does not spill, and so does a query's aggregation, so past the pool they fail with one error line where
beyond the machine's memory the kernel killed the process (a 1,000-prompt catalog's one COPY of its per-head edge
terms; `recurring-paths --hops 2` over it).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from circuit_catalog.catalog.crash import crash_point
from circuit_catalog.catalog.graph_schema import NODES, RELS, NodeSet, RelSet, absent_columns, catalog_signature
from circuit_catalog.catalog.layout import part_files
from circuit_catalog.catalog.lock import writer_lock
from circuit_catalog.catalog.parquet_io import check_parts
from circuit_catalog.catalog.store import GraphStore, Row
from circuit_catalog.catalog.tallies import refresh_tallies
from circuit_catalog.progress import tqdm

from circuit_catalog.errors import CatalogBusy, CypherError, StoreError, first_line


ROW_BYTES = 200  # buffer pool a relationship row takes while its COPY runs (measured ~150 B for ATTR_HEAD's)


class LadybugStore(GraphStore):
    dialect = "ladybug"

    def __init__(self, path: Path, buffer_pool: int | None = None, copy_rows: int | None = None):
        """`buffer_pool`: bytes (default half the machine's memory); `copy_rows`: the most relationship rows one COPY
        loads (default what the buffer pool holds)."""
        self.path = Path(path)
        self.buffer_pool = buffer_pool or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
        self.copy_rows = copy_rows or self.buffer_pool // ROW_BYTES
        self.marker = self.path.with_name(self.path.name + ".loaded.json")
        self._db = self._conn = None
        self._writable = False

    # ------------------------------------------------------------ loading

    def is_current(self, catalog_dir: Path) -> bool:
        """The marker says the store holds this catalog (whether it still opens is `verify`)."""
        try:
            return self.path.exists() and json.loads(self.marker.read_text())["signature"] == catalog_signature(catalog_dir)
        except (OSError, ValueError, KeyError):
            return False

    def verify(self) -> None:
        """Raise `StoreError` (saying "run load") unless the database opens and holds every table of the schema."""
        rebuild = f"run `circuit-catalog load --catalog {self.path.parent}` to rebuild it"
        try:
            tables = {r["name"] for r in self._execute("CALL show_tables() RETURN name", None, write=False)}
        except CypherError as exc:
            self.close()
            raise StoreError(f"cannot read the store {self.path} ({exc}); {rebuild}") from None
        missing = sorted(({n.label for n in NODES} | {r.type for r in RELS}) - tables)
        if missing:
            self.close()
            raise StoreError(f"the store {self.path} lacks the tables {', '.join(missing)}; {rebuild}")

    def load(self, catalog_dir: Path, progress: bool = True) -> bool:
        with writer_lock(self.path.parent):  # the catalog directory, for the default DIR/graph
            why = "does not exist yet" if not self.path.exists() else "holds another state of the catalog (it changed since the last load)"
            if self.is_current(catalog_dir):
                try:
                    self.verify()
                    return False
                except StoreError:
                    why = "does not open"  # damaged: rebuilt below
            self._build(catalog_dir, progress, why)
        return True

    def prepare(self, catalog_dir: Path, progress: bool = True) -> None:
        """Before lookups: (re)load a missing or stale store; while another process writes, use the store there.

        A current store that does not open is not rebuilt here but reported ("run load"): a lookup
        should not silently turn into a rebuild of a store someone may be inspecting.
        """
        if self.is_current(catalog_dir):
            self.verify()
            return
        try:
            self.load(catalog_dir, progress)
        except CatalogBusy:
            if not self.path.exists():
                raise

    def _build(self, catalog_dir: Path, progress: bool, why: str) -> None:
        """Load every part into a new database beside the store, then swap it in; the progress bar says `why` (a
        first lookup that takes seconds says what it is doing)."""
        self.close()
        signature = catalog_signature(catalog_dir)
        refresh_tallies(catalog_dir)
        tmp = self.path.with_name(f".{self.path.name}.loading-{os.getpid()}")
        import ladybug

        try:
            db = ladybug.Database(str(tmp), buffer_pool_size=self.buffer_pool)
            conn = ladybug.Connection(db)
            for statement in _ddl():
                conn.execute(statement)
            steps = [(_node_copy(n), part_files(catalog_dir, n.files)) for n in NODES]
            rels = [(_rel_copy(r), part_files(catalog_dir, r.files)) for r in RELS]
            check_parts([f for _, files in steps + rels for f in files])
            # one COPY per relationship table over all its files while they fit the buffer pool: the checkpoint after a
            # COPY into a table that holds rows already rewrites the table (~0.8 s per million rows of ATTR_HEAD), so
            # 16-file chunks took 19 s for 10M pullbacks where one statement takes 11 s; beyond, chunks that fit
            steps += [(copy, chunk) for copy, files in rels for chunk in _chunks(files, self.copy_rows)]
            for copy, files in tqdm(steps, desc=f"the store {why}: loading {self.path}", unit="COPY", disable=not progress):
                crash_point("load")
                if files:
                    try:
                        conn.execute(copy(files))
                    except RuntimeError as exc:  # a damaged part (truncated, hand-edited): name it, keep the old store
                        raise StoreError(f"cannot load {len(files)} file(s) like {files[0]}: {first_line(exc)}") from None
            conn.close()
            db.close()
            self.marker.unlink(missing_ok=True)
            _remove_db(self.path, keep_main=True)  # a damaged store's wal/shadow would be replayed into the new one
            os.replace(tmp, self.path)  # atomic: a reader opens the old store or the new one, never none
            self.marker.write_text(json.dumps({"signature": signature, "catalog": str(Path(catalog_dir).resolve())}))
        finally:
            _remove_db(tmp)

    # ------------------------------------------------------------ queries

    def _connect(self, writable: bool):
        if self._conn is not None and (self._writable or not writable):
            return self._conn
        self.close()
        if not self.path.exists():
            raise StoreError(f"no embedded store at {self.path}; run `circuit-catalog load --catalog {self.path.parent}`")
        import ladybug

        try:
            self._db = ladybug.Database(str(self.path), read_only=not writable, buffer_pool_size=self.buffer_pool)
        except RuntimeError as exc:
            raise StoreError(f"cannot open the store {self.path} ({first_line(exc)}); "
                             f"run `circuit-catalog load --catalog {self.path.parent}` to rebuild it") from None
        self._conn = ladybug.Connection(self._db)
        self._writable = writable
        return self._conn

    def execute(self, query: str, params: dict[str, Any] | None, write: bool) -> list[Row]:
        if write:  # a writer holds the catalog's lock, and closes the database so its changes are checkpointed
            with writer_lock(self.path.parent):
                try:
                    return self._execute(query, params, write)
                finally:
                    self.close()
        return self._execute(query, params, write)

    def _execute(self, query: str, params: dict[str, Any] | None, write: bool) -> list[Row]:
        conn = self._connect(write)
        try:
            result = conn.execute(query, params or {})
        except RuntimeError as exc:
            raise CypherError(first_line(exc)) from None
        if isinstance(result, list):  # several statements: the last one's rows
            result = result[-1]
        names = result.get_column_names()
        return [dict(zip(names, row)) for row in result.get_all()]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._db.close()
        self._db = self._conn = None


def _chunks(files: list[Path], max_rows: int) -> list[list[Path]]:
    """`files` in order, as runs of at most `max_rows` rows (a larger file alone)."""
    import pyarrow.parquet as pq

    chunks: list[list[Path]] = []
    rows = 0
    for f in files:
        n = pq.ParquetFile(f).metadata.num_rows
        if not chunks or rows + n > max_rows:
            chunks.append([])
            rows = 0
        chunks[-1].append(f)
        rows += n
    return chunks


def _ddl() -> list[str]:
    statements = []
    for n in NODES:
        cols = ", ".join(f"`{name}` {typ}" for name, typ in n.columns)
        statements.append(f"CREATE NODE TABLE {n.label}({cols}, PRIMARY KEY(`{n.columns[0][0]}`))")
    for rel_type in dict.fromkeys(r.type for r in RELS):  # one table per type, with every (source, target) pair
        group = [r for r in RELS if r.type == rel_type]
        pairs = ", ".join(f"FROM {r.source} TO {r.target}" for r in group)
        props = "".join(f", `{name}` {typ}" for name, typ in group[0].properties)
        statements.append(f"CREATE REL TABLE `{rel_type}`({pairs}{props})")  # quoted: ON is a keyword there
    return statements


def _node_copy(n: NodeSet) -> Callable[[list[Path]], str]:
    def copy(files: list[Path]) -> str:
        absent = absent_columns([c for c, _ in n.columns], files)
        return _copy(n.label, [f"CAST(NULL AS {t}) AS `{c}`" if c in absent else f"`{c}`" for c, t in n.columns], files)

    return copy


def _rel_copy(r: RelSet) -> Callable[[list[Path]], str]:
    grouped = sum(other.type == r.type for other in RELS) > 1  # a table of several pairs is told which one
    options = f" (from='{r.source}', to='{r.target}')" if grouped else ""
    return lambda files: _copy(r.type, [f"`{c}`" for c in ("src", "dst", *(c for c, _ in r.properties))], files) + options


def _copy(table: str, projection: list[str], files: list[Path]) -> str:
    """COPY matches columns by position, so project exactly the schema's columns in order (a column the parts lack as
    a typed null)."""
    paths = "[" + ", ".join(_quote(str(f)) for f in files) + "]"
    return f"COPY `{table}` FROM (LOAD FROM {paths} RETURN {', '.join(projection)})"


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _remove_db(path: Path, keep_main: bool = False) -> None:
    """A database's files: the main file and what LadybugDB keeps beside it while open or checkpointing."""
    for p in [*([] if keep_main else [path]), *(path.with_name(f"{path.name}.{s}") for s in ("wal", "shadow"))]:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
