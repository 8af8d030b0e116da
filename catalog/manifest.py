"""The catalog's manifest: what was ingested, from which weights, with which settings.

A rerun compares the settings that decide the content (`identity`) with the existing manifest:
equal means resume and skip finished parts; different means refuse, so a directory never mixes
parts computed from two models, transcoder sets or thresholds. The manifest also records the catalog
format (`layout.FORMAT`): a catalog of another format is refused when its manifest is read, before
any part would be misread.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from circuit_catalog.catalog.layout import FORMAT, MANIFEST
from circuit_catalog.catalog.parquet_io import write_text_atomic

from circuit_catalog.errors import CatalogDirError, first_line


@dataclass
class Manifest:
    model: str
    model_weights_sha256: str
    transcoders: str
    transcoder_format: str
    transcoder_files: dict[str, str]  # file name -> sha256
    layers: list[int]
    d_sae: dict[str, int]  # layer (as str, JSON keys) -> width
    top_k: int | None
    min_weight: float | None
    token_top_k: int
    versions: dict[str, str]
    # the compute dtype of the model and transcoders, and of the pullback candidate scores (`ingest.pullbacks`);
    # a manifest from before they were recorded was float32 throughout
    dtype: str = "float32"
    pullback_score_dtype: str = "float32"
    device: str = ""  # what computed the last run: a resume may use another one (float32 agrees to rounding)
    status: str = "in-progress"
    created: str = ""
    completed: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    definitions: dict[str, str] = field(default_factory=dict)  # what the stored weights mean, for a reader of the files
    parts: dict[str, int] = field(default_factory=dict)  # finished part (relative path) -> rows, checked on resume
    format: int = FORMAT  # the catalog format written (`layout.FORMAT`); manifests before numbered formats lack it: 1
    heads_top_k: int | None = None  # OV pullbacks per attention head kept per (target feature, head); None: not computed

    def identity(self) -> dict:
        """The fields that decide the catalog's content."""
        keys = ("model_weights_sha256", "transcoder_files", "layers", "top_k", "min_weight", "token_top_k", "dtype",
                "pullback_score_dtype", "heads_top_k")
        return {k: getattr(self, k) for k in keys}

    def write(self, root: Path) -> None:
        write_text_atomic(json.dumps(asdict(self), indent=2) + "\n", root / MANIFEST)

    @classmethod
    def read(cls, root: Path) -> Manifest:
        path = root / MANIFEST
        if root.exists() and not root.is_dir():
            raise CatalogDirError(f"{root}: is a file, not a catalog directory")
        if not path.is_file():
            raise CatalogDirError(f"{root}: not a catalog directory (no {MANIFEST}); run `circuit-catalog ingest` first")
        try:
            manifest = cls(**{"format": 1, **json.loads(path.read_text())})
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
            raise CatalogDirError(f"{path}: unreadable manifest ({first_line(exc)})") from None
        except OSError as exc:
            raise CatalogDirError(f"{path}: unreadable manifest ({exc.strerror})") from None
        if manifest.format != FORMAT:  # its parts would be misread: refused before any is opened
            raise CatalogDirError(f"{root}: a catalog of format {manifest.format}; this version of circuit-catalog reads format "
                                  f"{FORMAT} only: ingest again into a new --catalog directory")
        return manifest


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
