"""The Neo4j backend, through the official `neo4j` driver (bolt:// or neo4j:// URIs).

Credentials come from NEO4J_USER / NEO4J_PASSWORD and are never logged.

Loading first makes sure of the schema (uniqueness constraints on every key, an index on every property a
named query looks nodes up by) and waits for the indexes to come online, then sends each Parquet part in
batched `UNWIND $rows` transactions, from `writers` sessions at once if asked, one part each and never two
parts that touch the same node; node parts all finish before relationship parts start, since relationships
match their endpoints. A
`CatalogState` node records the catalog's signature, the parts started and the parts finished: a part
never started is written with CREATE (no lookup per row), a part started but not finished (the load died
inside it) with MERGE, so an interrupted load resumes without duplicates, and a changed catalog is
reloaded from empty. A dropped connection stops the load with one error naming the part.

User Cypher (`cypher()`) is held to read-only three ways: the clause check in `catalog.store`, a refusal
of administration commands, and the server's own verdict. Where the server's EXPLAIN classifies queries
(Neo4j), only a plan of query type "r" runs; every query then runs in a read transaction that is rolled
back, and is refused unless the server reports it as read-only. Named queries (`run()`) are ours and skip this.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
from circuit_catalog.catalog.graph_schema import NODES, RELS, NodeSet, RelSet, absent_columns, catalog_signature, node_set
from circuit_catalog.catalog.layout import part_files
from circuit_catalog.catalog.store import GraphStore, Row
from circuit_catalog.catalog.tallies import refresh_tallies
from circuit_catalog.progress import tqdm

from circuit_catalog.errors import CypherError, StoreError, first_line

BATCH_ROWS = 20_000  # rows per transaction: large enough to amortise the round trip, small enough for the heap
WRITERS = 1  # writer sessions, one part each: raise on a Neo4j server with cores to spare (ArcadeDB here: 1 is fastest)
INDEX_WAIT_S = 600
STATE_ID = "catalog"


# ---------------------------------------------------------------- statements


def schema_statements() -> list[str]:
    """Uniqueness constraints on every node key (they bring their own index) and an index per lookup property."""
    out = [f"CREATE CONSTRAINT {n.label.lower()}_{n.key} IF NOT EXISTS FOR (n:{n.label}) REQUIRE n.{n.key} IS UNIQUE"
           for n in NODES]
    out.append("CREATE CONSTRAINT catalogstate_id IF NOT EXISTS FOR (s:CatalogState) REQUIRE s.id IS UNIQUE")
    out += [f"CREATE INDEX {n.label.lower()}_{p} IF NOT EXISTS FOR (n:{n.label}) ON (n.{p})" for n in NODES for p in n.lookups]
    return out


def indexed_properties() -> set[tuple[str, str]]:
    """(label, property) pairs the schema statements index."""
    return {(n.label, n.key) for n in NODES} | {(n.label, p) for n in NODES for p in n.lookups} | {("CatalogState", "id")}


def _props(n: NodeSet) -> str:
    return ", ".join(f"`{c}`: r.`{c}`" for c, _ in n.columns)


def node_statement(n: NodeSet, merge: bool) -> str:
    """CREATE for a part never started; MERGE on the key for a part being resumed."""
    if not merge:
        return f"UNWIND $rows AS r CREATE (n:{n.label} {{{_props(n)}}})"
    sets = ", ".join(f"n.`{c}` = r.`{c}`" for c, _ in n.columns[1:])
    return f"UNWIND $rows AS r MERGE (n:{n.label} {{{n.key}: r.{n.key}}})" + (f" SET {sets}" if sets else "")


def rel_statement(r: RelSet, merge: bool) -> str:
    """Endpoints are found through the key constraints' indexes; MERGE only for a part being resumed."""
    match = (f"UNWIND $rows AS r MATCH (a:{r.source} {{{node_set(r.source).key}: r.src}}) "
             f"MATCH (b:{r.target} {{{node_set(r.target).key}: r.dst}}) ")
    if not merge:
        props = ", ".join(f"{c}: r.{c}" for c, _ in r.properties)
        return match + f"CREATE (a)-[:{r.type}" + (f" {{{props}}}" if props else "") + "]->(b)"
    # properties that tell parallel edges apart (DEEMBED's variant, the head of OV and ATTR_HEAD) go into the MERGE pattern
    keyed = [c for c, _ in r.properties if c in ("variant", "head")]
    pattern = " {" + ", ".join(f"{c}: r.{c}" for c in keyed) + "}" if keyed else ""
    sets = ", ".join(f"e.{c} = r.{c}" for c, _ in r.properties if c not in keyed)
    return match + f"MERGE (a)-[e:{r.type}{pattern}]->(b)" + (f" SET {sets}" if sets else "")


STATE_READ = "MATCH (s:CatalogState {id: $id}) RETURN s.signature AS signature, s.parts AS parts, s.started AS started"
STATE_START = "MERGE (s:CatalogState {id: $id}) SET s.signature = $signature, s.parts = [], s.started = []"
STATE_PART_STARTED = "MATCH (s:CatalogState {id: $id}) SET s.started = coalesce(s.started, []) + $part"
STATE_PART_DONE = "MATCH (s:CatalogState {id: $id}) SET s.parts = s.parts + $part"
CLEAR_BATCH = ("MATCH (n) WHERE " + " OR ".join(f"n:{n.label}" for n in NODES)
               + " WITH n LIMIT $batch DETACH DELETE n RETURN count(*) AS deleted")
INDEXES_NOT_ONLINE = "SHOW INDEXES YIELD name, state WHERE state <> 'ONLINE' RETURN name, state"
# the query every server must classify as read-only for its EXPLAIN verdicts to be trusted
EXPLAIN_PROBE = "MATCH (n) RETURN n LIMIT 1"


def statements() -> list[str]:
    """Every statement this backend sends; the tests lint each with Neo4j's own linter."""
    return [*schema_statements(), *(node_statement(n, m) for n in NODES for m in (False, True)),
            *(rel_statement(r, m) for r in RELS for m in (False, True)),
            STATE_READ, STATE_START, STATE_PART_STARTED, STATE_PART_DONE, CLEAR_BATCH, INDEXES_NOT_ONLINE,
            "EXPLAIN " + EXPLAIN_PROBE]


# Administration commands (Neo4j 5 Cypher manual, "Administration"): refused as user Cypher whatever the server
# says, since some take effect outside any transaction (a rollback cannot undo TERMINATE or STOP).
_ADMIN = re.compile(r"^\s*(?:(?://[^\n]*\n|/\*.*?\*/)\s*)*(?:USE\s+\S+\s+)?"
                    r"(RENAME|START|STOP|TERMINATE|GRANT|DENY|REVOKE|ENABLE|DEALLOCATE|REALLOCATE|DRYRUN|SUSPEND)\b",
                    re.I | re.S)
_QUERY_TYPES = {"r": "read-only", "rw": "read-write", "w": "write-only", "s": "schema-changing"}


def admin_command(query: str) -> str | None:
    """The administration verb `query` starts with (after comments and an optional USE), if any."""
    m = _ADMIN.match(query)
    return m.group(1).upper() if m else None


# ---------------------------------------------------------------- the store


class Neo4jStore(GraphStore):
    dialect = "neo4j"

    def __init__(self, uri: str, database: str | None = None, auth: tuple[str, str] | None = None):
        import neo4j

        self._neo4j = neo4j
        self.uri, self.database = uri, database
        user = os.environ.get("NEO4J_USER", "neo4j")
        password = os.environ.get("NEO4J_PASSWORD", "")
        self.driver = neo4j.GraphDatabase.driver(uri, auth=auth or (user, password))
        self._explain_classifies: bool | None = None
        try:
            self.driver.verify_connectivity()
        except neo4j.exceptions.AuthError:
            self.driver.close()
            raise StoreError(f"authentication failed at {uri} (set NEO4J_USER and NEO4J_PASSWORD)") from None
        except (neo4j.exceptions.ServiceUnavailable, OSError) as exc:
            self.driver.close()
            raise StoreError(f"cannot reach {uri}: {first_line(exc)}") from None

    def _session(self, read: bool = False):
        mode = self._neo4j.READ_ACCESS if read else self._neo4j.WRITE_ACCESS
        return self.driver.session(database=self.database, default_access_mode=mode)

    # ------------------------------------------------------------ queries

    def run(self, query: str, params: dict[str, Any] | None = None) -> list[Row]:
        """One of our own named read queries: a managed read transaction, no read-only checks."""
        def work(tx):
            return [record.data() for record in tx.run(query, params or {})]

        with self._errors():
            with self._session(read=True) as session:
                return session.execute_read(work)

    def execute(self, query: str, params: dict[str, Any] | None, write: bool) -> list[Row]:
        if not write:
            return self._read_only(query, params or {})

        def work(tx):
            return [record.data() for record in tx.run(query, params or {})]

        with self._errors():
            with self._session() as session:
                return session.execute_write(work)

    def cypher(self, query: str, params: dict[str, Any] | None = None, write: bool = False) -> list[Row]:
        verb = None if write else admin_command(query)
        if verb:
            raise CypherError(f"{verb} is an administration command; queries are read-only unless --write is given")
        return super().cypher(query, params, write)

    def _read_only(self, query: str, params: dict[str, Any]) -> list[Row]:
        """EXPLAIN first where the server classifies plans; then run in a read transaction that is always rolled
        back, and refuse the rows unless the server reports the query read-only."""
        with self._errors(), self._session(read=True) as session:
            if self._explain_is_trusted(session):
                kind = session.run("EXPLAIN " + query, params).consume().query_type
                if kind != "r":
                    raise CypherError(f"refused: the server plans this as a {_QUERY_TYPES.get(kind, repr(kind))} query; "
                                      "queries are read-only unless --write is given")
            tx = session.begin_transaction()
            try:
                result = tx.run(query, params)
                rows = [record.data() for record in result]
                kind = result.consume().query_type
            finally:
                tx.rollback()
        if kind != "r":
            raise CypherError(f"refused and rolled back: the server ran this as a {_QUERY_TYPES.get(kind, repr(kind))} "
                              "query; queries are read-only unless --write is given")
        return rows

    def _explain_is_trusted(self, session) -> bool:
        """Whether this server's EXPLAIN reports query types (Neo4j does; ArcadeDB 26.10 says "w" for every EXPLAIN)."""
        if self._explain_classifies is None:
            self._explain_classifies = session.run("EXPLAIN " + EXPLAIN_PROBE).consume().query_type == "r"
        return self._explain_classifies

    @contextmanager
    def _errors(self, part: str | None = None) -> Iterator[None]:
        """Driver exceptions as one-line user errors: a Cypher error as CypherError (StoreError while loading a part),
        a lost or refused connection as StoreError naming the part being loaded, so the next `load` resumes it."""
        exceptions = self._neo4j.exceptions
        where, resume = (f" while loading {part}", "; rerun `load` to resume") if part else ("", "")
        try:
            yield
        except exceptions.Neo4jError as exc:
            message = f"{exc.code}: {first_line(exc.message or exc)}"
            if part:
                raise StoreError(f"{self.uri}: {message}{where}{resume}") from None
            raise CypherError(message) from None
        except (exceptions.DriverError, OSError) as exc:
            raise StoreError(f"{self.uri}: lost the connection{where}: {first_line(exc)}{resume}") from None

    def close(self) -> None:
        self.driver.close()

    # ------------------------------------------------------------ loading

    def ensure_schema(self, timeout_s: float = INDEX_WAIT_S) -> None:
        """Create the constraints and indexes that are missing and wait until every index is online (an index
        added to an already loaded store populates in the background, and lookups would scan until it is)."""
        for statement in schema_statements():
            self.execute(statement, None, write=True)
        deadline = time.monotonic() + timeout_s
        while pending := self.run(INDEXES_NOT_ONLINE):
            failed = [r["name"] for r in pending if r["state"] == "FAILED"]
            if failed:
                raise StoreError(f"{self.uri}: index {failed[0]} failed to populate; see the server's log")
            if time.monotonic() > deadline:
                raise StoreError(f"{self.uri}: indexes still populating after {timeout_s:.0f} s: "
                                 + ", ".join(r["name"] for r in pending))
            time.sleep(1)

    def load(self, catalog_dir: Path, progress: bool = True, batch_rows: int = BATCH_ROWS, writers: int = WRITERS) -> bool:
        signature = catalog_signature(catalog_dir)
        refresh_tallies(catalog_dir)
        self.ensure_schema()
        state = self.run(STATE_READ, {"id": STATE_ID})
        done: set[str] = set()
        started: set[str] | None = set()
        if state and state[0]["signature"] == signature:
            done = set(state[0]["parts"] or [])
            # a state written before parts were marked as started: treat every unfinished part as resumed
            started = None if state[0]["started"] is None else set(state[0]["started"])
        else:
            if state:  # another catalog was loaded here: start from empty, never mix two catalogs
                while self.execute(CLEAR_BATCH, {"batch": batch_rows}, write=True)[0]["deleted"]:
                    pass
            self.execute(STATE_START, {"id": STATE_ID, "signature": signature}, write=True)
        phases = [[(n, f) for n in NODES for f in part_files(catalog_dir, n.files)],
                  [(r, f) for r in RELS for f in part_files(catalog_dir, r.files)]]
        phases = [[(s, f) for s, f in phase if _part_name(catalog_dir, f) not in done] for phase in phases]
        if not any(phases):
            return False
        total = sum(pq.ParquetFile(f).metadata.num_rows for phase in phases for _, f in phase)
        with tqdm(total=total, desc=f"loading {self.uri}", unit="row", disable=not progress) as bar:
            for phase in phases:  # nodes first: relationships match their endpoints
                self._load_parts(catalog_dir, phase, started, batch_rows, writers, bar)
        return True

    def _load_parts(self, catalog_dir: Path, parts: list, started: set[str] | None, batch_rows: int, writers: int,
                    bar) -> None:
        """Each part in its own session, `writers` at a time, never two parts that touch the same node at once:
        concurrent relationship writes on shared nodes deadlock in Neo4j (and conflict in ArcadeDB), and the
        driver's retries back off for seconds. The first failure stops the other writers after their batch."""

        def load_part(schema: NodeSet | RelSet, path: Path, stop: threading.Event) -> None:
            name = _part_name(catalog_dir, path)
            resumed = started is None or name in started
            nodes = isinstance(schema, NodeSet)
            statement = node_statement(schema, resumed) if nodes else rel_statement(schema, resumed)
            columns = [c for c, _ in schema.columns] if nodes else ["src", "dst", *(c for c, _ in schema.properties)]
            with self._errors(name), self._session() as session:
                if not resumed:
                    with state_lock:
                        session.execute_write(_run, STATE_PART_STARTED, {"id": STATE_ID, "part": [name]})
                for rows in _batches(path, batch_rows, columns):
                    if stop.is_set():
                        return
                    session.execute_write(_run, statement, {"rows": rows})
                    bar.update(len(rows))
                with state_lock:
                    session.execute_write(_run, STATE_PART_DONE, {"id": STATE_ID, "part": [name]})

        state_lock = threading.Lock()  # one CatalogState node: its updates queue here, not as conflicting transactions
        _run_disjoint([(s, f, _footprint(s, f)) for s, f in parts], load_part, writers)


def _footprint(schema: NodeSet | RelSet, path: Path) -> frozenset[int]:
    """Hashes of the existing nodes a part's writes lock: a relationship part's endpoints. A node part creates only
    its own nodes, whose keys no other part has, so it conflicts with nothing."""
    if isinstance(schema, NodeSet):
        return frozenset()
    table = pq.read_table(path, columns=["src", "dst"])
    return frozenset(hash((label, v)) for label, column in ((schema.source, "src"), (schema.target, "dst"))
                     for v in pc.unique(table[column]).to_pylist())


def _run_disjoint(parts: list[tuple[Any, Path, frozenset[int]]], work, writers: int) -> None:
    """Run `work(schema, path, stop)` on `writers` threads, each taking the first waiting part whose footprint is
    disjoint from those of the parts running; re-raises the first failure after the running parts stop."""
    pending, running, failures = list(parts), [], []
    lock = threading.Condition()
    stop = threading.Event()

    def writer() -> None:
        while True:
            with lock:
                while True:
                    if stop.is_set() or not pending:
                        return
                    busy = frozenset().union(*(fp for _, _, fp in running))
                    item = next((p for p in pending if busy.isdisjoint(p[2])), None)
                    if item:
                        break
                    lock.wait()
                pending.remove(item)
                running.append(item)
            try:
                work(item[0], item[1], stop)
            except BaseException as exc:
                failures.append(exc)
                stop.set()
            finally:
                with lock:
                    running.remove(item)
                    lock.notify_all()

    threads = [threading.Thread(target=writer, daemon=True) for _ in range(max(1, writers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]


def _run(tx, statement: str, params: dict) -> None:
    tx.run(statement, params).consume()


def _batches(path: Path, size: int, columns: list[str]) -> Iterator[list[dict]]:
    """Rows of the schema's columns; one the part lacks is left out of the rows, so `r.col` is null in the statement."""
    absent = absent_columns(columns, [path])
    for batch in pq.ParquetFile(path).iter_batches(batch_size=size, columns=[c for c in columns if c not in absent]):
        yield batch.to_pylist()


def _part_name(catalog_dir: Path, f: Path) -> str:
    return str(Path(f).relative_to(catalog_dir))
