"""Agreement with decoderesearch/circuit-tracer's `attribute()` on the same model, transcoders and prompt.

circuit-tracer 0.5 pins transformers <= 4.57.3, so it runs in its own venv (bench/circuit_tracer/
setup_venv.sh, kept in the cache between runs) as a subprocess; the test skips with the reason if that
venv cannot be installed. Edges both graphs define are compared: every edge into a feature or logit from
a feature, an error node, or (Llama: no position embedding) a token. circuit-tracer leaves out biases and,
for GPT-2, the position embedding, which our token nodes include, so GPT-2 token edges are not compared.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from ingest.attribution import attribute
from ingest.models import cache_root
from ingest.transcoder_formats import load_transcoders, save_circuit_tracer
from tests.conftest import random_transcoders

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "bench" / "circuit_tracer" / "setup_venv.sh"
RUNNER = ROOT / "bench" / "circuit_tracer" / "run_attribute.py"
PROMPT = "the jury said the city election was good"


@pytest.fixture(scope="session")
def ct_python() -> Path:
    venv = Path(os.environ.get("CIRCUIT_CATALOG_CT_VENV", cache_root() / "circuit-tracer-venv"))
    done = subprocess.run(["bash", str(SETUP), str(venv)], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"circuit-tracer could not be installed in its own venv ({reason})")
    return venv / "bin" / "python"


def run_circuit_tracer(ct_python: Path, model_dir: Path, tc_dir: Path, out: Path) -> dict:
    subprocess.run([str(ct_python), str(RUNNER), "--model", str(model_dir), "--transcoders", str(tc_dir),
                    "--prompt", PROMPT, "--out", str(out), "--batch-size", "64"],
                   check=True, capture_output=True, text=True, timeout=600)
    return dict(np.load(out, allow_pickle=False))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_edges_agree_with_circuit_tracer(arch, ct_python, request, tmp_path):
    model_dir, model = request.getfixturevalue(f"{arch}_dir"), request.getfixturevalue(arch)
    save_circuit_tracer(random_transcoders(model, d_sae=40, seed=3), tmp_path / "tc")
    tset = load_transcoders(tmp_path / "tc")  # both sides read the same files
    ref = run_circuit_tracer(ct_python, model_dir, tmp_path / "tc", tmp_path / "ct.npz")
    ours = attribute(model, tset, PROMPT)

    assert ours.tokens.tolist() == ref["input_tokens"].tolist()
    assert ours.logit_tokens.tolist() == ref["logit_tokens"].tolist()
    theirs_features = ref["active_features"][ref["selected_features"]]
    assert ours.features.tolist() == theirs_features.tolist()  # same nodes, same order (BOS has none on either side)
    torch.testing.assert_close(ours.activations, torch.from_numpy(ref["activation_values"][ref["selected_features"]]))

    A, R = ours.adjacency, torch.from_numpy(ref["adjacency"])
    n_feat, n_pos, n_layers = ours.n_features, ours.n_pos, ours.n_layers
    assert R.shape == A.shape
    targets = torch.cat([torch.arange(n_feat), torch.arange(ours.logit_index(0), ours.n_nodes)])
    error_cols = torch.tensor([ours.error_index(layer, pos) for layer in range(n_layers) for pos in range(n_pos)])
    sources = torch.cat([torch.arange(n_feat), error_cols])
    if arch == "llama":
        sources = torch.cat([sources, torch.arange(ours.token_index(0), ours.logit_index(0))])
    ours_block, theirs_block = A[targets][:, sources], R[targets][:, sources]
    assert (theirs_block != 0).sum() > 200  # a real comparison, not of zeros
    torch.testing.assert_close(ours_block, theirs_block, rtol=1e-4, atol=1e-5 * float(theirs_block.abs().max()))


def test_export_is_a_valid_circuit_tracer_graph_file(ct_python, gpt2, tmp_path):
    """The Neuronpedia export parses with circuit-tracer's own models of the viewer's graph files."""
    from ingest.job import IngestSettings, build_manifest, run_ingest
    from ingest.prompts import AttributionSettings, PromptSpec, run_prompts
    from queries.neuronpedia import export_neuronpedia

    tset = random_transcoders(gpt2, d_sae=40, seed=3)
    root = tmp_path / "catalog"
    run_ingest(gpt2, tset, root, build_manifest(gpt2, "tiny", tset, "mem", IngestSettings(top_k=2, token_top_k=3)), progress=False)
    (pid,) = run_prompts(gpt2, tset, root, [PromptSpec(PROMPT)], AttributionSettings(), progress=False)
    graph = export_neuronpedia(root, pid, tmp_path / "viewer" / "jury.json")
    check = ("import json, sys\n"
             "from circuit_tracer.frontend.graph_models import Metadata, Model\n"
             "m = Model.model_validate_json(open(sys.argv[1]).read())\n"
             "index = json.load(open(sys.argv[2]))\n"
             "[Metadata.model_validate(g) for g in index['graphs']]\n"
             "print(len(m.nodes), len(m.links))\n")
    done = subprocess.run([str(ct_python), "-c", check, str(tmp_path / "viewer" / "jury.json"), str(tmp_path / "viewer" / "graph-metadata.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(len(graph["nodes"])), str(len(graph["links"]))]
