"""The installed package: one top-level name, its data files inside it, and a light `import circuit_catalog`."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                           "--wheel-dir", str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (found,) = out.glob("circuit_catalog-*.whl")
    return found


def test_wheel_holds_one_top_level_package_with_its_queries(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"circuit_catalog"}
    for module in ("circuit_catalog/ingest/transcoder.py", "circuit_catalog/catalog/layout.py",
                   "circuit_catalog/queries/reports/prompt.py", "circuit_catalog/queries/cypher/upstream.cypher"):
        assert module in names


def test_installing_the_wheel_adds_only_circuit_catalog(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # the fresh venv must not see the checkout: through PYTHONPATH pip finds the egg-info the wheel's build left
    # there ("already installed") and `import circuit_catalog` finds the source tree
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    listing = [str(python), "-c", "import sysconfig, os; print('\\n'.join(sorted(os.listdir(sysconfig.get_paths()['purelib']))))"]
    before = set(subprocess.run(listing, capture_output=True, text=True, check=True, env=env).stdout.split())
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    after = set(subprocess.run(listing, capture_output=True, text=True, check=True, env=env).stdout.split())
    added = {n for n in after - before if not n.endswith(".dist-info")}
    assert added == {"circuit_catalog"}
    # the package's own modules resolve inside it (errors needs nothing beyond the standard library), and
    # `import circuit_catalog` imports none of the heavy dependencies (none is installed in this venv)
    probe = ("import circuit_catalog, circuit_catalog.errors as e, sys; "
             "assert e.__file__.startswith(circuit_catalog.__path__[0]); "
             "assert len(circuit_catalog.__path__) == 1, circuit_catalog.__path__; print('ok')")
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
