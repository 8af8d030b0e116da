"""Custom attribution targets: a logit difference, summed tokens, a residual direction; complete and stored."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from circuit_catalog.catalog import layout
from circuit_catalog.catalog.ids import TARGET, node_id
from circuit_catalog.ingest.attribution import attribute, prompt_tokens, target_token
from circuit_catalog.ingest.job import build_manifest, run_ingest
from circuit_catalog.ingest.settings import IngestSettings
from circuit_catalog.ingest.prompts import run_prompts
from circuit_catalog.ingest.settings import AttributionSettings, read_prompts
from circuit_catalog.ingest.pruning import logit_weights
from circuit_catalog.ingest.targets import custom_target

from circuit_catalog.errors import AttributionError
from tests.conftest import random_transcoders

PROMPT = "the capital of france is"


def assert_complete_row(graph, row: int) -> None:
    total = graph.adjacency[row].sum() + graph.bias[row] + graph.dropped[row]
    assert float(total) == pytest.approx(float(graph.value[row]), rel=1e-4, abs=1e-4)


def test_logit_difference_is_the_difference_of_the_two_logits_rows(tiny):
    tset = random_transcoders(tiny, d_sae=40, seed=3)
    paris, london = target_token(tiny, "paris"), target_token(tiny, "city")
    target = custom_target(tiny, ["paris"], ["city"])
    graph = attribute(tiny, tset, PROMPT, max_n_logits=1, custom=target)
    both = attribute(tiny, tset, PROMPT, max_n_logits=1, extra_targets=[paris, london])
    row = graph.n_nodes - 1
    assert graph.custom_target == "'paris' - 'city'" and graph.logit_targets.tolist() == both.logit_targets.tolist()[:1]
    with torch.no_grad():
        logits = tiny(prompt_tokens(tiny, PROMPT)[None])[0, -1]
    assert float(graph.value[row]) == pytest.approx(float(logits[paris] - logits[london]), abs=1e-4)
    assert_complete_row(graph, row)
    i_paris, i_london = both.logit_index(1), both.logit_index(2)
    sources = slice(0, graph.logit_index(0))  # the same features, errors and tokens in both graphs
    torch.testing.assert_close(graph.adjacency[row, sources], both.adjacency[i_paris, sources] - both.adjacency[i_london, sources],
                               rtol=1e-4, atol=1e-5)
    assert logit_weights(graph)[row] == 1.0  # pruning weighs it as a logit of probability 1


def test_direction_target_reads_the_final_normalised_residual(tiny, tmp_path):
    tset = random_transcoders(tiny, d_sae=40, seed=3)
    direction = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "d.npy", direction.numpy())
    graph = attribute(tiny, tset, PROMPT, custom=custom_target(tiny, direction=tmp_path / "d.npy", weight=0.3))
    _, cache = tiny.run_with_cache(prompt_tokens(tiny, PROMPT)[None])
    expected = cache["ln_final.hook_normalized"][0, -1] @ direction
    assert float(graph.value[-1]) == pytest.approx(float(expected), rel=1e-4, abs=1e-4)
    assert_complete_row(graph, graph.n_nodes - 1)
    assert graph.adjacency[-1, :graph.n_features].abs().sum() > 0
    assert float(logit_weights(graph)[-1]) == pytest.approx(0.3)
    np.save(tmp_path / "bad.npy", np.zeros(3))
    with pytest.raises(AttributionError, match="expected 32 finite numbers"):
        custom_target(tiny, direction=tmp_path / "bad.npy")
    with pytest.raises(AttributionError, match="needs a target token"):
        custom_target(tiny, contrast=["paris"])


def test_custom_targets_are_stored_as_target_nodes(gpt2, tmp_path):
    tset = random_transcoders(gpt2, d_sae=24, seed=3)
    root = tmp_path / "catalog"
    run_ingest(gpt2, tset, root, build_manifest(gpt2, "tiny", tset, "mem", IngestSettings(top_k=2, token_top_k=3)), progress=False)
    lines = tmp_path / "prompts.jsonl"
    lines.write_text("\n".join(json.dumps(row) for row in [
        {"prompt": PROMPT, "target": "paris", "contrast": "city"},
        {"prompt": PROMPT, "targets": ["paris", "france"], "target_weight": 0.5},
        {"prompt": PROMPT},
    ]) + "\n")
    specs = read_prompts(lines)
    assert specs[0].custom == {"tokens": ["paris"], "contrast": ["city"], "direction": None, "weight": 1.0}
    ids = run_prompts(gpt2, tset, root, specs, AttributionSettings(), progress=False)
    assert len(set(ids)) == 3  # the target is part of a prompt's identity
    for pid, name, weight in [(ids[0], "'paris' - 'city'", 1.0), (ids[1], "'paris' + 'france'", 0.5)]:
        info = json.loads(layout.prompt_info(root, pid).read_text())
        assert info["custom_target"]["name"] == name and info["custom_target"]["weight"] == weight
        nodes = pq.read_table(layout.prompt_part(root, pid, "nodes")).to_pylist()
        (target,) = [n for n in nodes if n["kind"] == "target"]
        assert target["id"] == node_id(pid, TARGET) and target["token"] == name and target["probability"] == weight
        edges = pq.read_table(layout.prompt_part(root, pid, "edges_full")).to_pylist()
        incoming = sum(e["weight"] for e in edges if e["dst"] == target["id"])
        assert incoming + target["bias"] + target["dropped"] == pytest.approx(target["value"], rel=1e-4, abs=1e-4)
        assert target["id"] not in pq.read_table(layout.prompt_part(root, pid, "links_token")).column("src").to_pylist()
    plain = pq.read_table(layout.prompt_part(root, ids[2], "nodes")).column("kind").to_pylist()
    assert "target" not in plain
    # --validate checks the custom target like a logit: ablations move it by minus the edges, exactly
    from circuit_catalog.queries.validation import validate

    v = validate(gpt2, tset, root, ids[0], k=6, n_paths=1)
    assert v.targets[-1] == "'paris' - 'city'" and v.max_direct_error < 1e-4
    assert max(abs(c.predicted[-1]) for c in v.checks) > 1e-2


def test_ingest_cli_custom_target_and_refusals(gpt2_dir, tmp_path):
    from circuit_catalog.ingest.models import load_model
    from circuit_catalog.ingest.transcoder_formats import save_saelens
    from click.testing import CliRunner

    from circuit_catalog.cli import main

    model = load_model(str(gpt2_dir))
    for tc in random_transcoders(model, d_sae=16, seed=2):
        save_saelens(tc, tmp_path / "tc" / f"layer_{tc.layer}")
    (tmp_path / "p.txt").write_text(PROMPT + "\n")
    np.save(tmp_path / "bad.npy", np.zeros(5))
    base = ["ingest", "--model", str(gpt2_dir), "--transcoders", str(tmp_path / "tc"), "--prompts", str(tmp_path / "p.txt"),
            "--top-k", "2", "--token-top-k", "2"]
    for args, message in [(["--direction", str(tmp_path / "bad.npy")], "expected 32 finite numbers"),
                          (["--target", "paris france"], "2 tokens"), (["--contrast", "city"], "needs a target token")]:
        result = CliRunner().invoke(main, [*base, "--catalog", str(tmp_path / "refused"), *args])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.output.strip().splitlines()[-1].startswith("error:") and message in result.output, result.output
        assert not (tmp_path / "refused").exists()  # refused before anything was written
    result = CliRunner().invoke(main, [*base, "--catalog", str(tmp_path / "c"), "--target", "paris", "--contrast", "city"])
    assert result.exit_code == 0, result.output
    (info,) = [json.loads(p.read_text()) for p in (tmp_path / "c").glob(layout.PROMPT_INFOS)]
    assert info["custom_target"] == {"name": "'paris' - 'city'", "tokens": ["paris"], "contrast": ["city"], "weight": 1.0}
    assert info["target"] == "'paris' - 'city'"
    # the store loads the target node, and the prompt's graph reads back with it
    result = CliRunner().invoke(main, ["cypher", "MATCH (n:PNode {kind: 'target'}) RETURN n.token AS token, n.value AS value",
                                       "--catalog", str(tmp_path / "c"), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [r["token"] for r in json.loads(result.stdout)] == ["'paris' - 'city'"]
