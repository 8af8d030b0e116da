"""Component tallies: every term against TransformerLens's own decomposition of the residual stream (per-head results
from the cache, `apply_ln_to_stack` with the cached scale), the rows of each feature summing to its mean
pre-activation, and the part the statistics write (read back with DuckDB)."""

from __future__ import annotations

import json
from dataclasses import replace

import duckdb
import pytest
import torch
from circuit_catalog.catalog import layout
from circuit_catalog.ingest.components import collect_components, components_table, supported
from circuit_catalog.ingest.stats import collect_stats

from tests.conftest import random_clt, random_transcoders

N_EXAMPLES = 3


def _reference(model, tc, caches, examples):
    """{component: mean term} for one feature over `examples` [(context, pos)] by TransformerLens: embed from
    resid_pre 0, heads from `stack_head_results`, MLPs from `decompose_resid`, all through `apply_ln_to_stack`."""
    L, f = tc.layer, examples[0][2]
    normalised = tc.cfg.hook_in.endswith("ln2.hook_normalized")
    sums: dict[str, float] = {}
    for ctx, pos, _ in examples:
        cache = caches[ctx]
        heads, labels = cache.stack_head_results(layer=L + 1, pos_slice=pos, return_labels=True)  # [L+1 * H, 1, d]
        mlps = torch.stack([cache[f"blocks.{m}.hook_mlp_out"][:, pos] for m in range(L)]) if L else heads[:0]
        embed = cache["blocks.0.hook_resid_pre"][None, :, pos]
        b_O = model.b_O[: L + 1, None].expand(L + 1, 1, model.cfg.d_model)
        stack = torch.cat([embed, heads, mlps, b_O])
        if normalised:
            stack = cache.apply_ln_to_stack(stack, layer=L, mlp_input=True, pos_slice=pos)
        terms = (stack[:, 0] @ tc.W_enc[:, f]).tolist()
        names = ["embed", *labels, *(f"MLP{m}" for m in range(L))]
        for name, value in zip(names, terms):
            sums[name] = sums.get(name, 0.0) + value
        sums["bias"] = sums.get("bias", 0.0) + sum(terms[len(names):]) + tc.b_enc[f].item()
    return {k: v / len(examples) for k, v in sums.items()}


@pytest.mark.parametrize("kind", ["per-layer", "clt", "resid-mid"])
def test_terms_equal_transformer_lens_decomposition(tiny, kind):
    model = tiny
    if kind == "clt":
        tset = random_clt(model, d_sae=16, seed=4)
    else:
        tset = random_transcoders(model, d_sae=16, seed=4)
        if kind == "resid-mid":  # a reader before the norm: no scale, no centring
            for tc in tset:
                tc.cfg = replace(tc.cfg, hook_in=f"blocks.{tc.layer}.hook_resid_mid")
    tokens = torch.randint(1, model.cfg.d_vocab, (6, 10), generator=torch.Generator().manual_seed(0))
    stats = collect_stats(model, tset, tokens, k=4, progress=False)
    tallies = collect_components(model, tset, tokens, {L: s.top_index for L, s in stats.items()}, N_EXAMPLES, progress=False)
    keep = 2 * model.cfg.n_heads  # fewer than the terms of the last layer, so `rest` is exercised
    table = components_table(tset, tallies, model.cfg.n_heads, keep=keep).to_pylist()
    caches = [model.run_with_cache(tokens[c : c + 1])[1] for c in range(len(tokens))]
    checked = 0
    for tc in tset:
        for f in range(tc.cfg.d_sae):
            flat = stats[tc.layer].top_index[f, :N_EXAMPLES]
            flat = flat[flat >= 0]
            rows = {r["component"]: r["contribution"] for r in table if r["feature"] == f"L{tc.layer}/{f}"}
            if not len(flat):
                assert not rows
                continue
            ref = _reference(model, tc, caches, [(int(i) // 10, int(i) % 10, f) for i in flat])
            for name, value in rows.items():
                if name != "rest":
                    assert value == pytest.approx(ref[name], abs=1e-4), (tc.layer, f, name)
            assert set(rows) - {"bias", "rest"} <= set(ref)
            assert rows["rest"] == pytest.approx(sum(v for k, v in ref.items() if k not in rows), abs=1e-4)
            # the rows sum to the mean pre-activation, which a ReLU's positive activation equals
            mean_act = stats[tc.layer].top_values[f, : len(flat)].mean().item()
            assert sum(rows.values()) == pytest.approx(mean_act, abs=1e-4)
            checked += 1
    assert checked > 10


def test_statistics_write_components(stats_catalog):
    """The ingest's statistics hold the tallies; per feature, DuckDB's sum of its rows equals the mean activation of
    its first examples in top_examples.parquet, and every feature with examples has its bias and rest rows."""
    root, tset = stats_catalog
    n = json.loads(layout.stats_info(root).read_text())["component_examples"]
    assert n == 5
    comp, top = layout.stats_file(root, "components"), layout.stats_file(root, "top_examples")
    mismatch = duckdb.sql(f"""
        WITH c AS (SELECT feature, sum(contribution) AS total, count(*) FILTER (kind IN ('bias', 'rest')) AS extras
                   FROM read_parquet('{comp}') GROUP BY feature),
             t AS (SELECT feature, avg(activation) AS mean_act FROM read_parquet('{top}') WHERE rank < {n} GROUP BY feature)
        SELECT count(*) FILTER (c.feature IS NULL OR t.feature IS NULL OR abs(total - mean_act) > 1e-4 OR extras != 2),
               count(*)
        FROM c FULL JOIN t USING (feature)""").fetchall()[0]
    assert mismatch[0] == 0 and mismatch[1] > 0


def test_unsupported_models_say_why(gpt2):
    """A transcoder reading something other than the MLP input cannot be decomposed this way: a reason, not a crash."""
    tset = random_transcoders(gpt2, d_sae=8)
    tset[0].cfg = replace(tset[0].cfg, hook_in="blocks.0.hook_resid_pre")
    assert "ln2.hook_normalized or hook_resid_mid" in supported(gpt2, tset)
    assert supported(gpt2, random_transcoders(gpt2, d_sae=8)) is None


def test_components_from_api_cli_and_card(stats_catalog, tmp_path):
    """One feature's tally through `Catalog.components`, the `components` command (table and JSON) and the feature
    card's bar chart: the same rows, largest first, then bias and rest."""
    from circuit_catalog import Catalog

    from tests.test_cli import assert_one_line_error, run, run_json

    root, _ = stats_catalog
    comp = layout.stats_file(root, "components")
    fid = duckdb.sql(f"SELECT feature FROM read_parquet('{comp}') GROUP BY feature ORDER BY feature LIMIT 1").fetchall()[0][0]
    expected = duckdb.sql(f"SELECT component, contribution FROM read_parquet('{comp}') WHERE feature = '{fid}'").fetchall()
    rows = Catalog(root).components(fid)
    assert sorted((r.component, r.contribution) for r in rows) == sorted(expected)
    assert [r.kind for r in rows][-2:] == ["bias", "rest"]
    shown = [abs(r.contribution) for r in rows][:-2]
    assert shown == sorted(shown, reverse=True)
    assert [r["component"] for r in run_json("components", fid, "--catalog", root)] == [r.component for r in rows]
    code, output = run("components", fid, "--catalog", root)
    assert code == 0 and "total" in output and rows[0].component in output
    assert_one_line_error(*run("components", "L0/99999", "--catalog", root), "unknown feature L0/99999")
    assert_one_line_error(*run("components", "L0", "--catalog", root), "malformed feature id")
    [card] = Catalog(root).report_feature([fid], tmp_path)
    html = card.read_text()
    assert "What writes this feature" in html and f"component tally of {fid}" in html
    assert f"{rows[0].component}: {rows[0].contribution:+.3f}" in html


def test_components_missing_says_how_to_get_them(tmp_path, gpt2):
    """A catalog whose statistics hold no tallies (transcoders reading the residual before attention) says why."""
    from circuit_catalog.ingest.job import build_manifest, run_ingest, run_stats
    from circuit_catalog.ingest.settings import IngestSettings

    from tests.conftest import STATS_CTX
    from tests.test_cli import assert_one_line_error, run

    tset = random_transcoders(gpt2, d_sae=8, layers=[0])
    tset[0].cfg = replace(tset[0].cfg, hook_in="blocks.0.hook_resid_pre")
    corpus = tmp_path / "c.txt"
    corpus.write_text("The cat sat on the mat. " * 40)
    run_ingest(gpt2, tset, tmp_path / "cat", build_manifest(gpt2, "tiny", tset, "mem", IngestSettings(top_k=2, token_top_k=2)), progress=False)
    assert run_stats(gpt2, tset, tmp_path / "cat", str(corpus), 200, ctx_len=STATS_CTX, top_k=3, progress=False)
    assert not layout.stats_file(tmp_path / "cat", "components").exists()
    assert_one_line_error(*run("components", "L0/1", "--catalog", tmp_path / "cat"), "no component tallies (")
