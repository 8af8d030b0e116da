"""The warm model process: a real `circuit-catalog serve` subprocess answers `active` with the same features as a
direct forward pass, errors stay one line, and a server for other arguments or files is never asked."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from circuit_catalog import warm
from circuit_catalog.ingest.transcoder_formats import save_saelens

from tests.conftest import random_transcoders
from tests.test_cli import assert_one_line_error, run

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "the capital of france is"


@pytest.fixture()
def server(tmp_path, gpt2, gpt2_dir, monkeypatch):
    tc = tmp_path / "tc"
    for t in random_transcoders(gpt2, d_sae=30, seed=6):
        save_saelens(t, tc / f"layer_{t.layer}")
    cache = tmp_path / "cache"
    monkeypatch.setenv("CIRCUIT_CATALOG_CACHE", str(cache))
    args = ["--model", str(gpt2_dir), "--transcoders", str(tc), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CIRCUIT_CATALOG_CACHE": str(cache)}
    proc = subprocess.Popen([sys.executable, "-m", "circuit_catalog", "serve", *args, "--idle-minutes", "5"], env=env,
                            stderr=subprocess.PIPE, text=True)
    path = warm.socket_path(str(gpt2_dir), str(tc), None, False, "cpu", "float32")
    deadline = time.monotonic() + 300
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)
    yield args, tc, path
    proc.terminate()
    proc.wait(30)
    assert not path.exists()  # the server removes its socket when it stops


def test_active_is_answered_by_the_server(server, monkeypatch, gpt2_dir):
    args, tc, path = server
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    from circuit_catalog.ingest.pipeline import active as direct

    expected = direct(str(gpt2_dir), str(tc), PROMPT, -1, 5, device="cpu")

    def no_loading(*_, **__):
        raise AssertionError("active loaded the model although a server was running")

    monkeypatch.setattr("circuit_catalog.ingest.pipeline.active", no_loading)
    code, output = run("active", *args, "--prompt", PROMPT, "-k", "5", "--format", "ids")
    assert code == 0, output
    assert output.split() == [f.feature for f in expected]
    assert_one_line_error(*run("active", *args, "--prompt", PROMPT, "--pos", "40"), "outside the prompt")
    # a server of every layer answers for a subset of them, as a model loaded with only those would
    subset = direct(str(gpt2_dir), str(tc), PROMPT, -1, 3, layers=[1], device="cpu")
    code, output = run("active", *args, "--layers", "1", "--prompt", PROMPT, "-k", "3", "--format", "ids")
    assert code == 0, output
    assert output.split() == [f.feature for f in subset] and all(f.feature.startswith("L1/") for f in subset)
    assert_one_line_error(*run("active", *args, "--layers", "7", "--prompt", PROMPT), "no transcoder for layer(s) [7]")


def test_other_arguments_or_files_are_another_server(server, gpt2_dir):
    args, tc, path = server
    assert warm.socket_path(str(gpt2_dir), str(tc), [1], False, "cpu", "float32") != path
    assert warm.socket_path(str(gpt2_dir), str(tc), None, False, "cpu", "bfloat16") != path
    weights = tc / "layer_0" / "sae_weights.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))
    assert warm.socket_path(str(gpt2_dir), str(tc), None, False, "cpu", "float32") != path


def test_a_dead_servers_socket_is_ignored(tmp_path):
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))  # bound, never listening: what a killed server leaves
    assert path.exists() and warm.ask(path, {"op": "active"}) is None
    assert warm.ask(tmp_path / "absent.sock", {"op": "active"}) is None
