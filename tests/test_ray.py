"""The ingest on a Ray cluster (`--executor ray`), with real Ray: a local cluster started here, shared by the module.

The catalog is the serial run's, part for part (every Parquet part's rows, the manifest's parts and counts), for a
GPT-2-style and a Llama-style model with per-layer transcoders and for a cross-layer transcoder, each with
statistics and prompts; a worker killed mid-prompt has its task run again; a driver killed mid-ingest resumes to the
serial catalog; bad executor input is one line. GPUs and several nodes cannot be had here: those paths are code only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

# the test cluster on the loopback address only (Ray binds the machine's own address otherwise); read when Ray is imported
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from circuit_catalog.catalog import layout  # noqa: E402
from circuit_catalog.catalog.crash import ENV, ONCE_ENV  # noqa: E402
from circuit_catalog.ingest.device import task_device  # noqa: E402
from circuit_catalog.ingest.transcoder_formats import save_circuit_tracer_clt, save_saelens  # noqa: E402

from circuit_catalog.errors import DeviceError, ExecutorError  # noqa: E402
from tests.conftest import random_clt, random_transcoders  # noqa: E402
from tests.test_security import cli, one_line_error  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local two-CPU cluster. Its workers carry a crash point that kills the first of them to write a prompt graph,
    once (`catalog.crash`): the first Ray ingest of this process with prompts loses a worker mid-write and must run its
    task again. (Tests run in file order: the driver test first, whose own workers start while no others idle, then
    the rest on warm workers. A new driver's workers import TransformerLens, ~7 s each on 2 cores.)"""
    killed = tmp_path_factory.mktemp("ray") / "a-worker-was-killed"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {ENV: "prompt:1", ONCE_ENV: str(killed)}})
    yield SimpleNamespace(address=ray.get_runtime_context().gcs_address, killed=killed)
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, gpt2, gpt2_dir, llama, llama_dir, text_file) -> dict:
    d = tmp_path_factory.mktemp("ray-inputs")
    for tc in random_transcoders(gpt2, d_sae=8, seed=5):
        save_saelens(tc, d / "gpt2-tc" / f"layer_{tc.layer}")
    for tc in random_transcoders(llama, d_sae=8, seed=6):
        save_saelens(tc, d / "llama-tc" / f"layer_{tc.layer}")
    save_circuit_tracer_clt(random_clt(gpt2, d_sae=8, seed=7), d / "clt")
    (d / "prompts.txt").write_text("the capital of france is\nthe jury said the city\nshe was in the house by the\n")
    common = {"--dataset": text_file, "--tokens": 200, "--ctx-len": 16, "--prompts": d / "prompts.txt", "--max-feature-nodes": 20,
              "--top-k": 3, "--token-top-k": 4}
    return {
        "gpt2": {"--model": gpt2_dir, "--transcoders": d / "gpt2-tc", "--heads-top-k": 2, **common},  # with OV parts
        "llama": {"--model": llama_dir, "--transcoders": d / "llama-tc", **common},
        "clt": {"--model": gpt2_dir, "--transcoders": d / "clt", **common},  # pullback units: one source layer's readers
    }


def ingest_args(options: dict, catalog: Path, *extra) -> list[str]:
    return ["ingest", "--catalog", str(catalog), *(str(x) for kv in options.items() for x in kv), *map(str, extra)]


@pytest.fixture(scope="module")
def serial(tmp_path_factory, inputs) -> dict:
    """The serial catalog of each input set, made once, on one torch thread as every Ray task of one CPU computes (a
    matmul split over another number of threads may round differently: equal to rounding, not bit for bit)."""
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            root = tmp_path_factory.mktemp(f"serial-{name}") / "catalog"
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                code, output = cli(*ingest_args(inputs[name], root))
            finally:
                torch.set_num_threads(threads)
            assert code == 0, output
            made[name] = root
        return made[name]

    return get


def assert_same_catalog(root: Path, want: Path) -> None:
    """Every Parquet part with the same rows, the manifest with the same parts and counts, no leftovers."""
    got_parts = {str(p.relative_to(root)): p for p in sorted(root.rglob("*.parquet"))}
    want_parts = {str(p.relative_to(want)): p for p in sorted(want.rglob("*.parquet"))}
    assert got_parts.keys() == want_parts.keys()
    for name, path in want_parts.items():
        assert pq.read_table(got_parts[name]).equals(pq.read_table(path)), name
    got, expected = (json.loads((r / layout.MANIFEST).read_text()) for r in (root, want))
    assert got["status"] == "complete"
    assert (got["parts"], got["counts"], got["device"]) == (expected["parts"], expected["counts"], expected["device"])
    assert json.loads(layout.stats_info(root).read_text()) == json.loads(layout.stats_info(want).read_text())
    assert not layout.temporaries(root)


def test_a_killed_driver_resumes_to_the_serial_catalog(cluster, inputs, serial, tmp_path):
    """The driver (another process, joining the cluster by its address) is killed after recording 5 parts
    while workers are writing others; the rerun computes only what is missing and ends as the serial run does."""
    root = tmp_path / "catalog"
    args = ingest_args(inputs["gpt2"], root, "--executor", "ray", "--address", cluster.address)
    env = {**os.environ, "PYTHONPATH": str(REPO), ENV: "part:5"}
    proc = subprocess.run([sys.executable, "-m", "circuit_catalog.cli", *args], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    manifest = json.loads((root / layout.MANIFEST).read_text())
    assert manifest["status"] == "in-progress" and len(manifest["parts"]) == 5
    assert not (root / layout.STATS).exists() and not (root / layout.PROMPTS).exists()
    code, output = cli(*args)
    assert code == 0, output
    assert_same_catalog(root, serial("gpt2"))


@pytest.mark.parametrize("name", ["gpt2", "llama", "clt"])
def test_the_ray_catalog_is_the_serial_one_though_a_worker_died(cluster, inputs, serial, tmp_path, name):
    root = tmp_path / "catalog"
    code, output = cli(*ingest_args(inputs[name], root, "--executor", "ray"))
    assert code == 0, output
    assert cluster.killed.exists(), "the first prompt written in this process's Ray job should have killed its worker"
    assert_same_catalog(root, serial(name))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_executor_input_is_one_line(inputs, tmp_path, monkeypatch):
    args = ingest_args(inputs["llama"], tmp_path / "catalog")
    assert "with an address" in one_line_error(*cli(*args, "--address", "auto"))
    port = _closed_port()
    line = one_line_error(*cli(*args, "--executor", "ray", "--address", f"127.0.0.1:{port}"))
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in line
    assert "cannot reach" in one_line_error(*cli(*args, "--executor", "ray", "--address", f"ray://127.0.0.1:{port}"))
    assert "expected auto, HOST:PORT" in one_line_error(*cli(*args, "--executor", "ray", "--address", "head-node"))
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert "pip install 'circuit-catalog[ray]'" in one_line_error(*cli(*args, "--executor", "ray"))
    assert not (tmp_path / "catalog" / layout.MANIFEST).exists()


def test_the_ray_executor_needs_names_or_paths_not_loaded_objects(gpt2, tmp_path):
    from circuit_catalog.ingest.pipeline import ingest

    with pytest.raises(ExecutorError, match="names or paths"):
        ingest(gpt2, random_transcoders(gpt2, d_sae=4), tmp_path / "catalog", executor="ray")


def test_tasks_take_a_gpu_each_where_the_cluster_has_gpus():
    """The GPU path's decision (this machine has no GPU: a task on one is not run here)."""
    assert task_device(None, 4) == task_device("auto", 4) == task_device("cuda:1", 4) == ("cuda", True)
    assert task_device("auto", 0) == ("cpu", False) and task_device("cpu", 8) == ("cpu", False)
    with pytest.raises(DeviceError, match="no GPUs"):
        task_device("cuda", 0)
