"""Files for `neo4j-admin database import full`, the bulk route into Neo4j for very large catalogs.

Written to the rules of the Neo4j 5 operations manual ("Import": options, CSV header format, property data
types) and of its CSV reader: fields separated by `,`, text in `"` with `""` for a quote inside and no
backslash escapes; an unquoted empty field is null, a quoted one the empty string; floats are read by Java's
`Double.parseDouble`, so NaN and infinities are written `NaN`, `Infinity`, `-Infinity`; booleans are `true`
only when they read exactly `true`; arrays are joined by U+001F, which no token text may contain.
Every string is quoted and `--trim-strings=false` is passed, so a token like " Paris" keeps its space;
`--multiline-fields=true` lets prompt and token texts hold newlines. Token ids stay integers
(`id:ID(Token){id-type:long}`), so a later transactional `load` finds the imported Tokens instead of
adding string-keyed copies. The importer creates no schema: `schema.cypher` beside the files holds the
constraints, the indexes, a wait for them, and the `CatalogState` node that tells `load` the store is current.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from circuit_catalog.catalog.atomic import atomic_file
from circuit_catalog.catalog.graph_schema import NODES, RELS, absent_columns, catalog_signature, node_set
from circuit_catalog.catalog.layout import part_files
from circuit_catalog.catalog.neo4j_store import INDEX_WAIT_S, STATE_ID, schema_statements
from circuit_catalog.catalog.parquet_io import make_output_dir, write_text_atomic
from circuit_catalog.catalog.tallies import refresh_tallies

from circuit_catalog.errors import CatalogDirError

HEADER_TYPES = {"INT64": "long", "FLOAT": "float", "DOUBLE": "double", "STRING": "string", "STRING[]": "string[]",
                "BOOLEAN": "boolean"}


@dataclass
class AdminImport:
    """What `export-neo4j-import` wrote: the import command (run with the server stopped), then the schema command."""

    import_args: list[str]
    schema_args: list[str]

    @property
    def import_command(self) -> str:
        return shlex.join(self.import_args)

    @property
    def schema_command(self) -> str:
        return shlex.join(self.schema_args)


def write_admin_import(catalog_dir: Path, out_dir: Path, import_dir: str = "/import", database: str = "neo4j",
                       progress: Callable[[str], None] = print) -> AdminImport:
    """CSV files, headers and schema.cypher in `out_dir`, named in the commands by `import_dir`, the path the
    server's container sees (compose mounts data/neo4j-import at /import). Each file appears complete or not at all."""
    import duckdb

    catalog_dir, out_dir = Path(catalog_dir), Path(out_dir)
    signature = catalog_signature(catalog_dir)  # refuses an unfinished catalog
    refresh_tallies(catalog_dir)
    make_output_dir(out_dir)  # a file or an unwritable place there is one error
    con = duckdb.connect()
    args = ["neo4j-admin", "database", "import", "full", database,  # the database first: since 5.19 --nodes is greedy
            "--overwrite-destination=true", "--multiline-fields=true", "--trim-strings=false",
            "--array-delimiter=U+001F"]  # delimiter and quote: the defaults, `,` and `"`
    parts: list[str] = []

    def export(name: str, header: list[str], columns: list[tuple[str, str]], files: list[Path]) -> None:
        write_text_atomic(",".join(header) + "\n", out_dir / f"{name}.header.csv")
        _copy_csv(con, columns, files, out_dir / f"{name}.csv")
        parts.extend(str(f.relative_to(catalog_dir)) for f in files)
        progress(f"wrote {name}.csv")

    for n in NODES:
        files = part_files(catalog_dir, n.files)
        if files:
            (key, key_type), *rest = n.columns
            id_field = f"{key}:ID({n.label})" + ("{id-type:long}" if key_type == "INT64" else "")
            export(n.label, [id_field] + [f"{c}:{HEADER_TYPES[t]}" for c, t in rest], list(n.columns), files)
            args.append(f"--nodes={n.label}={import_dir}/{n.label}.header.csv,{import_dir}/{n.label}.csv")
    for r in RELS:
        files = part_files(catalog_dir, r.files)
        if files:
            grouped = sum(other.type == r.type for other in RELS) > 1  # a type can join several label pairs
            name = f"{r.type}-{r.target}" if grouped else r.type
            header = [f":START_ID({r.source})", f":END_ID({r.target})"] + [f"{c}:{HEADER_TYPES[t]}" for c, t in r.properties]
            columns = [("src", node_set(r.source).columns[0][1]), ("dst", node_set(r.target).columns[0][1]), *r.properties]
            export(name, header, columns, files)
            args.append(f"--relationships={r.type}={import_dir}/{name}.header.csv,{import_dir}/{name}.csv")
    con.close()
    write_text_atomic(schema_script(signature, parts), out_dir / "schema.cypher")
    progress("wrote schema.cypher")
    schema_args = ["cypher-shell", "-d", database, "-f", f"{import_dir}/schema.cypher"]  # user and password: NEO4J_USERNAME, NEO4J_PASSWORD
    return AdminImport(args, schema_args)


def schema_statements_after_import(signature: str, parts: list[str]) -> list[str]:
    """The statements of schema.cypher: constraints and indexes, a wait for them, and the load state."""
    state = ", ".join(_cypher_string(p) for p in parts)
    return [*schema_statements(), f"CALL db.awaitIndexes({INDEX_WAIT_S})",
            f"MERGE (s:CatalogState {{id: {_cypher_string(STATE_ID)}}}) "
            f"SET s.signature = {_cypher_string(signature)}, s.parts = [{state}], s.started = [{state}]"]


def schema_script(signature: str, parts: list[str]) -> str:
    return "".join(f"{s};\n" for s in schema_statements_after_import(signature, parts))


def _copy_csv(con, columns: list[tuple[str, str]], files: list[Path], out: Path) -> None:
    """One CSV, no header, by DuckDB: strings quoted, floats spelled as Java parses them, arrays joined; a column the
    parts lack (`absent_columns`) as empty fields, which the importer reads as no property."""
    exprs, quoted = [], []
    absent = absent_columns([name for name, _ in columns], files)
    for name, kind in columns:
        col = f'"{name}"'
        if name in absent:
            exprs.append(f"NULL AS {col}")
            continue
        if kind == "STRING[]":
            bad = con.execute(f"SELECT count(*) FROM read_parquet($src) "
                              f"WHERE contains(array_to_string({col}, ''), chr(31))", {"src": [str(f) for f in files]}).fetchone()[0]
            if bad:
                raise CatalogDirError(f"{files[0].parent}: {bad} {name} lists hold U+001F, the import's array delimiter")
            expr = f"array_to_string({col}, chr(31))"
        elif kind in ("FLOAT", "DOUBLE"):
            expr = (f"CASE WHEN isnan({col}) THEN 'NaN' WHEN isinf({col}) AND {col} > 0 THEN 'Infinity' "
                    f"WHEN isinf({col}) THEN '-Infinity' ELSE CAST({col} AS VARCHAR) END")
        else:
            expr = col
        if kind in ("STRING", "STRING[]"):
            quoted.append(col)
        exprs.append(f"{expr} AS {col}")
    force = f", FORCE_QUOTE ({', '.join(quoted)})" if quoted else ""
    with atomic_file(out) as tmp:
        con.execute(f"COPY (SELECT {', '.join(exprs)} FROM read_parquet($src)) TO {_sql_string(tmp)} "
                    f"(FORMAT csv, HEADER false, DELIMITER ',', QUOTE '\"', ESCAPE '\"'{force})",
                    {"src": [str(f) for f in files]})


def _sql_string(path: Path) -> str:
    """A SQL string literal (COPY ... TO takes no parameter): quotes doubled."""
    return "'" + str(path).replace("'", "''") + "'"


def _cypher_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
