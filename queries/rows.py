"""Tabular results of the API: a list of typed rows that also converts to Arrow or pandas.

Lookups return dataclasses (or, for free-form Cypher, dicts) so that code reads `edge.weight`, not
`row[1]`; notebooks usually want a frame, so every list of rows offers `.to_arrow()` and `.to_pandas()`.
pandas stays optional: only `.to_pandas()` needs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

import pyarrow as pa

from circuit_catalog.errors import UserError

T = TypeVar("T")


def plain(row: Any) -> Any:
    """A row as plain values: dataclasses and named tuples (the API's (token, weight) pairs) become dicts."""
    if dataclasses.is_dataclass(row) and not isinstance(row, type):
        return {f.name: plain(getattr(row, f.name)) for f in dataclasses.fields(row)}
    if isinstance(row, tuple) and hasattr(row, "_fields"):
        return {name: plain(v) for name, v in zip(row._fields, row)}
    if isinstance(row, dict):
        return {k: plain(v) for k, v in row.items()}
    if isinstance(row, (list, tuple)):
        return [plain(v) for v in row]
    return row


class Rows(list, Generic[T]):
    """A list of rows of one type; `columns` names them even when the list is empty."""

    def __init__(self, rows: Iterable[T] = (), columns: list[str] | None = None):
        super().__init__(rows)
        self.columns = columns

    def to_arrow(self) -> pa.Table:
        if not self:
            return pa.table({name: pa.array([], pa.null()) for name in self.columns or []})
        return pa.Table.from_pylist([plain(r) for r in self])

    def to_pandas(self):
        try:
            import pandas  # noqa: F401  (only to say clearly what is missing)
        except ImportError:
            raise UserError("to_pandas() needs pandas (pip install pandas); to_arrow() needs nothing more") from None
        return self.to_arrow().to_pandas()


def rows_of(cls: type[T], items: Iterable[T]) -> Rows[T]:
    """Rows of a dataclass type, named by its fields even when there are none."""
    return Rows(items, [f.name for f in dataclasses.fields(cls)])
