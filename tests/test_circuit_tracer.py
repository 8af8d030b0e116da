"""Agreement with decoderesearch/circuit-tracer on the same model, transcoders and prompt.

circuit-tracer 0.5 pins transformers <= 4.57.3, so it runs in its own venv (bench/circuit_tracer/
setup_venv.sh; `scripts/test.sh` builds it before the tests) as a subprocess. Without that venv these
tests fail, naming the reason: they are the project's evidence for every "as circuit-tracer" claim.

Compared: every edge both graphs define (`attribute()`); pruning masks and scores (`prune_graph`,
`compute_graph_scores`), on circuit-tracer's own graph and on ours put into its `Graph` object, so the
pruning is compared free of the ~1e-7 differences between the two attributions; and the exported graph
JSON against circuit-tracer's own writer (`create_graph_files`) run on the same graph. circuit-tracer
leaves out biases and, for GPT-2, the position embedding, which our token nodes include, so GPT-2
token edges are not compared.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from circuit_catalog.ingest.attribution import AttributionGraph, attribute
from circuit_catalog.ingest.job import build_manifest, run_ingest
from circuit_catalog.ingest.settings import IngestSettings
from circuit_catalog.ingest.prompts import run_prompts
from circuit_catalog.ingest.settings import AttributionSettings, PromptSpec
from circuit_catalog.ingest.pruning import graph_scores, prune
from circuit_catalog.ingest.transcoder_formats import load_transcoders, save_circuit_tracer
from circuit_catalog.queries.neuronpedia import export_neuronpedia

from tests.conftest import random_transcoders

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "bench" / "circuit_tracer" / "run_attribute.py"
PROMPT = "the jury said the city election was good"
# node thresholds 0.5, 0.8, 0.95 against edge thresholds 0.9, 0.98; the default (0.8, 0.98) first
THRESHOLDS = [(0.8, 0.98), (0.5, 0.9), (0.5, 0.98), (0.8, 0.9), (0.95, 0.9), (0.95, 0.98)]


def run_circuit_tracer(ct_python: Path, model_dir: Path, tc_dir: Path, out: Path, *args: str, prompt: str = PROMPT) -> dict:
    done = subprocess.run([str(ct_python), str(RUNNER), "--model", str(model_dir), "--transcoders", str(tc_dir),
                           "--prompt", prompt, "--out", str(out), "--batch-size", "8", *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(np.load(out, allow_pickle=False))


def prune_args() -> list[str]:
    return [a for pair in THRESHOLDS for a in ("--prune", str(pair[0]), str(pair[1]))]


def save_graph(graph: AttributionGraph, path: Path) -> Path:
    np.savez(path, adjacency=graph.adjacency.numpy(), logit_probabilities=graph.logit_probabilities.numpy(),
             activation_values=graph.activations.numpy())
    return path


def assert_same_nodes(ours: AttributionGraph, ref: dict) -> None:
    assert ours.tokens.tolist() == ref["input_tokens"].tolist()
    assert ours.logit_targets.tolist() == ref["logit_targets"].tolist()
    assert ours.features.tolist() == ref["active_features"][ref["selected_features"]].tolist()  # same nodes, same order


def assert_masks_equal(ours: AttributionGraph, ref: dict) -> None:
    kept = []
    for i, (node_t, edge_t) in enumerate(THRESHOLDS):
        pruned = prune(ours, node_t, edge_t)
        node_mask, edge_mask = torch.from_numpy(ref[f"prune_node_mask_{i}"]), torch.from_numpy(ref[f"prune_edge_mask_{i}"])
        assert torch.equal(pruned.node_mask, node_mask), (node_t, edge_t, int((pruned.node_mask != node_mask).sum()))
        assert torch.equal(pruned.edge_mask, edge_mask), (node_t, edge_t, int((pruned.edge_mask != edge_mask).sum()))
        kept.append(int(node_mask[:ours.n_features].sum()))
    assert min(kept) > 0 and min(kept) < ours.n_features  # pruning chose: it neither kept nor dropped every feature


def assert_edges_agree(ours: AttributionGraph, ref: dict, arch: str) -> None:
    """Every edge both graphs define is equal: into features and logits, from features, errors and (Llama) tokens."""
    A, R = ours.adjacency, torch.from_numpy(ref["adjacency"])
    assert R.shape == A.shape
    targets = torch.cat([torch.arange(ours.n_features), torch.arange(ours.logit_index(0), ours.n_nodes)])
    error_cols = torch.tensor([ours.error_index(layer, pos) for layer in range(ours.n_layers) for pos in range(ours.n_pos)])
    sources = torch.cat([torch.arange(ours.n_features), error_cols])
    if arch == "llama":
        sources = torch.cat([sources, torch.arange(ours.token_index(0), ours.logit_index(0))])
    ours_block, theirs_block = A[targets][:, sources], R[targets][:, sources]
    assert (theirs_block != 0).sum() > 200  # a real comparison, not of zeros
    torch.testing.assert_close(ours_block, theirs_block, rtol=1e-4, atol=1e-5 * float(theirs_block.abs().max()))


@pytest.fixture(scope="module")
def tiny_case(request, tmp_path_factory):
    """Per (arch, cap): model, model dir, transcoder dir and set, and our graph of PROMPT."""
    cache = {}

    def get(arch: str, cap: int | None):
        if (arch, cap) not in cache:
            model_dir, model = request.getfixturevalue(f"{arch}_dir"), request.getfixturevalue(arch)
            tc_dir = tmp_path_factory.mktemp(f"tc-{arch}") / "tc"
            save_circuit_tracer(random_transcoders(model, d_sae=40, seed=3), tc_dir)
            tset = load_transcoders(tc_dir)  # both sides read the same files
            graph = attribute(model, tset, PROMPT, max_feature_nodes=cap, batch_size=8)
            cache[arch, cap] = model, model_dir, tc_dir, tset, graph
        return cache[arch, cap]

    return get


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_edges_and_pruning_agree_with_circuit_tracer(arch, ct_python, tiny_case, tmp_path):
    """circuit-tracer's own attribute() graph: the same edges, and prune_graph's masks equal ours on it."""
    _, _, tc_dir, _, ours = tiny_case(arch, None)
    ref = run_circuit_tracer(ct_python, tiny_case(arch, None)[1], tc_dir, tmp_path / "ct.npz", *prune_args())
    assert_same_nodes(ours, ref)
    torch.testing.assert_close(ours.activations, torch.from_numpy(ref["activation_values"][ref["selected_features"]]))

    assert_edges_agree(ours, ref, arch)

    # their pruning of their graph, and ours of ours (Llama: every edge compared, so the graphs are one)
    if arch == "llama":
        assert_masks_equal(ours, ref)


def test_trained_batchtopk_skip_transcoders_agree_with_circuit_tracer(llama_dir, llama, text_file, ct_python, tmp_path):
    """What `train` saves (BatchTopK exported as JumpReLU, with skip paths), written in circuit-tracer's layout: its
    attribute() reads the thresholds and skip paths and gives the same activations and edges as ours."""
    from circuit_catalog.ingest.train import TrainConfig, train_transcoders

    cfg = TrainConfig(model="tiny", dataset=str(text_file), layers=list(range(llama.cfg.n_layers)), d_sae=40, k=6, n_tokens=2000,
                      ctx_len=32, batch_contexts=8, minibatch=64, epochs=2, lr=2e-3, eval_tokens=128, skip=True)
    train_transcoders(llama, cfg, tmp_path / "trained", progress=False)
    trained = load_transcoders(tmp_path / "trained")
    assert all(tc.cfg.activation == "jumprelu" and tc.W_skip is not None for tc in trained)
    save_circuit_tracer(trained, tmp_path / "ct-tc")
    tset = load_transcoders(tmp_path / "ct-tc")
    ours = attribute(llama, tset, PROMPT, batch_size=8)
    ref = run_circuit_tracer(ct_python, llama_dir, tmp_path / "ct-tc", tmp_path / "ct.npz")
    assert_same_nodes(ours, ref)
    torch.testing.assert_close(ours.activations, torch.from_numpy(ref["activation_values"][ref["selected_features"]]))
    assert_edges_agree(ours, ref, "llama")


@pytest.mark.parametrize("arch, cap", [("gpt2", None), ("llama", None), ("gpt2", 24), ("llama", 24)])
def test_pruning_and_scores_equal_circuit_tracers_on_the_same_graph(arch, cap, ct_python, tiny_case, tmp_path):
    """Our graph in circuit-tracer's Graph: prune_graph's masks and compute_graph_scores equal ours exactly."""
    _, model_dir, tc_dir, _, ours = tiny_case(arch, cap)
    cap_args = [] if cap is None else ["--max-feature-nodes", str(cap)]
    ref = run_circuit_tracer(ct_python, model_dir, tc_dir, tmp_path / "ct.npz", *cap_args, *prune_args(),
                             "--graph", str(save_graph(ours, tmp_path / "ours.npz")))
    assert_same_nodes(ours, ref)  # with the cap too: the same features chosen
    assert ours.capped == (cap is not None)
    assert_masks_equal(ours, ref)
    replacement, completeness = graph_scores(ours)
    assert replacement == pytest.approx(float(ref["replacement_score"]), rel=1e-5)
    assert completeness == pytest.approx(float(ref["completeness_score"]), rel=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_export_equals_circuit_tracers_graph_file(arch, ct_python, tiny_case, tmp_path):
    """Every value of our Neuronpedia/circuit-tracer JSON equals what create_graph_files writes for the graph."""
    model, model_dir, tc_dir, tset, _ = tiny_case(arch, None)
    root = tmp_path / "catalog"
    manifest = build_manifest(model, "tiny", tset, str(tc_dir), IngestSettings(top_k=2, token_top_k=3))
    run_ingest(model, tset, root, manifest, progress=False)
    settings = AttributionSettings()
    (pid,) = run_prompts(model, tset, root, [PromptSpec(PROMPT)], settings, progress=False)
    ours = export_neuronpedia(root, pid, tmp_path / "ours" / "jury.json")
    graph = attribute(model, tset, PROMPT, max_feature_nodes=settings.max_feature_nodes, batch_size=settings.batch_size)
    run_circuit_tracer(ct_python, model_dir, tc_dir, tmp_path / "ct.npz", "--graph", str(save_graph(graph, tmp_path / "g.npz")),
                       "--prune", str(settings.node_threshold), str(settings.edge_threshold),
                       "--graph-files", str(tmp_path / "theirs"), "--slug", "jury", "--scan", ours["metadata"]["scan"])
    theirs = json.loads((tmp_path / "theirs" / "jury.json").read_text())
    # the one departure: error ids err_{layer}_{pos}; circuit-tracer's 0_{layer}_{pos} collides with layer-0
    # features (in this very graph), so ours are mapped onto theirs, not back
    theirs_id = {n["node_id"]: "0_" + n["node_id"][4:] for n in ours["nodes"] if n["feature_type"] == "mlp reconstruction error"}
    assert theirs_id and set(theirs_id.values()) & {n["node_id"] for n in ours["nodes"]}  # the collision is real here
    for n in ours["nodes"]:
        n["node_id"] = theirs_id.get(n["node_id"], n["node_id"])
    for link in ours["links"]:
        link["source"], link["target"] = theirs_id.get(link["source"], link["source"]), theirs_id.get(link["target"], link["target"])

    assert ours["metadata"] == theirs["metadata"] and ours["qParams"] == theirs["qParams"]
    assert [n["node_id"] for n in ours["nodes"]] == [n["node_id"] for n in theirs["nodes"]]
    assert len(ours["nodes"]) > 20 and any(n["feature_type"] == "mlp reconstruction error" for n in ours["nodes"])
    for mine, ref in zip(ours["nodes"], theirs["nodes"]):
        assert set(mine) == set(ref), mine["node_id"]
        for key, value in ref.items():
            if isinstance(value, float):
                assert mine[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (mine["node_id"], key)
            else:
                assert mine[key] == value, (mine["node_id"], key)
    assert [(e["source"], e["target"]) for e in ours["links"]] == [(e["source"], e["target"]) for e in theirs["links"]]
    np.testing.assert_allclose([e["weight"] for e in ours["links"]], [e["weight"] for e in theirs["links"]], rtol=1e-5, atol=1e-7)
    index = json.loads((tmp_path / "ours" / "graph-metadata.json").read_text())
    assert index == json.loads((tmp_path / "theirs" / "graph-metadata.json").read_text())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_logit_cutoff_and_special_first_token_agree(arch, ct_python, tiny_case, tmp_path):
    """A prompt that starts with a special token gets no BOS (position 0 is that token, without features),
    and a low desired_logit_prob cuts the logit targets short: the same tokens, targets and edges."""
    model, model_dir, tc_dir, tset, _ = tiny_case(arch, None)
    prompt = "<eos> the capital of france is"
    ours = attribute(model, tset, prompt, desired_logit_prob=0.05)
    ref = run_circuit_tracer(ct_python, model_dir, tc_dir, tmp_path / "ct.npz", "--desired-logit-prob", "0.05", prompt=prompt)
    assert ours.tokens[0] == model.tokenizer.eos_token_id and model.tokenizer.bos_token_id not in ours.tokens.tolist()
    assert 1 <= len(ours.logit_targets) < 10  # the cut-off, not the cap, ended the list
    assert_same_nodes(ours, ref)
    targets = torch.cat([torch.arange(ours.n_features), torch.arange(ours.logit_index(0), ours.n_nodes)])
    sources = torch.arange(ours.token_index(0))  # features and errors
    A, R = ours.adjacency[targets][:, sources], torch.from_numpy(ref["adjacency"])[targets][:, sources]
    assert (R != 0).sum() > 100
    torch.testing.assert_close(A, R, rtol=1e-4, atol=1e-5 * float(R.abs().max()))


def test_default_feature_cap_is_circuit_tracers_command_line_default(ct_python):
    """The README and `ingest.settings` call 7,500 feature nodes circuit-tracer's default: read from its own CLI module."""
    from circuit_catalog.ingest.settings import MAX_FEATURE_NODES

    done = subprocess.run([str(ct_python), "-c", "import circuit_tracer.__main__ as m; print(m.DEFAULT_MAX_FEATURE_NODES)"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) == MAX_FEATURE_NODES == AttributionSettings().max_feature_nodes
