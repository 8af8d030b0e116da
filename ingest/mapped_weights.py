"""Safetensors files mapped into memory, so transcoder sets larger than RAM can be read.

A mapped tensor is a view of the file's pages: nothing is read until a computation touches it, and
`release_mapped()` hands the touched pages back to the kernel (they are read again from the file when
touched again). The pullback ingest releases after each layer pair, so its memory holds one pair's
encoder and decoder at a time, whatever the size of the set (`bench/mapped_pullbacks.py` measures it).

The file layout is safetensors' own: an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the data. The mapping is copy-on-write, so a tensor may be
modified in place without touching the file.
"""

from __future__ import annotations

import json
import mmap
import struct
import weakref
from pathlib import Path

import numpy as np
import torch

from circuit_catalog.errors import TranscoderError

_DTYPES = {  # safetensors dtype -> (numpy dtype to map the bytes as, torch dtype of the tensor)
    "F64": (np.float64, torch.float64), "F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
    "BF16": (np.uint16, torch.bfloat16), "I64": (np.int64, torch.int64), "I32": (np.int32, torch.int32),
    "I16": (np.int16, torch.int16), "I8": (np.int8, torch.int8), "U8": (np.uint8, torch.uint8), "BOOL": (np.bool_, torch.bool),
}
_OPEN: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> a map whose pages `release_mapped` hands back


class _Map(np.memmap):
    """np.memmap is not weak-referenceable by default; a subclass is."""


def read_mapped(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of its memory-mapped pages; a damaged file is one error."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise TranscoderError(f"{path}: unreadable safetensors ({str(exc)[:120]}); truncated or corrupt?") from None
    header.pop("__metadata__", None)
    data = _Map(path, dtype=np.uint8, mode="c")
    _OPEN[id(data)] = data
    tensors = {}
    for name, spec in header.items():
        try:
            np_dtype, torch_dtype = _DTYPES[spec["dtype"]]
            start, end = (8 + n + offset for offset in spec["data_offsets"])
            shape = tuple(spec["shape"])
        except (KeyError, TypeError, ValueError):
            raise TranscoderError(f"{path}: tensor {name!r} has an unreadable header entry {spec!r}") from None
        count = int(np.prod(shape, dtype=np.int64))
        if end > size or end - start != count * np.dtype(np_dtype).itemsize:
            raise TranscoderError(f"{path}: tensor {name!r} runs past the end of the file or has the wrong size; truncated?")
        raw = data[start:end]
        array = raw.view(np_dtype) if start % np.dtype(np_dtype).itemsize == 0 else np.frombuffer(raw.tobytes(), np_dtype)
        t = torch.from_numpy(array.reshape(shape))  # the file's pages, so host memory; `TranscoderSet.to` copies elsewhere
        tensors[name] = t.view(torch_dtype) if torch_dtype == torch.bfloat16 else t
    return tensors


# Linux's MADV_PAGEOUT (5.4+; Python 3.11 does not name it): reclaim the pages now. Unmodified pages are
# read from the file again when touched; modified (copy-on-write) ones stay, so nothing is ever lost, unlike
# MADV_DONTNEED, which would revert them. Where the kernel refuses it, releasing does nothing.
_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21)


def prefetch_mapped(tensors: tuple[torch.Tensor | None, ...]) -> None:
    """Ask the kernel to read the files behind these tensors ahead (MADV_WILLNEED), so the computation that touches
    them next finds their pages in memory instead of faulting them in one by one; other tensors are ignored."""
    ptrs = [t.data_ptr() for t in tensors if t is not None]
    for data in list(_OPEN.values()):
        start = data.ctypes.data
        if any(start <= ptr < start + data.size for ptr in ptrs):
            try:
                data._mmap.madvise(mmap.MADV_WILLNEED)
            except (OSError, ValueError):
                return


def release_mapped(keep: tuple[torch.Tensor | None, ...] = ()) -> None:
    """Hand every mapped file's touched, unmodified pages back to the kernel (the data stays readable), except the
    files behind the tensors in `keep`: pages about to be read again stay rather than be read from disk again."""
    kept = [t.data_ptr() for t in keep if t is not None]
    for data in list(_OPEN.values()):
        start = data.ctypes.data
        if any(start <= ptr < start + data.size for ptr in kept):
            continue
        try:
            data._mmap.madvise(_PAGEOUT)
        except (OSError, ValueError):
            return
