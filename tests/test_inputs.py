"""Inputs that used to give silently wrong output with exit 0 are refused in one line, before anything is written."""

from __future__ import annotations

import json
import shutil

import pytest
from circuit_catalog.catalog import layout
from circuit_catalog.ingest.job import build_manifest, run_ingest, run_stats
from circuit_catalog.ingest.settings import IngestSettings
from circuit_catalog.ingest.models import load_model
from circuit_catalog.ingest.settings import read_prompts
from safetensors.torch import load_file, save_file

from circuit_catalog.errors import CatalogDirError, DatasetError, ModelError
from tests.conftest import STATS_CTX, STATS_TOKENS, TEXT, random_transcoders
from tests.test_security import cli, one_line_error


@pytest.fixture()
def model_copy(gpt2_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(gpt2_dir, d)
    return d


def test_nan_in_model_weights_is_refused(model_copy):
    path = model_copy / "model.safetensors"
    tensors = load_file(path)
    name = next(k for k in sorted(tensors) if k.endswith("mlp.c_fc.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ModelError, match="NaN or Inf"):
        load_model(str(model_copy))


@pytest.mark.parametrize("field", ["n_layer", "n_embd"])
def test_config_missing_an_architecture_field_is_refused(model_copy, field):
    """transformers would default it (n_layer -> 12 layers, 9 of them random) and the catalog would be wrong."""
    cfg = json.loads((model_copy / "config.json").read_text())
    del cfg[field]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="does not match the weights|ignore_mismatched_sizes"):
        load_model(str(model_copy))


def test_llama_config_without_num_hidden_layers_is_refused(llama_dir, tmp_path):
    """The audit's case: LlamaConfig defaults to 32 layers, so 29 would be random."""
    d = tmp_path / "llama"
    shutil.copytree(llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="missing keys"):
        load_model(str(d))


@pytest.mark.parametrize("content", [b"[1, 2]", b"\xff\xfe\x00garbage", b"{not json"])
def test_config_of_the_wrong_type_or_encoding_is_refused(model_copy, content):
    (model_copy / "config.json").write_bytes(content)
    with pytest.raises(ModelError, match="config.json"):
        load_model(str(model_copy))


@pytest.mark.parametrize("line", ['{"prompt": null}', '{"prompt": 5}', '{"prompt": "a", "target": 3}', '["a"]'])
def test_a_prompt_that_is_not_text_is_refused(tmp_path, line):
    path = tmp_path / "p.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DatasetError, match="string 'prompt'"):
        read_prompts(path)


def test_an_over_long_prompt_is_refused_before_anything_is_written(tmp_path, gpt2_dir, saelens_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the capital of france is\n" + " ".join(["the"] * 100) + "\n")  # the model's context is 64
    line = one_line_error(*cli("ingest", "--model", gpt2_dir, "--transcoders", saelens_dir, "--catalog", tmp_path / "c", "--prompts", prompts))
    assert "101 tokens; the model's context is 64" in line
    assert not (tmp_path / "c").exists()


def test_min_weight_nan_is_a_usage_error(tmp_path, gpt2_dir, saelens_dir):
    code, output = cli("ingest", "--model", gpt2_dir, "--transcoders", saelens_dir, "--catalog", tmp_path / "c", "--min-weight", "nan")
    assert code == 2 and [line for line in output.splitlines() if line.strip()] == ["error: Invalid value for '--min-weight': nan is not a finite number"]
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------- statistics keyed by content


def test_statistics_follow_the_tokens_not_the_dataset_name(stats_catalog, gpt2, text_file, tmp_path):
    root, tset = stats_catalog
    same = tmp_path / "renamed.txt"
    shutil.copy(text_file, same)
    assert run_stats(gpt2, tset, root, str(same), STATS_TOKENS, ctx_len=STATS_CTX, top_k=5, progress=False) is False
    changed = tmp_path / "changed.txt"
    changed.write_text(text_file.read_text().replace("paris", "river"))
    with pytest.raises(CatalogDirError, match="another dataset"):
        run_stats(gpt2, tset, root, str(changed), STATS_TOKENS, ctx_len=STATS_CTX, top_k=5, progress=False)


def test_statistics_record_the_tokens_collected(gpt2, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text(TEXT)
    tset = random_transcoders(gpt2, d_sae=8)
    run_ingest(gpt2, tset, tmp_path, build_manifest(gpt2, "tiny", tset, "mem", IngestSettings(top_k=2, token_top_k=2)), progress=False)
    assert run_stats(gpt2, tset, tmp_path, str(small), 10_000_000, ctx_len=16, top_k=2, progress=False)
    info = json.loads(layout.stats_info(tmp_path).read_text())
    assert 0 < info["tokens"] < 1_000 and info["tokens"] % 16 == 0  # the whole (small) file, in contexts of 16
    assert info["tokens"] == info["parts"][layout.parquet_name("tokens")]  # one row per token collected
