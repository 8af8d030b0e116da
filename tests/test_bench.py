"""Every benchmark runs at its `--smoke` size, so a change that breaks one fails here, not at the next
manual measurement (bench/stores.py broke silently when Feature gained its statistics columns)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {  # benchmark -> a line its report must print
    "stores.py": "embedded: upstream query p50",
    "pullbacks.py": "achieved",
    "stats.py": "with statistics:",
    "attribution.py": "tiny Llama",
    "agreement.py": "prune masks at 6 threshold pairs",
    "mapped_pullbacks.py": "x the set on disk",
    "interventions.py": "--validate -k 20",
    "heads.py": "head-resolved graph",
    "interactive.py": "rerun with nothing to do",
    "prompts.py": "recurring: p50",
    "prompt_stores.py": "bolt: recurring: p50",
    "train.py": "bare forward pass (collection) across the runs",
}


def test_every_benchmark_has_a_smoke_run():
    assert sorted(p.name for p in (REPO / "bench").glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_smoke_run(name):
    done = subprocess.run([sys.executable, str(REPO / "bench" / name), "--smoke"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert EXPECTED[name] in done.stdout, done.stdout
