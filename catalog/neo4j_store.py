"""The Neo4j backend, through the official `neo4j` driver (bolt:// or neo4j:// URIs).

Credentials come from NEO4J_USER / NEO4J_PASSWORD and are never logged. Loading creates uniqueness
constraints, then sends each Parquet part in batched `UNWIND $rows` transactions (retried by the driver
on transient errors). Every write is a MERGE, so loading the same catalog twice leaves the same graph;
a `CatalogState` node records the catalog's signature and the parts already loaded, so an interrupted
load resumes (its last part is simply merged again) and a changed catalog is reloaded from empty.
For very large catalogs, `write_admin_import` prepares `neo4j-admin database import` files instead.

User Cypher runs in read transactions, which Neo4j refuses to write in; the clause check in
`catalog.store` comes first either way, since some Bolt servers (ArcadeDB) do not enforce it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from tqdm.auto import tqdm

from catalog.errors import first_line
from catalog.graph_schema import NODES, RELS, NodeSet, RelSet, catalog_signature, part_files
from catalog.store import CypherError, GraphStore, Row, StoreError

BATCH_ROWS = 5_000
STATE_ID = "catalog"


def constraint_statements() -> list[str]:
    """One uniqueness constraint per node label's key, plus the load-state node's."""
    out = [f"CREATE CONSTRAINT {n.label.lower()}_{n.columns[0][0]} IF NOT EXISTS FOR (n:{n.label}) REQUIRE n.{n.columns[0][0]} IS UNIQUE" for n in NODES]
    out.append("CREATE CONSTRAINT catalogstate_id IF NOT EXISTS FOR (s:CatalogState) REQUIRE s.id IS UNIQUE")
    return out


def node_merge_statement(n: NodeSet) -> str:
    key, *rest = (c for c, _ in n.columns)
    sets = ", ".join(f"n.`{c}` = r.`{c}`" for c in rest)
    return f"UNWIND $rows AS r MERGE (n:{n.label} {{{key}: r.{key}}})" + (f" SET {sets}" if sets else "")


def rel_merge_statement(r: RelSet) -> str:
    src_key = next(n for n in NODES if n.label == r.source).columns[0][0]
    dst_key = next(n for n in NODES if n.label == r.target).columns[0][0]
    # properties that tell parallel edges apart (DEEMBED's variant) go into the MERGE pattern
    keyed = [c for c, _ in r.properties if c == "variant"]
    pattern = "{" + ", ".join(f"{c}: r.{c}" for c in keyed) + "}" if keyed else ""
    sets = ", ".join(f"e.{c} = r.{c}" for c, _ in r.properties if c not in keyed)
    return (
        f"UNWIND $rows AS r MATCH (a:{r.source} {{{src_key}: r.src}}) MATCH (b:{r.target} {{{dst_key}: r.dst}}) "
        f"MERGE (a)-[e:{r.type} {pattern}]->(b)" + (f" SET {sets}" if sets else "")
    )


STATE_READ = "MATCH (s:CatalogState {id: $id}) RETURN s.signature AS signature, s.parts AS parts"
STATE_START = "MERGE (s:CatalogState {id: $id}) SET s.signature = $signature, s.parts = []"
STATE_PART_DONE = "MATCH (s:CatalogState {id: $id}) SET s.parts = s.parts + $part"
CLEAR_BATCH = ("MATCH (n) WHERE " + " OR ".join(f"n:{n.label}" for n in NODES)
               + " WITH n LIMIT $batch DETACH DELETE n RETURN count(*) AS deleted")


def statements() -> list[str]:
    """Every statement this backend sends; the tests lint each with Neo4j's own linter."""
    return [*constraint_statements(), *(node_merge_statement(n) for n in NODES), *(rel_merge_statement(r) for r in RELS),
            STATE_READ, STATE_START, STATE_PART_DONE, CLEAR_BATCH]


class Neo4jStore(GraphStore):
    dialect = "neo4j"

    def __init__(self, uri: str, database: str | None = None, auth: tuple[str, str] | None = None):
        import neo4j

        self._neo4j = neo4j
        self.uri, self.database = uri, database
        user = os.environ.get("NEO4J_USER", "neo4j")
        password = os.environ.get("NEO4J_PASSWORD", "")
        self.driver = neo4j.GraphDatabase.driver(uri, auth=auth or (user, password))
        try:
            self.driver.verify_connectivity()
        except neo4j.exceptions.AuthError:
            self.driver.close()
            raise StoreError(f"authentication failed at {uri} (set NEO4J_USER and NEO4J_PASSWORD)") from None
        except (neo4j.exceptions.ServiceUnavailable, OSError) as exc:
            self.driver.close()
            raise StoreError(f"cannot reach {uri}: {first_line(exc)}") from None

    # ------------------------------------------------------------ queries

    def execute(self, query: str, params: dict[str, Any] | None, write: bool) -> list[Row]:
        def work(tx):
            return [record.data() for record in tx.run(query, params or {})]

        try:
            with self.driver.session(database=self.database) as session:
                return session.execute_write(work) if write else session.execute_read(work)
        except self._neo4j.exceptions.Neo4jError as exc:
            raise CypherError(f"{exc.code}: {first_line(exc.message or exc)}") from None
        except self._neo4j.exceptions.DriverError as exc:
            raise StoreError(f"{self.uri}: {first_line(exc)}") from None

    def close(self) -> None:
        self.driver.close()

    # ------------------------------------------------------------ loading

    def load(self, catalog_dir: Path, progress: bool = True, batch_rows: int = BATCH_ROWS) -> bool:
        signature = catalog_signature(catalog_dir)
        state = self.execute(STATE_READ, {"id": STATE_ID}, write=False)
        done: set[str] = set()
        if state and state[0]["signature"] == signature:
            done = set(state[0]["parts"] or [])
        else:
            for statement in constraint_statements():
                self.execute(statement, None, write=True)
            if state:  # another catalog was loaded here: start from empty, never mix two catalogs
                while self.execute(CLEAR_BATCH, {"batch": batch_rows}, write=True)[0]["deleted"]:
                    pass
            self.execute(STATE_START, {"id": STATE_ID, "signature": signature}, write=True)
        plan = [(n.label, node_merge_statement(n), f) for n in NODES for f in part_files(catalog_dir, n.files)]
        plan += [(r.type, rel_merge_statement(r), f) for r in RELS for f in part_files(catalog_dir, r.files)]
        todo = [(label, statement, f) for label, statement, f in plan if _part_name(catalog_dir, f) not in done]
        if not todo:
            return False
        total = sum(pq.ParquetFile(f).metadata.num_rows for _, _, f in todo)
        with tqdm(total=total, desc=f"loading {self.uri}", unit="row", disable=not progress) as bar:
            for _, statement, f in todo:
                for rows in _batches(f, batch_rows):
                    self._write_batch(statement, rows)
                    bar.update(len(rows))
                self.execute(STATE_PART_DONE, {"id": STATE_ID, "part": [_part_name(catalog_dir, f)]}, write=True)
        return True

    def _write_batch(self, statement: str, rows: list[dict]) -> None:
        """One transaction per batch; the driver retries it on transient errors (deadlocks, leader changes)."""
        def work(tx):
            tx.run(statement, rows=rows).consume()

        try:
            with self.driver.session(database=self.database) as session:
                session.execute_write(work)
        except self._neo4j.exceptions.Neo4jError as exc:
            raise StoreError(f"load failed at {self.uri}: {exc.code}: {first_line(exc.message or exc)}") from None


def _batches(path: Path, size: int) -> Iterator[list[dict]]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=size):
        yield batch.to_pylist()


def _part_name(catalog_dir: Path, f: Path) -> str:
    return str(Path(f).relative_to(catalog_dir))


def write_admin_import(catalog_dir: Path, out_dir: Path, progress: Callable[[str], None] = print) -> str:
    """CSV files with the headers `neo4j-admin database import full` needs; returns the command to run."""
    import duckdb

    out_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    args = []
    for n in NODES:
        files = part_files(catalog_dir, n.files)
        if not files:
            continue
        key, *rest = n.columns
        header = [f"{key[0]}:ID({n.label})"] + [f"{c}:{_csv_type(t)}" for c, t in rest]
        (out_dir / f"{n.label}.header.csv").write_text(",".join(header) + "\n")
        cols = ", ".join(f"array_to_string(\"{c}\", chr(31))" if t.endswith("[]") else f'"{c}"' for c, t in n.columns)
        con.sql(f"COPY (SELECT {cols} FROM read_parquet($src)) TO '{out_dir / (n.label + '.csv')}' (HEADER false)",
                params={"src": [str(f) for f in files]})
        args.append(f"--nodes={n.label}={n.label}.header.csv,{n.label}.csv")
        progress(f"wrote {n.label}.csv")
    for r in RELS:
        files = part_files(catalog_dir, r.files)
        if not files:
            continue
        grouped = sum(other.type == r.type for other in RELS) > 1  # a type can join several label pairs (INSTANCE_OF)
        name = f"{r.type}-{r.target}" if grouped else r.type
        header = [f":START_ID({r.source})", f":END_ID({r.target})"] + [f"{c}:{_csv_type(t)}" for c, t in r.properties]
        (out_dir / f"{name}.header.csv").write_text(",".join(header) + "\n")
        cols = ", ".join(["src", "dst", *(f'"{c}"' for c, _ in r.properties)])
        con.sql(f"COPY (SELECT {cols} FROM read_parquet($src)) TO '{out_dir / (name + '.csv')}' (HEADER false)",
                params={"src": [str(f) for f in files]})
        args.append(f"--relationships={r.type}={name}.header.csv,{name}.csv")
        progress(f"wrote {name}.csv")
    con.close()
    return "neo4j-admin database import full --array-delimiter=U+001F " + " ".join(args) + " neo4j"


def _csv_type(t: str) -> str:
    return {"INT64": "long", "FLOAT": "float", "DOUBLE": "double", "STRING": "string", "STRING[]": "string[]", "BOOLEAN": "boolean"}[t]
