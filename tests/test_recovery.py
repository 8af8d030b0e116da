"""Crashes, leftovers, damaged parts and concurrent writers: the catalog always ends as a clean run leaves it.

Kills land at named points (`catalog.crash`), not on a clock: each test reproduces the same
half-written state every run. Every resumed catalog is compared part by part with a clean run,
then loaded and queried.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from circuit_catalog.catalog import layout
from circuit_catalog.catalog.crash import ENV
from circuit_catalog.ingest.transcoder_formats import save_saelens
from click.testing import CliRunner

from circuit_catalog.cli import main
from tests.conftest import random_transcoders
from tests.test_security import cli, digest, one_line_error

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, gpt2, gpt2_dir, text_file) -> dict:
    d = tmp_path_factory.mktemp("recovery-inputs")
    for tc in random_transcoders(gpt2, d_sae=8, seed=5):
        save_saelens(tc, d / "tc" / f"layer_{tc.layer}")
    (d / "prompts.txt").write_text("the capital of france is\nthe jury said the city\n")
    return {"model": gpt2_dir, "tc": d / "tc", "prompts": d / "prompts.txt", "dataset": text_file}


def ingest_args(inputs: dict, catalog: Path, **changes) -> list:
    options = {"--model": inputs["model"], "--transcoders": inputs["tc"], "--catalog": catalog, "--dataset": inputs["dataset"],
               "--tokens": 200, "--ctx-len": 16, "--prompts": inputs["prompts"], "--max-feature-nodes": 20, "--top-k": 3, **changes}
    return ["ingest", *(str(x) for kv in options.items() for x in kv)]


@pytest.fixture(scope="module")
def clean(tmp_path_factory, inputs) -> Path:
    root = tmp_path_factory.mktemp("clean") / "catalog"
    code, output = cli(*ingest_args(inputs, root))
    assert code == 0, output
    return root


@pytest.fixture()
def copy(clean, tmp_path) -> Path:
    root = tmp_path / "catalog"
    shutil.copytree(clean, root, ignore=shutil.ignore_patterns("graph*", layout.WRITER_LOCK))
    return root


def tables(root: Path) -> dict:
    return {str(p.relative_to(root)): pq.read_table(p) for p in sorted(root.rglob("*.parquet"))}


def assert_same_as_clean(root: Path, clean: Path) -> None:
    got, want = tables(root), tables(clean)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].equals(want[name]), name
    assert not layout.temporaries(root)


def assert_loads_and_answers(root: Path, clean: Path) -> None:
    result = CliRunner().invoke(main, ["cypher", "MATCH (n) RETURN count(n) AS n", "--catalog", str(root), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["n"] == sum(pq.read_metadata(f).num_rows for f in
                                             [clean / layout.FEATURES, clean / layout.TOKENS, clean / layout.PROMPT_INDEX,
                                              clean / layout.FEATURE_TALLY, *sorted(clean.glob(layout.prompt_part_glob("nodes")))])
    assert cli("show", "L1/2", "--catalog", root)[0] == 0


def run_until(point: str, args: list, wait: bool = True) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), ENV: point}
    proc = subprocess.Popen([sys.executable, "-m", "circuit_catalog.cli", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if wait:
        assert proc.wait(timeout=300) == -signal.SIGKILL, f"{point} was never reached"
    return proc


# ---------------------------------------------------------------- kills


@pytest.mark.parametrize("point", ["part:6", "stats:1", "prompt:2"])  # mid-parts, in the statistics, between prompts
def test_ingest_killed_at_a_named_point_resumes_to_the_clean_catalog(inputs, clean, tmp_path, point):
    root = tmp_path / "catalog"
    run_until(point, ingest_args(inputs, root))
    if point.startswith(("stats", "prompt")):
        assert layout.temporaries(root), "the kill should leave a temporary directory behind"
    code, output = cli(*ingest_args(inputs, root))
    assert code == 0, output
    assert_same_as_clean(root, clean)
    assert_loads_and_answers(root, clean)


def test_load_killed_mid_build_is_redone_and_its_leftovers_removed(copy, clean):
    run_until("load:4", ["load", "--catalog", copy])
    assert list(copy.glob(".graph.loading-*")) and not (copy / "graph.loaded.json").exists()
    assert_loads_and_answers(copy, clean)  # the lookup loads the store itself
    assert not layout.temporaries(copy)


def _stopped(proc: subprocess.Popen) -> bool:
    while proc.poll() is None:
        if Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1].startswith("T"):
            return True
    return False


def test_one_writer_at_a_time_and_readers_keep_working(inputs, copy, clean):
    """A load stopped mid-build holds the lock: other writers are refused naming its PID; readers use the old store."""
    assert cli("load", "--catalog", copy)[0] == 0
    (copy / "graph.loaded.json").unlink()  # the store must be rebuilt: the next load works for a while
    proc = run_until("load:3:STOP", ["load", "--catalog", copy], wait=False)
    try:
        assert _stopped(proc)
        for args in (["load", "--catalog", copy], ingest_args(inputs, copy), ["cypher", "RETURN 1 AS x", "--catalog", copy, "--write"]):
            assert f"catalog is being written by PID {proc.pid}" in one_line_error(*cli(*args))
        code, output = cli("show", "L1/2", "--catalog", copy)
        assert code == 0, output
        assert cli("sql", "SELECT count(*) FROM features", "--catalog", copy)[0] == 0
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert_loads_and_answers(copy, clean)


def test_an_ingest_holds_the_lock_between_its_steps(inputs, tmp_path):
    """Parts, statistics and prompts are one hold: stopped between the parts and the statistics, the ingest
    still keeps every other writer out (each step used to take the lock on its own)."""
    root = tmp_path / "catalog"
    proc = run_until("phase:1:STOP", ingest_args(inputs, root), wait=False)
    try:
        assert _stopped(proc)
        for args in (ingest_args(inputs, root), ["load", "--catalog", root]):
            assert f"catalog is being written by PID {proc.pid}" in one_line_error(*cli(*args))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


# ---------------------------------------------------------------- leftovers and damaged parts


def plant_leftovers(root: Path) -> None:
    """What kills at other moments leave: temporaries of every writer, some of them complete-looking."""
    prompt = next(p for p in (root / layout.PROMPTS).iterdir())
    shutil.copytree(prompt, root / layout.PROMPTS / f".{prompt.name}.tmp-abc123")  # complete but unrenamed: duplicate keys
    shutil.copytree(root / layout.STATS, root / f".{layout.STATS}.tmp-xyz")
    (root / f".{layout.PROMPT_INDEX}.tmp-77").write_bytes(b"PAR1 half")
    pullbacks = layout.pullback_part(root, 0, 1)
    pullbacks.with_name(f".{pullbacks.name}.tmp-77").write_bytes(b"not parquet")
    for suffix in ("", ".wal", ".shadow"):
        (root / f".graph.loading-77{suffix}").write_bytes(b"junk")


def test_readers_ignore_leftovers_and_a_rerun_removes_them(inputs, copy, clean):
    plant_leftovers(copy)
    assert_loads_and_answers(copy, clean)
    assert cli("sql", "SELECT count(*) FROM pullbacks", "--catalog", copy)[0] == 0
    assert cli("prompts", "--catalog", copy)[0] == 0
    assert cli("stats", "L1/2", "--catalog", copy)[0] == 0
    before = digest(copy)
    code, output = cli(*ingest_args(inputs, copy))
    assert code == 0, output
    assert not layout.temporaries(copy)
    assert {k: v for k, v in digest(copy).items() if not k.startswith(".")} == {k: v for k, v in before.items() if not k.startswith(".")}


PARTS = {  # a part of each kind -> the readers that must name it when it is damaged
    layout.PULLBACK_PARTS: [["sql", "SELECT count(*) FROM pullbacks"], ["report", "overview"], ["load"]],
    layout.DEEMBED_PARTS: [["sql", "SELECT count(*) FROM deembed"], ["load"]],
    layout.TOKENS: [["sql", "SELECT count(*) FROM tokens"], ["load"]],
    layout.stats_part("features"): [["sql", "SELECT count(*) FROM stats"], ["stats", "L1/2"], ["report", "overview"]],
    layout.prompt_part_glob("nodes"): [["load"], ["prompts"]],
    layout.PROMPT_INDEX: [["report", "overview"], ["load"]],
}


@pytest.mark.parametrize("pattern", PARTS)
def test_a_truncated_part_is_one_error_naming_it_and_the_rerun_recomputes_it(inputs, copy, clean, pattern):
    part = sorted(copy.glob(pattern))[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    for reader in PARTS[pattern]:
        line = one_line_error(*cli(*reader, "--catalog", copy))
        assert str(part) in line, (reader, line)
    code, output = cli(*ingest_args(inputs, copy))
    assert code == 0, output
    assert_same_as_clean(copy, clean)
    assert_loads_and_answers(copy, clean)


def test_reruns_write_nothing_unless_there_is_something_to_do(inputs, copy):
    """Same settings: nothing changes (a loaded store stays current). Other settings: refused, nothing changes."""
    assert cli("load", "--catalog", copy)[0] == 0
    before = digest(copy)
    assert cli(*ingest_args(inputs, copy))[0] == 0
    assert digest(copy) == before
    for changes in ({"--top-k": 5}, {"--tokens": 400}, {"--ctx-len": 8}):
        one_line_error(*cli(*ingest_args(inputs, copy, **changes)))
        assert digest(copy) == before, changes
    assert "up to date" in cli("load", "--catalog", copy)[1]


@pytest.mark.parametrize("pattern", [str(layout.pullback_part(Path(), 1, 2)), layout.stats_part("top_examples"), layout.prompt_part_glob("edges")])
def test_a_readable_part_with_other_rows_is_recomputed(inputs, copy, clean, pattern):
    """A footer that reads is not enough: the part must hold the rows recorded when it was written."""
    part = sorted(copy.glob(pattern))[0]
    pq.write_table(pq.read_table(part).slice(0, 1), part)
    code, output = cli(*ingest_args(inputs, copy))
    assert code == 0, output
    assert_same_as_clean(copy, clean)


def test_a_catalog_of_an_older_format_is_refused_not_misread(inputs, copy):
    """A manifest without `format` (written before formats were numbered: prompt nodes had `feature`, not
    `feature_index`) is refused by readers, loads and reruns alike, in one line, and nothing is written."""
    manifest = json.loads((copy / layout.MANIFEST).read_text())
    del manifest["format"]
    (copy / layout.MANIFEST).write_text(json.dumps(manifest))
    before = digest(copy)
    for args in (["show", "L1/2", "--catalog", copy], ["load", "--catalog", copy], ["sql", "SELECT 1", "--catalog", copy],
                 ["export", "--catalog", copy, "--prompt", "x", "--neuronpedia", copy.parent / "g.json"], ingest_args(inputs, copy)):
        line = one_line_error(*cli(*args))
        assert f"format 1; this version of circuit-catalog reads format {layout.FORMAT} only" in line, (args, line)
    assert digest(copy) == before
