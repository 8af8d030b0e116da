"""Many prompts in the stores: a catalog of 1,000 prompt graphs loaded into LadybugDB and into ArcadeDB over Bolt, the
load times and store sizes, and `prompts-using` / `recurring` / `recurring-paths` latency.

The catalog is made cheaply from real graphs: the prompt directories of an existing catalog (default the demo's
SmolLM2-135M catalog with trained transcoders) are copied under fresh prompt ids (every id column of every part and
prompt.json rewritten, `prompts.parquet` regenerated) until `--prompts` exist. The embedded load is LadybugDB's COPY;
the Bolt load is the Neo4j backend's batched UNWIND into ArcadeDB, started as `bench/stores.py` does.

    python bench/prompt_stores.py [--catalog DIR] [--prompts 1000] [--hops 2] [--bolt-full]
    python bench/prompt_stores.py --smoke      # a tiny GPT-2-style model, seconds

Over Bolt only what `prompts-using` and `recurring` read is loaded by default (features, tokens, prompts, the prompts'
nodes and INSTANCE_OF links, the feature tally): the whole catalog is ~480M rows at 1,000 SmolLM2 prompts, most of
them per-head edge terms, hours at ArcadeDB's rate here; its time at the measured rate is printed instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from circuit_catalog.catalog import layout  # noqa: E402
from circuit_catalog.catalog.atomic import atomic_directory  # noqa: E402

ID_COLUMNS = ("id", "prompt_id", "src", "dst")  # the columns of prompt parts that hold node or prompt ids


def read_prompt(root: Path, pid: str) -> dict[str, pa.Table]:
    """A prompt's parts, id columns dictionary-encoded (a graph's edges name its ~1,000 nodes a million times)."""
    return {part: pq.read_table(layout.prompt_part(root, pid, part), read_dictionary=ID_COLUMNS) for part in layout.PROMPT_PARTS}


def copy_prompt(root: Path, source: str, parts: dict[str, pa.Table], pid: str) -> None:
    """The prompt `source`, whose parts are `parts`, again as prompts/<pid>/: every id starting with `source` renamed."""

    def renamed(column: pa.ChunkedArray) -> pa.ChunkedArray:
        chunks = [pa.DictionaryArray.from_arrays(c.indices, pc.replace_substring_regex(c.dictionary, f"^{source}", pid))
                  for c in column.chunks]
        return pa.chunked_array(chunks, column.type).cast(pa.string())

    with atomic_directory(layout.prompt_dir(root, pid)) as tmp:
        for part, table in parts.items():
            for i, field in enumerate(table.schema):
                if pa.types.is_dictionary(field.type):
                    table = table.set_column(i, field.name, renamed(table[field.name]))
            pq.write_table(table, tmp / layout.parquet_name(part), compression="zstd")
        info = json.loads(layout.prompt_info(root, source).read_text())
        (tmp / layout.PROMPT_INFO).write_text(json.dumps({**info, "id": pid}, indent=2) + "\n")


def multiply_prompts(source: Path, root: Path, n: int) -> list[str]:
    """A copy of the catalog at `source` (its store left behind) holding `n` prompts (at least its own): its own and copies
    of them; returns their ids."""
    from circuit_catalog.ingest.prompts import write_prompt_index

    shutil.copytree(source, root, ignore=shutil.ignore_patterns(f"{layout.GRAPH}*", layout.WRITER_LOCK, ".*"))
    originals = sorted(p.parent.name for p in layout.part_files(root, layout.PROMPT_INFOS))
    pids = list(originals)
    for k, src in enumerate(originals):
        parts = read_prompt(root, src)
        for i in range(k, n - len(originals), len(originals)):
            pid = hashlib.sha256(f"{src}/{i}".encode()).hexdigest()[:16]
            copy_prompt(root, src, parts, pid)
            pids.append(pid)
    write_prompt_index(root)
    return pids


QUERY_PARTS = ("nodes", "links_feature", "links_token")  # the prompt parts `prompts-using` and `recurring` read


def query_view(root: Path, view: Path, pids: list[str]) -> None:
    """A catalog at `view` of links to what `prompts-using` and `recurring` read in `root`: the features, tokens, the
    prompt index and the feature tally, and the nodes and INSTANCE_OF links of the prompts `pids` (no weights, no edges)."""
    view.mkdir(parents=True)
    for name in (layout.MANIFEST, layout.FEATURES, layout.TOKENS, layout.PROMPT_INDEX, layout.FEATURE_TALLY):
        (view / name).symlink_to(root / name)
    for pid in pids:
        layout.prompt_dir(view, pid).mkdir(parents=True)
        for part in QUERY_PARTS:
            layout.prompt_part(view, pid, part).symlink_to(layout.prompt_part(root, pid, part))


def store_rows(root: Path) -> tuple[int, int]:
    """Rows a store load writes from the catalog at `root` (nodes and relationships), and how many are the prompt graphs'."""
    from circuit_catalog.catalog.graph_schema import NODES, RELS

    total = graph = 0
    for s in (*NODES, *RELS):
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in layout.part_files(root, s.files))
        total += rows
        graph += rows if s.files.startswith(f"{layout.PROMPTS}/") else 0
    return total, graph


def size(path: Path) -> str:
    """The bytes on disk under `path` (a file or a directory), in MiB."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return f"{sum(p.stat().st_size for p in files) / 2**20:,.0f} MiB"


def time_once(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def measure(name: str, store, root: Path, n_prompts: int, calls: int, hops: int) -> float:
    """Time the load of `root` into `store`, then the prompt queries and `recurring-paths` with 1 to `hops` edges (one
    call each: seconds to an hour); returns the load's rows/s."""
    from circuit_catalog.errors import CypherError
    from circuit_catalog.queries.lookups import Lookups
    from circuit_catalog.queries.motifs import recurring_paths

    from bench.prompts import query_latencies

    rows, graph_rows = store_rows(root)
    rate = rows / time_once(lambda: store.load(root, progress=False))
    print(f"{name}: load {rows:,} rows ({graph_rows:,} of them the prompt graphs') in {rows / rate:.1f} s = {rate:,.0f} rows/s",
          flush=True)
    query_latencies(store, n_prompts, calls, prefix=f"{name}: ")
    lookups = Lookups(store)
    for n in range(1, hops + 1):
        start = time.perf_counter()
        try:
            recurring_paths(lookups, n, 20)
            outcome = "one call"
        except CypherError as exc:  # e.g. the buffer pool is full: the store's one-line error
            outcome = f"failed: {exc}"
        print(f"{name}: recurring-paths --hops {n}: {time.perf_counter() - start:.2f} s ({outcome}) at {n_prompts} prompts",
              flush=True)
    return rate


def smoke_catalog(tmp: Path) -> Path:
    """A tiny GPT-2-style model's catalog with the prompts bench's six prompt graphs."""
    from circuit_catalog.ingest.prompts import run_prompts
    from circuit_catalog.ingest.settings import AttributionSettings, PromptSpec

    from bench.prompts import SMOKE_TEXTS, smoke_model, weights_catalog

    model, tset = smoke_model(tmp)
    root = tmp / "source"
    weights_catalog(model, tset, root)
    run_prompts(model, tset, root, [PromptSpec(x) for x in SMOKE_TEXTS], AttributionSettings(), progress=False)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a tiny model's 6 prompt graphs copied to 40 prompts (seconds)")
    ap.add_argument("--catalog", type=Path, default=Path("/tmp/demo-out/catalog"), help="the catalog whose graphs are copied")
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=200, help="prompts-using / recurring calls timed on each store")
    ap.add_argument("--hops", type=int, choices=(0, 1, 2), default=2,
                    help="recurring-paths timed with up to this many edges")
    ap.add_argument("--bolt-full", action="store_true",
                    help="load the whole catalog over Bolt, not only what the prompt queries read (hours at 1,000 prompts)")
    args = ap.parse_args()

    from circuit_catalog.catalog.ladybug_store import LadybugStore
    from circuit_catalog.catalog.tallies import refresh_tallies

    from bench.stores import arcadedb

    with tempfile.TemporaryDirectory(prefix="bench-prompt-stores-") as t:
        source = args.catalog
        if args.smoke:
            source, args.prompts, args.queries = smoke_catalog(Path(t)), 40, 20
        if not layout.part_files(source, layout.PROMPT_INFOS):
            sys.exit(f"error: {source}: no prompt graphs to copy; pass --catalog, a catalog ingested with --prompts")
        root = Path(t) / "catalog"
        start = time.perf_counter()
        pids = multiply_prompts(source, root, args.prompts)
        print(f"catalog: {len(pids):,} prompts (the graphs of {source} copied), {size(root / layout.PROMPTS)} of "
              f"prompt parts, written in {time.perf_counter() - start:.0f} s", flush=True)
        print(f"feature tally: counted in {time_once(lambda: refresh_tallies(root)):.2f} s", flush=True)

        with LadybugStore(root / layout.GRAPH) as store:
            measure("embedded", store, root, len(pids), args.queries, args.hops)
        print(f"embedded: store size {size(root / layout.GRAPH)}; this process's peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB", flush=True)

        warm, bolt = Path(t) / "warm", root if args.bolt_full else Path(t) / "view"
        query_view(root, warm, pids[:20])
        if not args.bolt_full:
            query_view(root, bolt, pids)
        with arcadedb(Path(t) / "arcadedb") as open_database:
            with open_database("warmup") as warmup:  # a fresh JVM loads 2-3x slower while the server's code compiles
                warmup.load(warm, progress=False)
            with open_database("bench") as store:
                rate = measure("bolt", store, bolt, len(pids), args.queries, args.hops if args.bolt_full else 0)
        print(f"bolt: database size {size(Path(t) / 'arcadedb' / 'databases' / 'databases' / 'bench')} (ArcadeDB on the same cores)")
        if not args.bolt_full:
            rows = store_rows(root)[0]
            print(f"bolt: the whole catalog, {rows:,} rows, would take ~{rows / rate / 3600:.1f} h at that rate "
                  f"({rows / rate / 60:,.0f} min; not loaded, --bolt-full loads it)")


if __name__ == "__main__":
    main()
