"""One writer per catalog: ingest, load and `cypher --write` hold an exclusive lock; readers never wait.

Two writers racing over one directory interleave parts and manifests (the loser used to report a
misleading "has not finished"). The lock is `flock` on `DIR/.writer.lock`, released by the kernel when
its holder dies, so a killed writer never leaves it held; the file keeps the holder's PID for the
message. Whoever takes the lock knows no other writer runs, so every temporary is a crash leftover
and is removed then.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from circuit_catalog.catalog import layout

from circuit_catalog.errors import CatalogBusy, CatalogDirError

_HELD: dict[Path, int] = {}  # catalogs this process holds the lock of -> nesting depth


@contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    """Hold the catalog's writer lock (creating the directory if needed) or raise `CatalogBusy`.

    Re-entrant within a process, so a command that runs several writing steps (ingest: parts, statistics,
    prompts) holds it from the first to the last, and no other writer slips in between."""
    root = Path(root)
    key = root.resolve()
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    if root.exists() and not root.is_dir():
        raise CatalogDirError(f"{root}: is a file, not a catalog directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / layout.WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise CatalogDirError(f"{root}: cannot write the catalog here ({exc.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise CatalogBusy(f"{root}: catalog is being written by PID {pid}; retry when it has finished") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        remove_temporaries(root)
        _HELD[key] = 1
        yield
    finally:
        _HELD.pop(key, None)
        os.close(fd)


def remove_temporaries(root: Path) -> None:
    for p in layout.temporaries(root):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
