"""The resumable ingest job: model + transcoders -> catalog directory of Parquet parts (tokens, de-embedding and
logit-lens edges, pullbacks, features.parquet) and, over a dataset, the activation statistics `DIR/stats/`
(collected by `ingest.stats`, planned and checked against the catalog here).

Every part is written to a temporary name and renamed, so after an interruption each part is either
complete or absent; a rerun with the same settings skips the complete ones. The graph stores are
loaded from this directory later and never written here. Prompt graphs: `ingest.prompts`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from circuit_catalog.catalog import layout
from circuit_catalog.catalog.atomic import atomic_directory
from circuit_catalog.catalog.crash import crash_point
from circuit_catalog.catalog.ids import feature_ids
from circuit_catalog.catalog.lock import remove_temporaries, writer_lock
from circuit_catalog.catalog.manifest import Manifest, now
from circuit_catalog.catalog.parquet_io import part_intact, part_rows, write_atomic, write_text_atomic
from circuit_catalog.ingest.device import dtype_name, resolve_dtype, score_dtype_for
from circuit_catalog.ingest.executor import Executor, SerialExecutor, Worker, groups, run_unit
from circuit_catalog.ingest.heads import DEFINITION as OV_DEFINITION
from circuit_catalog.ingest.heads import head_pairs, head_table, ov_table, ov_token_table
from circuit_catalog.ingest.mapped_weights import release_mapped
from circuit_catalog.ingest.models import check_context, file_digest, weights_digest
from circuit_catalog.ingest.pullbacks import DEFINITION as PULLBACK_DEFINITION
from circuit_catalog.ingest.pullbacks import select_edges
from circuit_catalog.ingest.residual import as_read_by
from circuit_catalog.ingest.token_edges import (
    TopTokens,
    extended_embedding,
    extended_embedding_for,
    top_logit_tokens,
    top_tokens_into,
)
from circuit_catalog.ingest.settings import STATS_ADDED, IngestSettings
from circuit_catalog.ingest.transcoder import TranscoderSet
from circuit_catalog.progress import tqdm

from circuit_catalog.errors import CatalogDirError


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("circuit-catalog", "torch", "transformer-lens", "transformers", "pyarrow", "duckdb"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def build_manifest(model, model_name: str, tset: TranscoderSet, transcoders: str, settings: IngestSettings,
                   device: str | None = None) -> Manifest:
    """The manifest of a catalog of `model` and `tset` with `settings`; `device`: where the parts are computed (default
    the model's; a Ray run's workers' device), which an "auto" score dtype resolves for."""
    device = torch.device(device) if device is not None else model.W_E.device
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
        dtype=dtype_name(model.W_E.dtype),
        pullback_score_dtype=score_dtype_for(settings.pullback_score_dtype, device),
        device=str(device),
        created=now(),
        definitions={"pullback": PULLBACK_DEFINITION, **({"ov": OV_DEFINITION} if settings.heads_top_k else {})},
        heads_top_k=settings.heads_top_k,
    )


def run_ingest(model, tset: TranscoderSet, root: Path, manifest: Manifest, progress: bool = True,
               executor: Executor | None = None) -> Manifest:
    """Compute every missing part of the catalog in `root` (its units on `executor`, default here, one after another;
    `ingest.executor`); returns the completed manifest.

    Holds the catalog's writer lock. A rerun with other settings is refused before anything is
    written; a rerun of a complete catalog whose parts all check out writes nothing (so a loaded
    store stays current). On resume each finished part is checked (readable footer, the row count
    recorded when it was written) and recomputed if damaged.
    """
    tset.require_bound()
    with writer_lock(root):
        existing = _existing(root, manifest)
        if existing is not None:
            manifest.created, manifest.parts = existing.created, dict(existing.parts)
            if existing.status == "complete" and all(_finished(root, manifest, p) for p in _all_parts(root, tset, model, bool(manifest.heads_top_k))):
                return existing
        manifest.status = "in-progress"
        manifest.write(root)
        _copy_training_record(Path(manifest.transcoders), root)
        _compute_parts(model, tset, root, manifest, progress, executor or SerialExecutor(model, tset))
        write_features(root, tset)
        _finished(root, manifest, root / layout.FEATURES)
        manifest.counts = count_rows(root)
        manifest.status, manifest.completed = "complete", now()
        manifest.write(root)
    return manifest


def _copy_training_record(transcoders: Path, root: Path) -> None:
    """The transcoders' training record (config, held-out figures, curve), if `train` made them, kept with the catalog
    so its overview shows how they were trained."""
    record = transcoders / layout.TRAINING
    if transcoders.is_dir() and record.is_file():
        write_text_atomic(record.read_text(), root / layout.TRAINING)


def _existing(root: Path, manifest: Manifest) -> Manifest | None:
    """The manifest already in `root`, if any; refuses one built with other settings."""
    if not (root / layout.MANIFEST).is_file():
        return None
    existing = Manifest.read(root)
    if existing.identity() != manifest.identity():
        changed = [k for k, v in manifest.identity().items() if existing.identity()[k] != v]
        raise CatalogDirError(f"{root} holds a catalog built with other {', '.join(changed)}; use a new --catalog directory")
    return existing


def _all_parts(root: Path, tset: TranscoderSet, model=None, heads: bool = False) -> list[Path]:
    parts = [root / layout.TOKENS, root / layout.FEATURES]
    parts += [p for tc in tset for p in (layout.deembed_part(root, tc.layer), layout.logit_part(root, tc.layer))]
    parts += [layout.pullback_part(root, lo, hi) for hi in tset.layers for lo in tset.layers if lo < hi]
    if heads:
        parts += [root / layout.HEAD_INDEX]
        parts += [p for m, L in head_pairs(model, tset) for p in (layout.ov_part(root, m, L), layout.ov_token_part(root, m, L))]
    return parts


def _finished(root: Path, manifest: Manifest, path: Path) -> bool:
    """A part is finished when its footer reads and its rows are those recorded; a damaged one is deleted."""
    if not path.exists():
        return False
    key, rows = str(path.relative_to(root)), part_rows(path)
    if rows is not None and manifest.parts.setdefault(key, rows) == rows:
        return True
    path.unlink()
    manifest.parts.pop(key, None)
    return False


def _write_part(root: Path, manifest: Manifest, table: pa.Table, path: Path) -> None:
    write_atomic(table, path)
    _record(root, manifest, str(path.relative_to(root)), table.num_rows)


def _record(root: Path, manifest: Manifest, part: str, rows: int) -> None:
    """The driver's side of a finished part: into the manifest (`part` relative to `root`)."""
    manifest.parts[part] = rows
    manifest.write(root)
    crash_point("part")


def _written(root: Path, table: pa.Table, path: Path) -> tuple[str, int]:
    """A unit's side: the part written whole; (its path relative to `root`, rows) for the driver to record."""
    write_atomic(table, path)
    return str(path.relative_to(root)), table.num_rows


def _compute_parts(model, tset: TranscoderSet, root: Path, manifest: Manifest, progress: bool, executor: Executor) -> None:
    """The parts not yet finished: tokens and the head index here, the rest as units on `executor`, recorded here as
    they arrive. The serial executor runs them in this order (token edges, pullbacks source by source, OV heads);
    a parallel one gets finer units: token edges in one group of layers per worker (each group computes the extended
    embedding once), pullbacks one layer pair each (a cross-layer set: one source layer's readers, as one running
    sum)."""
    settings = IngestSettings(top_k=manifest.top_k, min_weight=manifest.min_weight, token_top_k=manifest.token_top_k,
                              pullback_score_dtype=manifest.pullback_score_dtype, heads_top_k=manifest.heads_top_k)
    ov_pairs = head_pairs(model, tset) if settings.heads_top_k else []
    bar = tqdm(total=len(_all_parts(root, tset, model, bool(ov_pairs))) - 1, desc="ingest", unit="part", disable=not progress)
    for path, compute in [(root / layout.TOKENS, lambda: _token_table(model))] + (
            [(root / layout.HEAD_INDEX, lambda: head_table(model))] if ov_pairs else []):
        if not _finished(root, manifest, path):
            _write_part(root, manifest, compute(), path)
        bar.update()

    shared = str(root.resolve())  # the path every worker writes under
    units: list = []
    token_todo = [(L, not _finished(root, manifest, layout.deembed_part(root, L)), not _finished(root, manifest, layout.logit_part(root, L)))
                  for L in tset.layers]
    units += [TokenEdgesUnit(shared, tuple(g), settings.token_top_k) for g in groups([t for t in token_todo if t[1] or t[2]], executor.parallelism)]
    for lo in tset.layers:  # source-major: a CLT source's write into each later reader is one running sum
        todo = tuple(hi for hi in tset.layers if hi > lo and not _finished(root, manifest, layout.pullback_part(root, lo, hi)))
        if todo:
            split = executor.parallelism > 1 and not tset.cross_layer
            units += [PullbackUnit(shared, lo, readers, settings) for readers in ([(hi,) for hi in todo] if split else [todo])]
    for m, L in ov_pairs:  # OV pullbacks per head (ingest.heads): attention layer m into transcoder layer L
        want = (not _finished(root, manifest, layout.ov_part(root, m, L)), not _finished(root, manifest, layout.ov_token_part(root, m, L)))
        if any(want):
            units.append(OvUnit(shared, m, L, settings.heads_top_k, *want))
    bar.update(bar.total - bar.n - sum(_n_parts(u) for u in units))
    for part, rows in executor.map(run_unit, units):
        _record(root, manifest, part, rows)
        bar.set_postfix_str(part)
        bar.update()
    if not executor.in_process:
        remove_temporaries(root)  # what workers killed mid-write left behind (their tasks ran again)
    bar.close()


def _n_parts(unit) -> int:
    if isinstance(unit, TokenEdgesUnit):
        return sum(d + lens for _, d, lens in unit.layers)
    if isinstance(unit, PullbackUnit):
        return len(unit.readers)
    return unit.edges + unit.tokens


@dataclass(frozen=True)
class TokenEdgesUnit:
    """The de-embedding and logit-lens parts of some layers: (layer, de-embedding wanted, logit lens wanted); the
    extended embedding is computed once for the group."""

    root: str
    layers: tuple[tuple[int, bool, bool], ...]
    top_k: int

    def __call__(self, worker: Worker) -> Iterator[tuple[str, int]]:
        model, tset, root = worker.model, worker.tset, Path(self.root)
        ext: torch.Tensor | None = None
        for layer, deembed, lens in self.layers:
            tc = tset[layer]
            if deembed:
                if ext is None:
                    ext = extended_embedding(model)
                raw = top_tokens_into(model, tc, model.W_E, self.top_k, normalise=False)
                extended = top_tokens_into(model, tc, extended_embedding_for(model, tc, ext), self.top_k, normalise=True)
                yield _written(root, _deembed_table(layer, raw, extended), layout.deembed_part(root, layer))
            if lens:
                logit_lens = top_logit_tokens(model, tset.total_write(layer, model.cfg.n_layers), self.top_k)
                yield _written(root, _logit_table(layer, logit_lens), layout.logit_part(root, layer))


@dataclass(frozen=True)
class PullbackUnit:
    """The pullback parts from source layer `lo` into each of `readers` (a CLT's writes kept as one running sum)."""

    root: str
    lo: int
    readers: tuple[int, ...]
    settings: IngestSettings

    def __call__(self, worker: Worker) -> Iterator[tuple[str, int]]:
        root = Path(self.root)
        for hi, write in worker.tset.writes_from(self.lo, list(self.readers)):
            table = pullback_table(worker.model, worker.tset, self.lo, hi, self.settings, write)
            yield _written(root, table, layout.pullback_part(root, self.lo, hi))


@dataclass(frozen=True)
class OvUnit:
    """The OV parts (features, tokens) of attention layer `attn_layer` into transcoder layer `layer`."""

    root: str
    attn_layer: int
    layer: int
    top_k: int
    edges: bool
    tokens: bool

    def __call__(self, worker: Worker) -> Iterator[tuple[str, int]]:
        model, tset, root, m, L = worker.model, worker.tset, Path(self.root), self.attn_layer, self.layer
        if self.edges:
            yield _written(root, ov_table(model, tset, m, L, self.top_k), layout.ov_part(root, m, L))
            release_mapped()
        if self.tokens:
            yield _written(root, ov_token_table(model, tset, m, L, self.top_k), layout.ov_token_part(root, m, L))


@torch.no_grad()
def pullback_table(model, tset: TranscoderSet, lo: int, hi: int, settings: IngestSettings,
                   write: torch.Tensor | None = None) -> pa.Table:
    """All kept pullback edges from layer `lo` features into layer `hi` features (a CLT feature's write into
    layer `hi`'s input is the sum of its decoder slices into layers lo .. hi-1: `write`, when the caller keeps it
    as a running sum, else computed here), in float32 whatever the transcoders' dtype (a no-op for float32
    weights, which so stay mapped views of their files)."""
    write = tset.total_write(lo, hi) if write is None else write
    W_dec = as_read_by(model, tset[hi], write.float())
    return pullback_edges_table(W_dec, tset[hi].W_enc.float(), lo, hi, settings)


def pullback_edges_table(W_dec: torch.Tensor, W_enc: torch.Tensor, lo: int, hi: int, settings: IngestSettings) -> pa.Table:
    """Select edges block by block, on the weights' device, and lay them out as the Parquet part's columns."""
    score_dtype = resolve_dtype(score_dtype_for(settings.pullback_score_dtype, W_dec.device))
    blocks = list(select_edges(W_dec, W_enc, settings.top_k, settings.min_weight, score_dtype=score_dtype))
    src = torch.cat([b.src for b in blocks]).cpu().numpy()
    dst = torch.cat([b.dst for b in blocks]).cpu().numpy()
    weight = torch.cat([b.weight for b in blocks]).cpu().numpy()
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
        features = np.repeat(np.arange(n), k)
        tables.append(pa.table(
            [pa.array(top.token.reshape(-1).numpy()), feature_ids(layer, pa.array(features)),
             pa.array(top.weight.reshape(-1).numpy(), pa.float32()), pa.array([variant] * (n * k), pa.string())],
            schema=layout.DEEMBED_SCHEMA,
        ))
    return pa.concat_tables(tables)


def _logit_table(layer: int, top: TopTokens) -> pa.Table:
    n, k = top.token.shape
    features = np.repeat(np.arange(n), k)
    return pa.table(
        [feature_ids(layer, pa.array(features)), pa.array(top.token.reshape(-1).numpy()),
         pa.array(top.weight.reshape(-1).numpy(), pa.float32())],
        schema=layout.LOGIT_SCHEMA,
    )


def write_features(root: Path, tset: TranscoderSet, summary_k: int = 10, stats_dir: Path | None = None) -> None:
    """features.parquet: one row per feature with its top de-embedding and logit-lens tokens (DuckDB join),
    and its statistics from `stats_dir` (default DIR/stats) where there are any, with its layer's `inv_scale`."""
    import duckdb

    rows = pa.table({
        "id": pa.concat_arrays([feature_ids(tc.layer, pa.array(range(tc.cfg.d_sae), pa.int64())) for tc in tset]),
        "layer": pa.array([tc.layer for tc in tset for _ in range(tc.cfg.d_sae)], pa.int32()),
        "index": pa.array([i for tc in tset for i in range(tc.cfg.d_sae)], pa.int32()),
        "transcoder": pa.array([Path(tc.source).parent.name or tc.source for tc in tset for _ in range(tc.cfg.d_sae)], pa.string()),
    })
    con = duckdb.connect()
    con.register("base", rows)
    d_glob, l_glob, t_path = (str(root / layout.DEEMBED_PARTS), str(root / layout.LOGIT_PARTS), str(root / layout.TOKENS))
    stats_path = (stats_dir or root / layout.STATS) / layout.parquet_name("features")
    stats = (f"(SELECT id, frequency, mean_act, max_act FROM read_parquet('{_sql_literal(stats_path)}'))" if stats_path.is_file()
             else "(SELECT NULL::VARCHAR AS id, NULL::DOUBLE AS frequency, NULL::FLOAT AS mean_act, NULL::FLOAT AS max_act)")
    scales_path = stats_path.with_name(layout.parquet_name("layers"))  # absent from statistics older than it: null
    scales = (f"(SELECT layer, inv_scale FROM read_parquet('{_sql_literal(scales_path)}'))" if scales_path.is_file()
              else "(SELECT NULL::INTEGER AS layer, NULL::DOUBLE AS inv_scale)")
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
               st.frequency, st.mean_act, st.max_act, sc.inv_scale
        FROM base
        LEFT JOIN de raw ON raw.id = base.id AND raw.variant = 'raw'
        LEFT JOIN de ext ON ext.id = base.id AND ext.variant = 'extended'
        LEFT JOIN lo ON lo.id = base.id
        LEFT JOIN {stats} st ON st.id = base.id
        LEFT JOIN {scales} sc ON sc.layer = base.layer
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
        "pullback_edges": rows(layout.part_files(root, layout.PULLBACK_PARTS)),
        "deembed_edges": rows(layout.part_files(root, layout.DEEMBED_PARTS)),
        "logit_edges": rows(layout.part_files(root, layout.LOGIT_PARTS)),
        **({"ov_edges": rows(layout.part_files(root, layout.OV_PARTS)),
            "ov_token_edges": rows(layout.part_files(root, layout.OV_TOKEN_PARTS))} if (root / layout.OV).is_dir() else {}),
    }


@dataclass
class StatsPlan:
    """What statistics a run would collect, decided (and checked against the catalog) before anything is written."""

    tokens: torch.Tensor  # [n_contexts, ctx_len], the tokens actually collected
    info: dict  # DIR/stats/info.json (layout.stats_info)
    done: bool  # the catalog already holds exactly these statistics, every part intact


# info.json fields that decide the statistics; `dataset` (the name given) and `parts` only describe them
_STATS_IDENTITY = ("tokens_sha256", "tokens", "ctx_len", "top_k", "layers", "quantile_bins", "per_bin")


def plan_stats(model, tset: TranscoderSet, root: Path, dataset: str, n_tokens: int, ctx_len: int = 128,
               top_k: int = 20) -> StatsPlan:
    """Tokenise the dataset and compare with the statistics already in `root`.

    Keyed by the tokens' content hash and count, not by the `--dataset` string: a changed file is
    not taken for the old one, the same file by another path is, and `--tokens` beyond the file's
    size records what was collected.
    """
    from circuit_catalog.ingest.datasets import token_contexts
    from circuit_catalog.ingest.components import EXAMPLES, supported
    from circuit_catalog.ingest.stats import INV_SCALE_DEFINITION, PER_BIN, QUANTILE_BINS

    check_context(model, ctx_len)
    unsupported = supported(model, tset)
    tokens = token_contexts(model.tokenizer, dataset, n_tokens, ctx_len)
    info = {"dataset": dataset, "tokens_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
            "tokens": tokens.numel(), "ctx_len": ctx_len, "top_k": top_k, "layers": tset.layers,
            "quantile_bins": QUANTILE_BINS, "per_bin": PER_BIN,
            "component_examples": 0 if unsupported else min(EXAMPLES, top_k), "inv_scale": INV_SCALE_DEFINITION,
            **({"components_skipped": unsupported} if unsupported else {})}
    info_path = layout.stats_info(root)
    if not info_path.is_file():
        return StatsPlan(tokens, info, done=False)
    try:
        old = json.loads(info_path.read_text())
    except (OSError, ValueError):
        return StatsPlan(tokens, info, done=False)  # unreadable: collected anew
    if any(k not in old for k in STATS_ADDED):
        return StatsPlan(tokens, info, done=False)
    if any(old.get(k) != info[k] for k in _STATS_IDENTITY + STATS_ADDED):
        raise CatalogDirError(f"{root / layout.STATS} holds statistics collected with other settings or another dataset "
                              "(or by an older version); remove it to collect anew")
    intact = all(part_intact(root / layout.STATS / name, rows) for name, rows in old.get("parts", {}).items())
    return StatsPlan(tokens, info, done=intact and bool(old.get("parts")))


def write_stats(model, tset: TranscoderSet, root: Path, plan: StatsPlan, progress: bool = True,
                executor: Executor | None = None) -> bool:
    """Collect the planned statistics into `DIR/stats/` (all files appear together); False if already there.

    On `executor` (default here): one shard per group of layers (a single one, all layers in one pass, serially),
    each collecting its layers' statistics over every token, then the component tallies as one unit (they need every
    layer's top examples; one pass keeps them identical to a serial run's); the tables are made and written here."""
    from circuit_catalog.ingest.components import components_table
    from circuit_catalog.ingest.stats import stats_tables

    if plan.done:
        return False
    executor = executor or SerialExecutor(model, tset)
    with writer_lock(root):
        shards = [StatsShard(plan.tokens, tuple(g), plan.info["top_k"], progress and executor.in_process)
                  for g in groups(tset.layers, executor.parallelism)]
        stats = {}
        for part in tqdm(executor.map(run_unit, shards), total=len(shards), desc="statistics shards", unit="shard",
                         disable=not progress or executor.in_process):
            stats.update(part)
        tables = stats_tables(tset, stats, plan.tokens)
        if n_examples := plan.info["component_examples"]:
            top_index = {layer: s.top_index for layer, s in stats.items()}
            (tallies,) = executor.map(run_unit, [ComponentsUnit(plan.tokens, top_index, n_examples, progress and executor.in_process)])
            tables["components"] = components_table(tset, tallies, model.cfg.n_heads)
        with atomic_directory(root / layout.STATS) as tmp:
            for name, table in tables.items():
                write_atomic(table, tmp / layout.parquet_name(name))
            info = {**plan.info, "parts": {layout.parquet_name(name): t.num_rows for name, t in tables.items()}}
            (tmp / layout.STATS_INFO).write_text(json.dumps(info, indent=2))
            crash_point("stats")
            # feature rows (and so the stores' Feature nodes) gain frequency, mean_act, max_act; before
            # the rename, so statistics in place always have their feature rows
            write_features(root, tset, stats_dir=tmp)
        manifest = Manifest.read(root)
        manifest.parts[layout.FEATURES] = part_rows(root / layout.FEATURES)
        manifest.write(root)
    return True


@dataclass(frozen=True)
class StatsShard:
    """The statistics of `layers` over every token (`ingest.stats.collect_stats`): {layer: LayerStats} on the CPU."""

    tokens: torch.Tensor
    layers: tuple[int, ...]
    top_k: int
    progress: bool

    def __call__(self, worker: Worker) -> Iterator[dict]:
        from circuit_catalog.ingest.stats import collect_stats

        yield collect_stats(worker.model, worker.tset, self.tokens, self.top_k, layers=list(self.layers), progress=self.progress)


@dataclass(frozen=True)
class ComponentsUnit:
    """Every layer's component tallies over its top examples (`ingest.components.collect_components`)."""

    tokens: torch.Tensor
    top_index: dict
    n_examples: int
    progress: bool

    def __call__(self, worker: Worker) -> Iterator[dict]:
        from circuit_catalog.ingest.components import collect_components

        yield collect_components(worker.model, worker.tset, self.tokens, self.top_index, self.n_examples, progress=self.progress)


def run_stats(model, tset: TranscoderSet, root: Path, dataset: str, n_tokens: int, ctx_len: int = 128, top_k: int = 20,
              progress: bool = True, executor: Executor | None = None) -> bool:
    """Plan and collect activation statistics; False if the catalog already holds them."""
    return write_stats(model, tset, root, plan_stats(model, tset, root, dataset, n_tokens, ctx_len, top_k), progress, executor)
