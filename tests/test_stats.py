"""Activation statistics and quantile-bin examples equal a brute-force computation on a small dataset; SQL is read-only."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from circuit_catalog.catalog import layout
from circuit_catalog.catalog.ids import feature_id
from circuit_catalog.ingest.datasets import token_contexts
from circuit_catalog.ingest.job import run_stats
from circuit_catalog.ingest.stats import PER_BIN, QUANTILE_BINS, bin_edges
from circuit_catalog.queries.sql import run_sql
from circuit_catalog.queries.stats import feature_stats
from click.testing import CliRunner

from circuit_catalog.cli import main
from circuit_catalog.errors import CatalogDirError, SqlError
from tests.conftest import DEVICES, STATS_CTX, STATS_TOKENS, random_transcoders

N_TOKENS, CTX = STATS_TOKENS, STATS_CTX


def brute_force(model, tset, text_file, layer):
    """(tokens, activations [n_ctx, CTX, d_sae] on the CPU with BOS positions at -1): one forward pass on the model's device."""
    tokens = token_contexts(model.tokenizer, str(text_file), N_TOKENS, CTX)
    _, cache = model.run_with_cache(tokens.to(model.W_E.device))
    acts = tset[layer].encode(cache[f"blocks.{layer}.ln2.hook_normalized"]).float().cpu()  # [n_ctx, CTX, d_sae]
    acts[:, 0] = -1  # BOS positions are not counted
    return tokens, acts


def test_statistics_equal_brute_force(stats_catalog, gpt2, text_file):
    root, tset = stats_catalog
    features, top = (pq.read_table(layout.stats_file(root, name)).to_pylist() for name in ("features", "top_examples"))
    check_statistics(features, top, *brute_force(gpt2, tset, text_file, 1), layer=1)


def check_statistics(features: list[dict], top_examples: list[dict], tokens, acts, layer: int) -> None:
    """A layer's feature rows and one feature's top examples against the brute-force activations."""
    counted = acts[:, 1:].reshape(-1, 24)
    rows = {r["id"]: r for r in features}
    for f in range(24):
        r = rows[feature_id(layer, f)]
        fired = (counted[:, f] > 0).sum().item()
        assert r["fired"] == fired
        assert r["frequency"] == pytest.approx(fired / counted.shape[0])
        assert r["max_act"] == pytest.approx(max(counted[:, f].max().item(), 0.0), rel=1e-5)
        if fired:
            assert r["mean_act"] == pytest.approx(counted[:, f][counted[:, f] > 0].mean().item(), rel=1e-4)
            positive = counted[:, f][counted[:, f] > 0].numpy()
            edges = bin_edges()
            expected_hist = np.histogram(np.clip(positive, edges[0], edges[-1] * 0.999999), bins=edges)[0]
            assert r["log10_histogram"] == expected_hist.tolist()
            true_median = np.quantile(positive, 0.5, method="inverted_cdf")
            assert true_median <= r["q50"] <= true_median * 10 ** (8 / 64) * 1.0001  # upper edge of its bin
    examples = [e for e in top_examples if e["feature"] == feature_id(layer, 3)]
    flat = acts.reshape(-1, 24)[:, 3]
    top = flat.topk(5).values
    # the corpus repeats itself, so equal activations tie: hold the values exactly, and each example to its place
    ranked = sorted(examples, key=lambda e: e["rank"])
    assert [e["activation"] for e in ranked] == pytest.approx([v for v in top.tolist() if v > 0], rel=1e-6)
    assert len({(e["context"], e["pos"]) for e in ranked}) == len(ranked)
    for e in examples:
        assert e["token_id"] == tokens[e["context"], e["pos"]].item()
        assert e["activation"] == pytest.approx(acts[e["context"], e["pos"], 3].item(), rel=1e-5)


def test_quantile_examples_equal_brute_force(stats_catalog, gpt2, text_file):
    """Each interval of (0, max] with occurrences holds min(PER_BIN, occurrences) real examples from it."""
    root, tset = stats_catalog
    table = pq.read_table(layout.stats_file(root, "quantile_examples"))
    assert table.schema.names[:6] == ["feature", "bin", "lower", "upper", "bin_count", "rank"]
    assert table.schema.names[6:] == pq.read_table(layout.stats_file(root, "top_examples")).schema.names[2:]
    check_quantile_examples(table.to_pylist(), *brute_force(gpt2, tset, text_file, 2), layer=2)


def check_quantile_examples(rows: list[dict], tokens, acts, layer: int) -> None:
    checked_full = checked_partial = 0
    for f in range(24):
        a = acts[..., f]
        mine = [r for r in rows if r["feature"] == feature_id(layer, f)]
        if a.max() <= 0:
            assert not mine
            continue
        width = mine[0]["upper"] - mine[0]["lower"]
        assert math.log2(width).is_integer() and all(r["upper"] - r["lower"] == width for r in mine)
        n_bins = math.ceil(a.max().item() / width)
        assert QUANTILE_BINS / 2 < n_bins <= QUANTILE_BINS
        for j in range(QUANTILE_BINS):
            inside = (a > j * width) & (a <= (j + 1) * width)
            got = sorted((r for r in mine if r["bin"] == j), key=lambda r: r["rank"])
            assert len(got) == min(PER_BIN, int(inside.sum()))
            checked_full += len(got) == PER_BIN
            checked_partial += 0 < len(got) < PER_BIN
            assert len({(r["context"], r["pos"]) for r in got}) == len(got)
            assert [r["activation"] for r in got] == sorted((r["activation"] for r in got), reverse=True)
            for r in got:
                assert r["bin_count"] == inside.sum() and r["lower"] == j * width and r["upper"] == (j + 1) * width
                assert r["lower"] < r["activation"] <= r["upper"] and inside[r["context"], r["pos"]]
                assert r["activation"] == pytest.approx(a[r["context"], r["pos"]].item(), rel=1e-5)
                assert r["token_id"] == tokens[r["context"], r["pos"]].item()
                assert r["window_tokens"] == tokens[r["context"], r["window_start"]: r["pos"] + 5].tolist()
    assert checked_full and checked_partial  # both cases occur in this dataset


@pytest.mark.parametrize("device", DEVICES)
def test_statistics_on_each_device(gpt2, model_on, text_file, device):
    """Accumulated on each device, written from the CPU in float32: the same checks, against a forward pass there."""
    import pyarrow as pa
    from circuit_catalog.ingest.stats import collect_stats, stats_tables

    model = model_on("gpt2", device)
    tset = random_transcoders(gpt2, d_sae=24, seed=11).to(device)
    tokens = token_contexts(model.tokenizer, str(text_file), N_TOKENS, CTX)
    tables = stats_tables(tset, collect_stats(model, tset, tokens, k=5, progress=False), tokens)
    assert {tables["features"].schema.field(c).type for c in ("mean_act", "max_act")} == {pa.float32()}
    assert {tables[t].schema.field("activation").type for t in ("top_examples", "quantile_examples")} == {pa.float32()}
    check_statistics(tables["features"].to_pylist(), tables["top_examples"].to_pylist(), *brute_force(model, tset, text_file, 1), layer=1)
    check_quantile_examples(tables["quantile_examples"].to_pylist(), *brute_force(model, tset, text_file, 2), layer=2)


def test_rerun_skips_and_other_settings_refused(stats_catalog, gpt2, text_file):
    root, tset = stats_catalog
    assert run_stats(gpt2, tset, root, str(text_file), N_TOKENS, ctx_len=CTX, top_k=5, progress=False) is False
    with pytest.raises(CatalogDirError, match="other settings"):
        run_stats(gpt2, tset, root, str(text_file), N_TOKENS * 2, ctx_len=CTX, top_k=5, progress=False)


def test_feature_stats_card_and_sql(stats_catalog):
    root, _ = stats_catalog
    card = feature_stats(root, "L2/4", k=3)
    assert 0 <= card.frequency <= 1 and len(card.examples) <= 3
    assert all("[" in e.text for e in card.examples)
    assert card.intervals and sum(len(i.examples) for i in card.intervals) == run_sql(
        root, "SELECT count(*) FROM quantile_examples WHERE feature = 'L2/4'")[1][0][0]
    assert [i.lower for i in card.intervals] == sorted((i.lower for i in card.intervals), reverse=True)
    assert all(i.lower < e.activation <= i.upper and e.tokens[e.firing] in e.text for i in card.intervals for e in i.examples)
    columns, rows = run_sql(root, "SELECT count(*) AS n FROM stats WHERE layer = 2")
    assert columns == ["n"] and rows == [(24,)]
    columns, rows = run_sql(root, "SELECT count(*) FROM dataset_tokens")
    assert rows[0][0] == torch.Size([38, CTX]).numel()
    with pytest.raises(SqlError, match="only SELECT runs here"):
        run_sql(root, "DELETE FROM stats")
    with pytest.raises(SqlError, match="only one SELECT"):
        run_sql(root, "SELECT 1; COPY stats TO '/tmp/x.csv'")
    with pytest.raises(SqlError):
        run_sql(root, "SELEC nonsense")


def test_cli_stats_and_sql(stats_catalog):
    root, _ = stats_catalog
    result = CliRunner().invoke(main, ["stats", "L0/2", "--catalog", str(root)])
    assert result.exit_code == 0, result.output
    assert "fires on" in result.output and "examples sampled from each activation interval" in result.output
    first = feature_stats(root, "L0/2", 1).examples[0]
    assert f"[{first.tokens[first.firing]}]" in result.output  # the firing token in brackets, not swallowed as markup
    result = CliRunner().invoke(main, ["sql", "SELECT id, frequency FROM stats ORDER BY frequency DESC LIMIT 2", "--catalog", str(root), "--format", "json"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["sql", "DROP VIEW stats", "--catalog", str(root)])
    assert result.exit_code == 1 and "error:" in result.output


def test_store_feature_nodes_carry_statistics(stats_catalog, tmp_path):
    from circuit_catalog.catalog.ladybug_store import LadybugStore

    root, _ = stats_catalog
    expected = {r["id"]: r for r in pq.read_table(layout.stats_file(root, "features")).to_pylist()}
    store = LadybugStore(tmp_path / "graph")
    store.load(root, progress=False)
    rows = store.run("MATCH (f:Feature) WHERE f.layer = 2 RETURN f.id AS id, f.frequency AS frequency, f.max_act AS max_act")
    assert len(rows) == 24
    for r in rows:
        assert r["frequency"] == pytest.approx(expected[r["id"]]["frequency"])
        assert r["max_act"] == pytest.approx(expected[r["id"]]["max_act"], rel=1e-6)
    store.close()
