"""Graph-store load rate, size and lookup latency on a synthetic catalog, measured in one run.

Embedded (LadybugDB): 300k features, 10M pullback edges by default; prints bulk-load edges/s
(target >= 1M/s), store size on disk, and `upstream` latency p50/p99 over 1,000 random features
(targets p50 <= 2 ms, p99 <= 20 ms), both for the named query alone and for the full API call
(id check + edges + orientation tokens). With --bolt, the same on a smaller catalog over Bolt
against ArcadeDB (the Neo4j backend's stand-in here), whose size is printed.

    .venv/bin/python bench/stores.py [--features 300000 --edges 10000000] [--bolt --bolt-edges 200000]
    .venv/bin/python bench/stores.py --smoke   # seconds: what the test suite runs, so the benchmark cannot rot
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from circuit_catalog.catalog import layout  # noqa: E402
from circuit_catalog.catalog.ids import feature_ids, parse_feature_id  # noqa: E402
from circuit_catalog.catalog.manifest import Manifest, now  # noqa: E402
from circuit_catalog.catalog.parquet_io import write_atomic  # noqa: E402
from circuit_catalog.catalog.store import GraphStore  # noqa: E402
from circuit_catalog.queries.lookups import Lookups, named_query  # noqa: E402

N_LAYERS, VOCAB, TOKEN_K = 12, 1000, 5


def synthetic_catalog(root: Path, n_features: int, n_edges: int, seed: int = 0, n_sample: int = 1000) -> list[str]:
    """A catalog directory with the real layout: features, tokens, pullback parts per layer pair, token edges.

    Feature rows carry every column of the store's Feature node (`catalog.graph_schema`), so a new
    column there fails this benchmark's smoke run in the test suite instead of its next manual run.
    """
    rng = np.random.default_rng(seed)
    per_layer = n_features // N_LAYERS
    ids = pa.concat_arrays([feature_ids(layer, pa.array(np.arange(per_layer))) for layer in range(N_LAYERS)])
    n_features = len(ids)
    write_atomic(pa.table({
        "id": ids, "layer": pa.array(np.repeat(np.arange(N_LAYERS), per_layer), pa.int32()),
        "index": pa.array(np.tile(np.arange(per_layer), N_LAYERS), pa.int32()),
        "transcoder": pa.array(["synthetic"] * n_features),
        **{col: pa.array([[f"tok{i % VOCAB}" for i in range(j, j + TOKEN_K)] for j in range(n_features)], pa.list_(pa.string()))
           for col in ("deembed_tokens", "deembed_ext_tokens", "logit_tokens")},
        "frequency": pa.array(rng.random(n_features) * 0.01, pa.float64()),
        "mean_act": pa.array(rng.random(n_features).astype(np.float32)),
        "max_act": pa.array(rng.random(n_features).astype(np.float32) * 10),
        "inv_scale": pa.array(np.repeat(1 / (1 + np.arange(N_LAYERS)), per_layer), pa.float64()),
    }), root / layout.FEATURES)
    write_atomic(pa.table({"id": pa.array(np.arange(VOCAB), pa.int64()), "text": pa.array([f"tok{i}" for i in range(VOCAB)])}), root / layout.TOKENS)
    pairs = [(lo, hi) for hi in range(N_LAYERS) for lo in range(hi)]
    per_pair = n_edges // len(pairs)
    for lo, hi in pairs:
        write_atomic(pa.table({
            "src": feature_ids(lo, pa.array(rng.integers(0, per_layer, per_pair))),
            "dst": feature_ids(hi, pa.array(rng.integers(0, per_layer, per_pair))),
            "weight": pa.array(rng.standard_normal(per_pair).astype(np.float32)),
        }, schema=layout.PULLBACK_SCHEMA), layout.pullback_part(root, lo, hi))
    for layer in range(N_LAYERS):
        layer_ids = feature_ids(layer, pa.array(np.repeat(np.arange(per_layer), TOKEN_K)))
        n = len(layer_ids)
        write_atomic(pa.table({"src": pa.array(rng.integers(0, VOCAB, n)), "dst": layer_ids,
                               "weight": pa.array(rng.standard_normal(n).astype(np.float32)), "variant": pa.array(["extended"] * n)},
                              schema=layout.DEEMBED_SCHEMA), layout.deembed_part(root, layer))
        write_atomic(pa.table({"src": layer_ids, "dst": pa.array(rng.integers(0, VOCAB, n)),
                               "weight": pa.array(rng.standard_normal(n).astype(np.float32))},
                              schema=layout.LOGIT_SCHEMA), layout.logit_part(root, layer))
    Manifest(model="synthetic", model_weights_sha256="0", transcoders="synthetic", transcoder_format="synthetic",
             transcoder_files={}, layers=list(range(N_LAYERS)), d_sae={str(layer): per_layer for layer in range(N_LAYERS)},
             top_k=None, min_weight=None, token_top_k=TOKEN_K, versions={}, status="complete", created=now(), completed=now(),
             counts={"pullback_edges": per_pair * len(pairs)}).write(root)
    later = [fid for fid in ids.to_pylist() if parse_feature_id(fid)[0] > 0]
    return [later[i] for i in rng.integers(0, len(later), n_sample)]


def latencies(store: GraphStore, sample: list[str]) -> tuple[list[float], list[float]]:
    """Milliseconds per call: the named `upstream` query (edges + orientation tokens), and the whole `Lookups.upstream`."""
    query, lookups = named_query("upstream", store.dialect), Lookups(store)
    lookups.upstream(sample[0], k=20)  # warm up
    raw, full = [], []
    for fid in sample:
        t = time.perf_counter()
        store.run(query, {"id": fid, "k": 20, "layer": -1, "sign": 0, "normalise": False})
        raw.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        lookups.upstream(fid, k=20)
        full.append((time.perf_counter() - t) * 1e3)
    return raw, full


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


def report(name: str, root: Path, load_s: float, raw: list[float], full: list[float]) -> None:
    import pyarrow.parquet as pq

    def rows(pattern: str) -> int:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in root.glob(pattern))

    pullbacks = rows(layout.PULLBACK_PARTS)
    edges = pullbacks + rows(layout.DEEMBED_PARTS) + rows(layout.LOGIT_PARTS)
    print(f"{name}: whole load (nodes and all {edges:,} edges, {pullbacks:,} of them pullbacks) {load_s:.1f} s "
          f"= {edges / load_s:,.0f} edges/s")
    print(f"{name}: upstream query p50 {pct(raw, 50):.2f} ms, p99 {pct(raw, 99):.2f} ms; "
          f"full API call p50 {pct(full, 50):.2f} ms, p99 {pct(full, 99):.2f} ms (n={len(raw)})")


def bench_embedded(root: Path, n_features: int, n_edges: int, n_sample: int) -> None:
    from circuit_catalog.catalog.ladybug_store import LadybugStore

    t = time.perf_counter()
    sample = synthetic_catalog(root, n_features, n_edges, n_sample=n_sample)
    print(f"embedded: synthetic catalog {n_features:,} features, {n_edges:,} edges written in {time.perf_counter() - t:.1f} s")
    store = LadybugStore(root / layout.GRAPH)
    t = time.perf_counter()
    store.load(root, progress=False)
    load_s = time.perf_counter() - t
    size = sum(p.stat().st_size for p in root.glob("graph*") if p.is_file())
    parquet = sum(p.stat().st_size for p in root.rglob("*.parquet"))
    print(f"embedded: store size on disk {size / 2**20:,.0f} MiB (the catalog's Parquet: {parquet / 2**20:,.0f} MiB)")
    raw, full = latencies(store, sample)
    report("embedded", root, load_s, raw, full)
    store.close()


@contextmanager
def arcadedb(root: Path) -> Iterator[Callable[[str], GraphStore]]:
    """ArcadeDB with its Bolt plugin on 127.0.0.1, in its own process (the tests' launcher), its files under `root`;
    yields `open_database(name)`, which creates a database and returns the Neo4j backend's store on it."""
    import subprocess
    import urllib.request
    from base64 import b64encode

    from circuit_catalog.catalog.neo4j_store import Neo4jStore

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    bolt, http, password = free_port(), free_port(), "bench-password-1"
    launcher = Path(__file__).resolve().parents[1] / "tests" / "tools" / "arcadedb_server.py"
    root.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, str(launcher), str(root), password, str(bolt), str(http)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    auth = b64encode(f"root:{password}".encode()).decode()

    def open_database(name: str) -> GraphStore:
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{http}/api/v1/server", method="POST", data=f'{{"command": "create database {name}"}}'.encode(),
            headers={"Authorization": f"Basic {auth}", "Content-Type": "application/json"})).read()
        return Neo4jStore(f"bolt://127.0.0.1:{bolt}", database=name, auth=("root", password))

    try:
        assert proc.stdout.readline().strip() == "ready", "ArcadeDB did not start"
        yield open_database
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def bench_bolt(root: Path, n_features: int, n_edges: int, n_sample: int) -> None:
    """The Neo4j backend against ArcadeDB."""
    import pyarrow.parquet as pq

    sample = synthetic_catalog(root, n_features, n_edges, n_sample=n_sample)
    with arcadedb(root / "arcadedb") as open_database:
        # the first load into a fresh JVM runs 2-3x slower while the server's code compiles: load once untimed
        with open_database("warmup") as warmup:
            warmup.load(root, progress=False)
        store = open_database("bench")
        t = time.perf_counter()
        store.load(root, progress=False)
        load_s = time.perf_counter() - t
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in root.rglob("*.parquet"))  # nodes and relationships
        print(f"bolt (ArcadeDB stand-in): catalog of {n_features:,} features; load {rows:,} rows in {load_s:.1f} s "
              f"= {rows / load_s:,.0f} rows/s")
        raw, full = latencies(store, sample[:200])
        report("bolt", root, load_s, raw, full)
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=300_000)
    parser.add_argument("--edges", type=int, default=10_000_000)
    parser.add_argument("--bolt", action="store_true", help="also measure the Neo4j backend over Bolt against ArcadeDB")
    parser.add_argument("--bolt-features", type=int, default=12_000)
    parser.add_argument("--bolt-edges", type=int, default=100_000)
    parser.add_argument("--lookups", type=int, default=1000, help="random features timed")
    parser.add_argument("--smoke", action="store_true", help="a tiny size that runs in seconds (the test suite's)")
    args = parser.parse_args()
    if args.smoke:
        args.features, args.edges, args.bolt_features, args.bolt_edges, args.lookups = 1_200, 20_000, 1_200, 5_000, 20
    tmp = Path(tempfile.mkdtemp(prefix="cc-bench-stores-"))
    try:
        bench_embedded(tmp / "embedded", args.features, args.edges, args.lookups)
        if args.bolt:
            bench_bolt(tmp / "bolt", args.bolt_features, args.bolt_edges, args.lookups)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
