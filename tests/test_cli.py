"""The CLI: bad inputs give one clear line and a non-zero exit, never a traceback; good ones print tables."""

from __future__ import annotations

import json

import torch
from circuit_catalog.ingest.transcoder_formats import save_saelens
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from circuit_catalog.cli import main, parse_layers
from tests.conftest import random_transcoders


def run(*args):
    """(exit code, everything printed); progress bars and errors go to stderr, which this includes."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def run_json(*args):
    result = CliRunner().invoke(main, [str(a) for a in args] + ["--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_one_line_error(code, output, fragment):
    assert code == 1, output
    assert "Traceback" not in output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and fragment in " ".join(lines), output


def corrupt(saelens_dir, layer, mutate):
    path = saelens_dir / f"layer_{layer}" / "sae_weights.safetensors"
    tensors = load_file(path)
    mutate(tensors)
    save_file(tensors, path)
    return path


def test_unknown_model(tmp_path, saelens_dir):
    assert_one_line_error(*run("ingest", "--model", "no-such-model", "--transcoders", saelens_dir, "--catalog", tmp_path / "c"), "offline options")


def test_shape_mismatch(tmp_path, saelens_dir, gpt2_dir):
    def widen(t):
        t["W_enc"] = torch.randn(7, 8)
    corrupt(saelens_dir, 1, widen)
    assert_one_line_error(*run("ingest", "--model", gpt2_dir, "--transcoders", saelens_dir, "--catalog", tmp_path / "c"), "W_enc has 7 rows but cfg.json says d_in=32")


def test_nan_weights(tmp_path, saelens_dir, gpt2_dir):
    def poison(t):
        t["b_enc"][2] = float("nan")
    corrupt(saelens_dir, 0, poison)
    assert_one_line_error(*run("ingest", "--model", gpt2_dir, "--transcoders", saelens_dir, "--catalog", tmp_path / "c"), "NaN")


def test_truncated_file(tmp_path, saelens_dir, gpt2_dir):
    path = saelens_dir / "layer_2" / "sae_weights.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    assert_one_line_error(*run("ingest", "--model", gpt2_dir, "--transcoders", saelens_dir, "--catalog", tmp_path / "c"), "layer_2")


def test_missing_hook(tmp_path, saelens_dir, gpt2_dir):
    cfg_path = saelens_dir / "layer_1" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["metadata"]["hook_name"] = "blocks.1.hook_nowhere"
    cfg_path.write_text(json.dumps(cfg))
    assert_one_line_error(*run("ingest", "--model", gpt2_dir, "--transcoders", saelens_dir, "--catalog", tmp_path / "c"), "does not exist")


def test_model_transcoder_mismatch(tmp_path, saelens_dir, llama_dir, gpt2):
    far = tmp_path / "far"
    for tc in random_transcoders(gpt2, d_sae=8, layers=[5]):
        save_saelens(tc, far / "layer_5")
    assert_one_line_error(*run("ingest", "--model", llama_dir, "--transcoders", far, "--catalog", tmp_path / "c"), "outside the model")


def test_ingest_load_and_lookups(tmp_path, saelens_dir, gpt2_dir):
    catalog = tmp_path / "c"
    code, output = run("ingest", "--model", gpt2_dir, "--transcoders", saelens_dir, "--catalog", catalog, "--top-k", "3")
    assert code == 0, output
    assert "pullback_edges" in output
    edges = run_json("upstream", "L2/1", "--catalog", catalog)  # loads the embedded store on first use
    assert len(edges) == 6 and set(edges[0]) == {"feature", "weight"}
    weights = [abs(e["weight"]) for e in edges]
    assert weights == sorted(weights, reverse=True)
    assert (catalog / "graph").exists()
    code, output = run("load", "--catalog", catalog)
    assert code == 0 and "already up to date" in output
    assert run_json("show", "L2/1", "--catalog", catalog)["tokens"]["id"] == "L2/1"
    code, output = run("tokens", "L2/1", "--catalog", catalog)
    assert code == 0 and "Columns are on different scales" in " ".join(output.split())
    assert "De-embedding: W_E[t] . W_enc[:, f]" in " ".join(output.split())  # printed as text, not read as markup
    assert run_json("cypher", "MATCH (f:Feature {id: $id}) RETURN f.layer AS layer", "--catalog", catalog, "--param", "id=L2/1") == [{"layer": 2}]
    for args, fragment in [
        (("show", "L9/1"), "unknown feature"),
        (("upstream", "L2-1"), "malformed feature id"),
        (("cypher", "MATCH (f:Feature RETURN f"), "Parser exception"),
        (("cypher", "MATCH (f) DETACH DELETE f"), "read-only"),
        (("downstream", "L0/1", "--normalise"), "rerun `circuit-catalog ingest` with --dataset"),  # no statistics: no scales
        (("report", "feature", "L1/1", "--normalise"), "rerun `circuit-catalog ingest` with --dataset"),
    ]:
        assert_one_line_error(*run(*args, "--catalog", catalog), fragment)
    assert_one_line_error(*run("show", "L1/1", "--catalog", tmp_path / "nowhere"), "not a catalog directory")
    assert_one_line_error(*run("upstream", "L1/1", "--catalog", catalog, "--store", "bolt://127.0.0.1:1"), "cannot reach")


def test_active_features_on_a_prompt(saelens_dir, gpt2_dir):
    code, output = run("active", "--model", gpt2_dir, "--transcoders", saelens_dir, "--prompt", "the capital of france is", "--format", "ids", "-k", "3")
    assert code == 0, output
    assert len(output.split()) == 3 and all(i.startswith("L") for i in output.split())


def test_parse_layers():
    assert parse_layers("all") is None
    assert parse_layers("0-3,8") == [0, 1, 2, 3, 8]
    assert parse_layers("0-28:14") == [0, 14, 28]


def test_eval_command(saelens_dir, gpt2_dir, text_file, tmp_path):
    code, output = run("eval", "--model", gpt2_dir, "--transcoders", saelens_dir, "--dataset", text_file,
                       "--tokens", "128", "--ctx-len", "16", "--out", tmp_path / "eval.json")
    assert code == 0, output
    figures = json.loads((tmp_path / "eval.json").read_text())
    assert [m["layer"] for m in figures["layers"]] == [0, 1, 2] and figures["ce_original"] > 0


def test_saelens_setting_we_cannot_reproduce(tmp_path, saelens_dir, gpt2_dir):
    cfg_path = saelens_dir / "layer_1" / "cfg.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "normalize_activations": "layer_norm"}))
    assert_one_line_error(*run("ingest", "--model", gpt2_dir, "--transcoders", saelens_dir, "--catalog", tmp_path / "c"),
                          'normalize_activations="layer_norm" is not supported')


def test_heads_command(tmp_path, saelens_dir, gpt2_dir):
    """`ingest --heads-top-k`: OV parts per (attention layer, target layer), resumable; `heads FEATURE` lists them."""
    import pyarrow.parquet as pq

    from circuit_catalog.catalog import layout

    catalog = tmp_path / "c"
    code, output = run("ingest", "--model", gpt2_dir, "--transcoders", saelens_dir, "--catalog", catalog, "--top-k", "3", "--heads-top-k", "2")
    assert code == 0 and "ov_edges" in output, output
    parts = sorted((catalog / layout.OV).glob("*.parquet"))
    assert [p.name for p in parts] == ["A000_L000.parquet", "A000_L001.parquet", "A000_L002.parquet", "A001_L001.parquet",
                                       "A001_L002.parquet", "A002_L002.parquet"]
    stamps = {p: p.stat().st_mtime_ns for p in parts}
    code, _ = run("ingest", "--model", gpt2_dir, "--transcoders", saelens_dir, "--catalog", catalog, "--top-k", "3", "--heads-top-k", "2")
    assert code == 0 and stamps == {p: p.stat().st_mtime_ns for p in parts}  # a rerun recomputes nothing
    found = run_json("heads", "L2/1", "--catalog", catalog)
    rows = [r for p in parts for r in pq.read_table(p).to_pylist() if r["dst"] == "L2/1"]
    expected = sorted(rows, key=lambda r: (-abs(r["weight"]), r["src"], r["head"]))[:10]
    assert [(f["source"], f["head"]) for f in found["features"]] == [(r["src"], r["head"]) for r in expected]
    assert len(found["tokens"]) == 10
    code, output = run("heads", "L2/1", "--catalog", catalog, "--head", "L1H3")
    assert code == 0 and "L1H3" in output and "L2H0" not in output
    assert_one_line_error(*run("heads", "L2/1", "--catalog", catalog, "--head", "L7H9"), "unknown head L7H9")
    plain = tmp_path / "plain"
    assert run("ingest", "--model", gpt2_dir, "--transcoders", saelens_dir, "--catalog", plain, "--top-k", "3")[0] == 0
    assert_one_line_error(*run("heads", "L2/1", "--catalog", plain), "--heads-top-k")


def test_qk_command(tmp_path, saelens_dir, gpt2_dir):
    """`qk`: the terms' sum is the model's score, on a catalog prompt by id and on plain text."""
    import pytest

    from circuit_catalog.ingest.models import load_model

    catalog = tmp_path / "c"
    prompts = tmp_path / "p.txt"
    prompts.write_text("the capital of france is\n")
    code, output = run("ingest", "--model", gpt2_dir, "--transcoders", saelens_dir, "--catalog", catalog, "--top-k", "2", "--prompts", prompts)
    assert code == 0, output
    pid = run_json("prompts", "--catalog", catalog)[0]["id"]
    found = run_json("qk", "--model", gpt2_dir, "--transcoders", saelens_dir, "--catalog", catalog, "--prompt", pid,
                     "--head", "L2H1", "--query-pos", "5", "--key-pos", "2", "-k", "4")
    model = load_model(str(gpt2_dir))
    _, cache = model.run_with_cache(model.to_tokens("the capital of france is"))
    assert found["score"] == pytest.approx(cache["blocks.2.attn.hook_attn_scores"][0, 1, 5, 2].item(), rel=1e-5)
    assert found["sum_of_terms"] == pytest.approx(found["score"], rel=1e-4, abs=1e-4)
    assert len(found["pairs"]) == 4 and len(found["query_totals"]) == 4
    code, output = run("qk", "--model", gpt2_dir, "--transcoders", saelens_dir, "--prompt", "the capital of france is",
                       "--head", "L2H1", "--query-pos", "-1", "--key-pos", "2")
    assert code == 0 and "largest bilinear terms" in output and "query-side totals" in output, output
    assert_one_line_error(*run("qk", "--model", gpt2_dir, "--transcoders", saelens_dir, "--prompt", "the capital",
                               "--head", "L2H1", "--query-pos", "1", "--key-pos", "2"), "causal")
