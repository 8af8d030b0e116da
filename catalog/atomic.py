"""Outputs that appear whole or not at all: written under a temporary name beside the target, then renamed.

The temporary is hidden and named `.<name>.tmp-*`, the pattern `layout.TEMPORARY` knows: readers skip it
(`layout.part_files`) and the next writer of a catalog removes what a killed run left (`lock.writer_lock`).
Catalog parts, manifests, reports, exports, prompt and statistics directories, trained transcoders and
converted models are all written this way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write; renamed to `path` on success, removed on error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yields a new empty directory beside `target` to fill; on success it takes `target`'s place, on error
    it is removed and `target` stays as it was.

    A directory cannot be renamed over a full one, so an existing `target` is first moved aside (to another
    temporary name) and removed only once the new one is in place; were the swap itself to fail, it is
    moved back. A kill between the two renames leaves `target` absent and both temporaries behind: a catalog
    part that is absent is recomputed, never half-read.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = tmp.with_name(f"{tmp.name}-old")
    try:
        yield tmp
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        if old.exists() and not target.exists():
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
