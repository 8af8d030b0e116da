"""The resumable ingest job: model + transcoders -> catalog directory of Parquet parts.

Every part is written to a temporary name and renamed, so after an interruption each part is either
complete or absent; a rerun with the same settings skips the complete ones. The graph stores are
loaded from this directory later and never written here.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from catalog import layout
from catalog.errors import CatalogDirError
from catalog.manifest import Manifest, now
from catalog.parquet_io import feature_ids, write_atomic
from ingest.mapped_weights import release_mapped
from ingest.models import file_digest, weights_digest
from ingest.pullbacks import DEFINITION as PULLBACK_DEFINITION
from ingest.pullbacks import select_edges
from ingest.residual import as_read_by
from ingest.token_edges import TopTokens, extended_embedding, extended_embedding_for, top_logit_tokens, top_tokens_into
from ingest.transcoder import TranscoderSet


@dataclass
class IngestSettings:
    top_k: int | None = 16
    min_weight: float | None = None
    token_top_k: int = 20


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("circuit-catalog", "torch", "transformer-lens", "transformers", "pyarrow", "duckdb"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def build_manifest(model, model_name: str, tset: TranscoderSet, transcoders: str, settings: IngestSettings) -> Manifest:
    root = Path(transcoders)
    files = {}
    for f in tset.files:
        name = str(f.relative_to(root)) if root.is_dir() and f.is_relative_to(root) else f.name
        files[name] = file_digest(f)
    return Manifest(
        model=model_name,
        model_weights_sha256=weights_digest(model),
        transcoders=str(transcoders),
        transcoder_format=tset.format,
        transcoder_files=files,
        layers=tset.layers,
        d_sae={str(tc.layer): tc.cfg.d_sae for tc in tset},
        top_k=settings.top_k,
        min_weight=settings.min_weight,
        token_top_k=settings.token_top_k,
        versions=_versions(),
        created=now(),
        definitions={"pullback": PULLBACK_DEFINITION},
    )


def run_ingest(model, tset: TranscoderSet, root: Path, manifest: Manifest, progress: bool = True) -> Manifest:
    """Compute every missing part of the catalog in `root`; returns the completed manifest."""
    tset.require_bound()
    root.mkdir(parents=True, exist_ok=True)
    if (root / layout.MANIFEST).is_file():
        existing = Manifest.read(root)
        if existing.identity() != manifest.identity():
            changed = [k for k, v in manifest.identity().items() if existing.identity()[k] != v]
            raise CatalogDirError(
                f"{root} holds a catalog built with other {', '.join(changed)}; use a new --catalog directory"
            )
        manifest.created = existing.created
    manifest.write(root)
    settings = IngestSettings(manifest.top_k, manifest.min_weight, manifest.token_top_k)

    pairs = [(lo, hi) for hi in tset.layers for lo in tset.layers if lo < hi]
    parts = ["tokens"] + [f"tokens->{layer}" for layer in tset.layers] + [f"{a}->{b}" for a, b in pairs]
    bar = tqdm(total=len(parts), desc="ingest", unit="part", disable=not progress)

    tokens_path = root / layout.TOKENS
    if not tokens_path.exists():
        write_atomic(_token_table(model), tokens_path)
    bar.update()

    ext: torch.Tensor | None = None
    for tc in tset:
        bar.set_postfix_str(f"token edges L{tc.layer}")
        d_path, l_path = layout.deembed_part(root, tc.layer), layout.logit_part(root, tc.layer)
        if not d_path.exists():
            if ext is None:
                ext = extended_embedding(model)
            raw = top_tokens_into(model, tc, model.W_E, settings.token_top_k, normalise=False)
            extended = top_tokens_into(model, tc, extended_embedding_for(model, tc, ext), settings.token_top_k, normalise=True)
            write_atomic(_deembed_table(tc.layer, raw, extended), d_path)
        if not l_path.exists():
            write_atomic(_logit_table(tc.layer, top_logit_tokens(model, tset.total_write(tc.layer, model.cfg.n_layers), settings.token_top_k)), l_path)
        bar.update()

    for lo, hi in pairs:
        path = layout.pullback_part(root, lo, hi)
        bar.set_postfix_str(f"pullbacks L{lo}->L{hi}")
        if not path.exists():
            write_atomic(pullback_table(model, tset, lo, hi, settings), path)
            release_mapped()  # one pair's encoder and decoder in memory at a time (see ingest.mapped_weights)
        bar.update()
    bar.close()

    write_features(root, tset)
    manifest.counts = count_rows(root)
    manifest.status, manifest.completed = "complete", now()
    manifest.write(root)
    return manifest


@torch.no_grad()
def pullback_table(model, tset: TranscoderSet, lo: int, hi: int, settings: IngestSettings) -> pa.Table:
    """All kept pullback edges from layer `lo` features into layer `hi` features (a CLT feature's write into
    layer `hi`'s input is the sum of its decoder slices into layers lo .. hi-1)."""
    W_dec = as_read_by(model, tset[hi], tset.total_write(lo, hi))
    return pullback_edges_table(W_dec, tset[hi].W_enc, lo, hi, settings)


def pullback_edges_table(W_dec: torch.Tensor, W_enc: torch.Tensor, lo: int, hi: int, settings: IngestSettings) -> pa.Table:
    """Select edges block by block and lay them out as the Parquet part's columns."""
    blocks = list(select_edges(W_dec, W_enc, settings.top_k, settings.min_weight))
    src = torch.cat([b.src for b in blocks]).numpy()
    dst = torch.cat([b.dst for b in blocks]).numpy()
    weight = torch.cat([b.weight for b in blocks]).numpy()
    return pa.table(
        [feature_ids(lo, pa.array(src)), feature_ids(hi, pa.array(dst)), pa.array(weight, pa.float32())],
        schema=layout.PULLBACK_SCHEMA,
    )


def _token_table(model) -> pa.Table:
    tok = model.tokenizer
    texts = [tok.decode([i]) for i in range(model.cfg.d_vocab)]
    return pa.table([pa.array(range(len(texts)), pa.int64()), pa.array(texts, pa.string())], schema=layout.TOKEN_SCHEMA)


def _deembed_table(layer: int, raw: TopTokens, extended: TopTokens) -> pa.Table:
    tables = []
    for variant, top in (("raw", raw), ("extended", extended)):
        n, k = top.token.shape
        features = torch.arange(n).repeat_interleave(k).numpy()
        tables.append(pa.table(
            [pa.array(top.token.reshape(-1).numpy()), feature_ids(layer, pa.array(features)),
             pa.array(top.weight.reshape(-1).numpy(), pa.float32()), pa.array([variant] * (n * k), pa.string())],
            schema=layout.DEEMBED_SCHEMA,
        ))
    return pa.concat_tables(tables)


def _logit_table(layer: int, top: TopTokens) -> pa.Table:
    n, k = top.token.shape
    features = torch.arange(n).repeat_interleave(k).numpy()
    return pa.table(
        [feature_ids(layer, pa.array(features)), pa.array(top.token.reshape(-1).numpy()),
         pa.array(top.weight.reshape(-1).numpy(), pa.float32())],
        schema=layout.LOGIT_SCHEMA,
    )


def write_features(root: Path, tset: TranscoderSet, summary_k: int = 10) -> None:
    """features.parquet: one row per feature with its top de-embedding and logit-lens tokens (DuckDB join)."""
    import duckdb

    rows = pa.table({
        "id": pa.concat_arrays([feature_ids(tc.layer, pa.array(range(tc.cfg.d_sae), pa.int64())) for tc in tset]),
        "layer": pa.array([tc.layer for tc in tset for _ in range(tc.cfg.d_sae)], pa.int32()),
        "index": pa.array([i for tc in tset for i in range(tc.cfg.d_sae)], pa.int32()),
        "transcoder": pa.array([Path(tc.source).parent.name or tc.source for tc in tset for _ in range(tc.cfg.d_sae)], pa.string()),
    })
    con = duckdb.connect()
    con.register("base", rows)
    d_glob, l_glob, t_path = (str(root / layout.DEEMBED / "*.parquet"), str(root / layout.LOGITS / "*.parquet"), str(root / layout.TOKENS))
    stats_path = root / layout.STATS / "features.parquet"
    stats = (f"(SELECT id, frequency, mean_act, max_act FROM read_parquet('{_sql_literal(stats_path)}'))" if stats_path.is_file()
             else "(SELECT NULL::VARCHAR AS id, NULL::DOUBLE AS frequency, NULL::FLOAT AS mean_act, NULL::FLOAT AS max_act)")
    table = con.sql(
        f"""
        WITH tok AS (SELECT id, text FROM read_parquet($t)),
        de AS (
            SELECT d.dst AS id, d.variant,
                   list(tok.text ORDER BY d.weight DESC)[1:{summary_k}] AS tokens,
                   list(d.weight ORDER BY d.weight DESC)[1:{summary_k}] AS weights
            FROM read_parquet($d) d JOIN tok ON tok.id = d.src GROUP BY d.dst, d.variant),
        lo AS (
            SELECT l.src AS id,
                   list(tok.text ORDER BY l.weight DESC)[1:{summary_k}] AS tokens,
                   list(l.weight ORDER BY l.weight DESC)[1:{summary_k}] AS weights
            FROM read_parquet($l) l JOIN tok ON tok.id = l.dst GROUP BY l.src)
        SELECT base.id, base.layer, base."index", base.transcoder,
               raw.tokens AS deembed_tokens, raw.weights AS deembed_weights,
               ext.tokens AS deembed_ext_tokens, ext.weights AS deembed_ext_weights,
               lo.tokens AS logit_tokens, lo.weights AS logit_weights,
               st.frequency, st.mean_act, st.max_act
        FROM base
        LEFT JOIN de raw ON raw.id = base.id AND raw.variant = 'raw'
        LEFT JOIN de ext ON ext.id = base.id AND ext.variant = 'extended'
        LEFT JOIN lo ON lo.id = base.id
        LEFT JOIN {stats} st ON st.id = base.id
        ORDER BY base.layer, base."index"
        """,
        params={"t": t_path, "d": d_glob, "l": l_glob},
    ).to_arrow_table()
    con.close()
    write_atomic(table, root / layout.FEATURES)


def _sql_literal(path: Path) -> str:
    return str(path).replace("'", "''")


def count_rows(root: Path) -> dict[str, int]:
    def rows(paths) -> int:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)

    return {
        "features": rows([root / layout.FEATURES]),
        "tokens": rows([root / layout.TOKENS]),
        "pullback_edges": rows(sorted((root / layout.PULLBACKS).glob("*.parquet"))),
        "deembed_edges": rows(sorted((root / layout.DEEMBED).glob("*.parquet"))),
        "logit_edges": rows(sorted((root / layout.LOGITS).glob("*.parquet"))),
    }


def run_stats(model, tset: TranscoderSet, root: Path, dataset: str, n_tokens: int, ctx_len: int = 128, top_k: int = 20,
              progress: bool = True) -> bool:
    """Collect activation statistics into `DIR/stats/` (all files appear together); False if already there."""
    from ingest.datasets import token_contexts
    from ingest.stats import PER_BIN, QUANTILE_BINS, collect_stats, stats_tables

    info = {"dataset": dataset, "tokens": n_tokens, "ctx_len": ctx_len, "top_k": top_k, "layers": tset.layers,
            "quantile_bins": QUANTILE_BINS, "per_bin": PER_BIN}
    target = root / layout.STATS
    if (target / "info.json").is_file():
        if json.loads((target / "info.json").read_text()) == info:
            return False
        raise CatalogDirError(f"{target} holds statistics collected with other settings (or by an older version); remove it to collect anew")
    tokens = token_contexts(model.tokenizer, dataset, n_tokens, ctx_len)
    tables = stats_tables(tset, collect_stats(model, tset, tokens, top_k, progress=progress), tokens)
    tmp = Path(tempfile.mkdtemp(prefix=".stats.tmp-", dir=root))
    try:
        for name, table in tables.items():
            write_atomic(table, tmp / f"{name}.parquet")
        (tmp / "info.json").write_text(json.dumps(info, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_features(root, tset)  # feature rows (and so the stores' Feature nodes) gain frequency, mean_act, max_act
    return True
