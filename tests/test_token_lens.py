"""Token weights on demand (`ingest.token_lens`): for a token in a feature's stored top K they equal the stored
edges and rank where stored; for any other token `paths` can still end there, each end's weight the on-demand one."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from circuit_catalog.catalog import layout
from circuit_catalog.ingest.transcoder_formats import save_saelens

from tests.conftest import random_transcoders
from tests.test_cli import assert_one_line_error, run, run_json


@pytest.fixture(scope="module")
def setup(tmp_path_factory, gpt2, gpt2_dir):
    root = tmp_path_factory.mktemp("token-lens")
    tc = root / "tc"
    for t in random_transcoders(gpt2, d_sae=24, seed=9):
        save_saelens(t, tc / f"layer_{t.layer}")
    code, output = run("ingest", "--model", gpt2_dir, "--transcoders", tc, "--catalog", root / "catalog", "--token-top-k", "3",
                       "--top-k", "6")
    assert code == 0, output
    features = pq.read_table(root / "catalog" / layout.FEATURES).to_pylist()
    return ["--model", str(gpt2_dir), "--transcoders", str(tc)], root / "catalog", features


def test_a_stored_token_has_its_stored_weight_and_rank(setup):
    weights, catalog, features = setup
    f = next(r for r in features if r["layer"] == 1)
    checked = 0
    for column, key in (("logit", "logit_lens"), ("deembed", "deembed"), ("deembed_ext", "deembed_ext")):
        for rank in range(3):
            token = f[f"{column}_tokens"][rank]
            got = run_json("tokens", f["id"], "--catalog", catalog, "--token", token, *weights)
            if got["token"] != token:  # a word without its space: the space variant was meant, or ranks tie
                continue
            assert got[key] == pytest.approx(f[f"{column}_weights"][rank], rel=1e-4, abs=1e-5)
            assert got[f"{key}_rank"] <= rank + 1  # ties can only move it up
            checked += 1
    assert checked >= 5


def test_paths_end_at_any_token_with_the_weights(setup):
    weights, catalog, features = setup
    stored = {t for f in features for t in f["logit_tokens"]}
    rare = next(t for t in ("zebra", "river", "house", "city", "jury") if t not in stored and " " + t not in stored)
    code, output = run("paths", "--catalog", catalog, "--from-token", "the", "--to-logit", rare, "--max-hops", "1")
    assert code == 0 and "no feature has" in output  # the stored edges cannot end there
    found = run_json("paths", "--catalog", catalog, "--from-token", "the", "--to-logit", rare, "--max-hops", "1", *weights)
    assert found
    for p in found[:3]:
        last = run_json("tokens", p["nodes"][-2], "--catalog", catalog, "--token", rare, *weights)
        assert p["weights"][-1] == pytest.approx(last["logit_lens"], rel=1e-4)


def test_refusals(setup):
    weights, catalog, _ = setup
    code, output = run("tokens", "L1/2", "--catalog", catalog, "--token", "the")
    assert code == 2 and "--model" in output
    assert_one_line_error(*run("tokens", "L1/2", "--catalog", catalog, "--token", "zebra house", *weights), "tokens")
    assert_one_line_error(*run("tokens", "L1/999", "--catalog", catalog, "--token", "the", *weights), "unknown feature")
