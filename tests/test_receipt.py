"""A rerun with nothing to do is answered from the ingest's receipt without loading the model, and only then: another
argument, a touched input or a removed catalog part takes the full path. Also: piped progress is plain lines."""

from __future__ import annotations

import os

import pytest
from circuit_catalog.catalog import layout
from circuit_catalog.ingest.transcoder_formats import save_saelens

from tests.conftest import random_transcoders
from tests.test_cli import run
from tests.test_security import digest

UP_TO_DATE = "is up to date"


@pytest.fixture()
def setup(tmp_path, gpt2, gpt2_dir, text_file):
    tc = tmp_path / "tc"
    for t in random_transcoders(gpt2, d_sae=12, seed=4):
        save_saelens(t, tc / f"layer_{t.layer}")
    (tmp_path / "p.txt").write_text("the capital of france is\n")
    catalog = tmp_path / "catalog"
    args = ["ingest", "--model", gpt2_dir, "--transcoders", tc, "--catalog", catalog, "--top-k", "3", "--dataset", text_file,
            "--tokens", "200", "--ctx-len", "16", "--prompts", tmp_path / "p.txt", "--max-feature-nodes", "10"]
    code, output = run(*args)
    assert code == 0, output
    assert (catalog / layout.INGEST_RECEIPT).is_file()
    return catalog, tc, args


def test_a_rerun_with_nothing_to_do_loads_nothing(setup, monkeypatch):
    catalog, _, args = setup
    before = digest(catalog)

    def refuse(*_, **__):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("circuit_catalog.ingest.models.load_model", refuse)
    code, output = run(*args)
    assert code == 0 and UP_TO_DATE in output, output
    assert "pullback_edges" in output and "attribution graphs" in output  # the same summary as a full run prints
    assert digest(catalog) == before


def test_another_argument_or_a_touched_input_takes_the_full_path(setup):
    catalog, tc, args = setup
    code, output = run(*args, "--top-k", "4")  # the full path checks it, and refuses it as before
    assert code == 1 and UP_TO_DATE not in output and "top_k" in output
    weights = tc / "layer_1" / "sae_weights.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))
    code, output = run(*args)
    assert code == 0 and UP_TO_DATE not in output, output
    code, output = run(*args)  # and the receipt written by that run vouches for the next
    assert code == 0 and UP_TO_DATE in output, output


def test_a_removed_part_is_recomputed(setup):
    catalog, _, args = setup
    part = sorted((catalog / layout.PULLBACKS).iterdir())[0]
    part.unlink()
    code, output = run(*args)
    assert code == 0 and UP_TO_DATE not in output, output
    assert part.is_file()


def test_statistics_older_than_the_norm_scales_are_collected_anew(setup, monkeypatch):
    """A catalog whose statistics predate `inv_scale` (none in stats/info.json, no stats/layers.parquet, no column in
    features.parquet), with the receipt the version before it wrote (its request had no `stats_fields`): the rerun is
    not answered from that receipt, and it records the scales."""
    import json

    import pyarrow.parquet as pq
    from circuit_catalog.ingest import receipt

    catalog, _, args = setup
    info = json.loads(layout.stats_info(catalog).read_text())
    del info["inv_scale"], info["parts"][layout.parquet_name("layers")]
    layout.stats_info(catalog).write_text(json.dumps(info))
    layout.stats_file(catalog, "layers").unlink()
    pq.write_table(pq.read_table(catalog / layout.FEATURES).drop_columns(["inv_scale"]), catalog / layout.FEATURES)
    real = receipt.request_digest

    def with_old_receipt(catalog_dir, request):
        older = {k: v for k, v in request.items() if k != "stats_fields"}
        (catalog_dir / layout.INGEST_RECEIPT).write_text(json.dumps({"digest": real(catalog_dir, older)}))
        monkeypatch.setattr(receipt, "request_digest", real)  # once: the receipt written after the run is today's
        return real(catalog_dir, request)

    monkeypatch.setattr(receipt, "request_digest", with_old_receipt)
    code, output = run(*args)
    assert code == 0 and UP_TO_DATE not in output, output
    assert layout.stats_file(catalog, "layers").is_file()
    assert pq.read_table(catalog / layout.FEATURES).column("inv_scale").null_count == 0
    code, output = run(*args)
    assert code == 0 and UP_TO_DATE in output, output


def test_piped_progress_is_plain_lines(capsys):
    from circuit_catalog.progress import tqdm

    for _ in tqdm(range(3), desc="work", mininterval=0):
        pass
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and len(lines) >= 2
    assert lines[0].startswith("work:") and "3/3" in lines[-1]
