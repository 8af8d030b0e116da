"""The graph-store interface: load a catalog directory, run named queries, run read-only Cypher.

Two backends share it: the embedded default (LadybugDB, `catalog.ladybug_store`) and Neo4j over Bolt
(`catalog.neo4j_store`). A backend module holds only what differs: connection, bulk-load path and
dialect. Everything a store holds is rebuilt from the catalog directory, the source of truth.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from circuit_catalog.catalog import layout
from circuit_catalog.catalog.cypher_check import NotReadOnly, check_read_only, check_size

from circuit_catalog.errors import CypherError, StoreError

Row = dict[str, Any]


class GraphStore(ABC):
    """One graph database holding one catalog."""

    dialect: str  # "ladybug" or "neo4j": picks the .cypher variant where the two differ

    @abstractmethod
    def load(self, catalog_dir: Path, progress: bool = True) -> bool:
        """Bring the store up to date with the catalog; returns False if it already was."""

    @abstractmethod
    def execute(self, query: str, params: dict[str, Any] | None, write: bool) -> list[Row]:
        """Run one statement with parameters; rows as dicts. `write=False` runs it read-only where the engine can."""

    def run(self, query: str, params: dict[str, Any] | None = None) -> list[Row]:
        """Run one of our own (named) read queries."""
        return self.execute(query, params, write=False)

    def cypher(self, query: str, params: dict[str, Any] | None = None, write: bool = False) -> list[Row]:
        """Run user Cypher: read clauses only unless `write`; always parameterised, never interpolated."""
        try:
            check_size(query)
            if not write:
                check_read_only(query)
        except NotReadOnly as exc:
            raise CypherError(str(exc)) from None
        return self.execute(query, params, write)

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> GraphStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_store(catalog_dir: Path, uri: str | None = None, database: str | None = None) -> GraphStore:
    """`uri` None or 'embedded': LadybugDB at DIR/graph; bolt:// or neo4j:// URIs: the Neo4j backend."""
    if uri in (None, "", "embedded"):
        from circuit_catalog.catalog.ladybug_store import LadybugStore

        return LadybugStore(Path(catalog_dir) / layout.GRAPH)
    if re.match(r"^(bolt|neo4j)(\+s|\+ssc)?://", uri):
        from circuit_catalog.catalog.neo4j_store import Neo4jStore

        return Neo4jStore(uri, database=database)
    raise StoreError(f"unknown store {uri!r}: use 'embedded' or a bolt:// / neo4j:// URI")


def open_loaded_store(catalog_dir: Path, uri: str | None = None, database: str | None = None, progress: bool = True) -> GraphStore:
    """A store ready for lookups: the embedded default is (re)loaded first if missing or older than the catalog."""
    store = open_store(catalog_dir, uri, database)
    if store.dialect == "ladybug":
        store.prepare(catalog_dir, progress=progress)
    return store
