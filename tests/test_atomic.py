"""The write-then-rename helpers: a target is replaced whole on success and untouched on failure, and no
temporary is left behind either way."""

from __future__ import annotations

import pytest
from circuit_catalog.catalog import layout
from circuit_catalog.catalog.atomic import atomic_directory, atomic_file


def leftovers(directory) -> list:
    return [p for pattern in layout.TEMPORARY for p in directory.glob(pattern)]


def fill(directory, files: dict[str, str]) -> None:
    for name, text in files.items():
        (directory / name).write_text(text)


def contents(directory) -> dict[str, str]:
    return {p.name: p.read_text() for p in directory.iterdir()}


def test_a_new_directory_replaces_the_old_one_whole(tmp_path):
    target = tmp_path / "part"
    target.mkdir()
    fill(target, {"a.parquet": "old a", "b.parquet": "old b"})
    with atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".{target.name}.tmp-")  # the pattern readers skip
        assert tmp in leftovers(tmp_path)  # what a kill at this point leaves is recognised as a leftover
        fill(tmp, {"a.parquet": "new a"})
        assert contents(target) == {"a.parquet": "old a", "b.parquet": "old b"}  # readers see the old one until the swap
    assert contents(target) == {"a.parquet": "new a"}  # nothing of the old directory survives
    assert leftovers(tmp_path) == []


def test_a_directory_is_created_where_there_was_none(tmp_path):
    target = tmp_path / "deeper" / "part"
    with atomic_directory(target) as tmp:
        fill(tmp, {"x": "1"})
    assert contents(target) == {"x": "1"} and leftovers(target.parent) == []


def test_a_failure_inside_leaves_the_old_directory_and_no_temporary(tmp_path):
    target = tmp_path / "part"
    target.mkdir()
    fill(target, {"a.parquet": "old a"})
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_directory(target) as tmp:
            fill(tmp, {"a.parquet": "new a"})
            raise RuntimeError("half-way")
    assert contents(target) == {"a.parquet": "old a"}
    assert leftovers(tmp_path) == []
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "absent"):
            raise RuntimeError("half-way")
    assert not (tmp_path / "absent").exists() and leftovers(tmp_path) == []


def test_files_are_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert target.read_text() == "old" and leftovers(tmp_path) == []
    with atomic_file(target) as tmp:
        assert tmp.name.startswith(f".{target.name}.tmp-")
        tmp.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new" and leftovers(tmp_path) == []
