"""Interventions held to the model, to the attribution graph, to the logit lens and to circuit-tracer.

Every check runs real forward passes on the tiny models: an unedited run is the model's own forward
pass; under direct-only an ablation moves each target by exactly minus its edge (the graph's claim);
steering a last-layer feature with the final norm frozen moves the logits by its logit-lens row; and
circuit-tracer's `feature_intervention` (its venv, a subprocess) gives the same logits in each regime.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from circuit_catalog.catalog import layout
from circuit_catalog.ingest.attribution import attribute, prompt_tokens
from circuit_catalog.ingest.interventions import (
    Edit,
    Regime,
    clean_run,
    intervene,
    parse_edit,
    resolve,
    run_batch,
    run_edited,
)
from circuit_catalog.ingest.steering import generate
from circuit_catalog.ingest.token_edges import top_logit_tokens
from circuit_catalog.ingest.transcoder_formats import load_transcoders, save_circuit_tracer

from circuit_catalog.errors import InterventionError
from tests.conftest import DEVICES, arch_of, random_clt, random_transcoders, with_skip
from tests.test_circuit_tracer import ROOT

PROMPT = "the capital of france is"
RUNNER = ROOT / "bench" / "circuit_tracer" / "run_intervention.py"


@pytest.fixture(scope="module", params=["plain", "skip", "subset", "clt"])
def case(request, tiny):
    """Per-layer transcoders on every layer, with skip paths, on some layers only, and a cross-layer transcoder."""
    layers = [0, 2] if request.param == "subset" else None
    tset = random_clt(tiny, d_sae=40, seed=3) if request.param == "clt" else random_transcoders(tiny, d_sae=40, seed=3, layers=layers)
    if request.param == "skip":
        with_skip(tset)
    return tiny, tset, prompt_tokens(tiny, PROMPT)


def test_unedited_run_is_the_model(case):
    check_unedited_run(*case)


@torch.no_grad()
def check_unedited_run(model, tset, tokens):
    logits = model(tokens[None])[0]
    for regime in Regime:
        run = run_edited(model, tset, tokens, [], regime)
        torch.testing.assert_close(run.logits, logits, rtol=1e-5, atol=1e-5 * float(logits.abs().max()))
    # and the pre-activations the run reports are the transcoders' on the model's own MLP inputs
    clean = clean_run(model, tset, tokens)
    _, cache = model.run_with_cache(tokens[None])
    for tc in tset:
        torch.testing.assert_close(run.pre_acts[tc.layer], tc.pre_acts(cache[tc.cfg.hook_in][0]))
        assert not clean.z[tc.layer][0].any()  # position 0 carries no activations, as in the graphs


def test_direct_only_ablation_moves_each_target_by_minus_its_edge(case):
    check_direct_only_ablations(*case)


def check_direct_only_ablations(model, tset, tokens):
    graph = attribute(model, tset, PROMPT)
    clean = clean_run(model, tset, tokens)
    base = run_edited(model, tset, tokens, [], Regime.DIRECT_ONLY, clean)
    logit_rows = graph.adjacency[graph.logit_index(0):]
    strongest = logit_rows[:, :graph.n_features].abs().sum(0).argsort(descending=True)[:5].tolist()
    checked = 0
    for group in [[i] for i in strongest] + [strongest[:3]]:  # single features, then three together
        edits = [Edit("set", int(graph.features[i, 0]), int(graph.features[i, 2]), int(graph.features[i, 1]), 0.0) for i in group]
        run = run_edited(model, tset, tokens, edits, Regime.DIRECT_ONLY, clean)
        predicted = -logit_rows[:, group].sum(1)
        measured = run.logits[-1, graph.logit_targets] - base.logits[-1, graph.logit_targets]
        torch.testing.assert_close(measured, predicted, rtol=1e-4, atol=1e-5)
        for t, (layer, pos, index) in enumerate(graph.features.tolist()):  # feature targets too
            if t in group:
                continue
            change = run.pre_acts[layer][pos, index] - base.pre_acts[layer][pos, index]
            assert float(change) == pytest.approx(-float(graph.adjacency[t, group].sum()), abs=1e-5)
        checked += int((predicted.abs() > 1e-3).sum())
    assert checked > 10


@pytest.mark.parametrize("device", DEVICES)
def test_interventions_on_each_device(tiny, model_on, device):
    """On each device, with a cross-layer transcoder and skip paths: the unedited run is the model there, direct-only
    ablations move each target by minus its edge in the graph computed there, and an outcome's figures (and a sampled
    steered continuation, drawn on the CPU) are the float32 CPU run's."""
    model = model_on(arch_of(tiny), device)
    tset = with_skip(random_clt(tiny, d_sae=40, seed=3)).to(device)
    tokens = prompt_tokens(model, PROMPT)
    assert tokens.device.type == device
    check_unedited_run(model, tset, tokens)
    check_direct_only_ablations(model, tset, tokens)
    edits = [Edit("set", 1, 3, None, 0.0), Edit("add", 2, 5, -1, 3.0)]
    reference = with_skip(random_clt(tiny, d_sae=40, seed=3))
    here, there = (intervene(m, t, prompt_tokens(m, PROMPT), edits, Regime.FREEZE_ATTENTION) for m, t in ((model, tset), (tiny, reference)))
    assert [t.token_id for t in here.targets] == [t.token_id for t in there.targets]
    assert [t.change for t in here.targets] == pytest.approx([t.change for t in there.targets], rel=1e-4, abs=1e-5)
    assert here.kl == pytest.approx(there.kl, rel=1e-4, abs=1e-7)
    steered = (generate(m, t, prompt_tokens(m, PROMPT), edits, 4, temperature=1.0, seed=5) for m, t in ((model, tset), (tiny, reference)))
    assert next(steered) == next(steered)


def test_a_batch_of_interventions_equals_each_run_alone(case):
    """Validation batches its ablations: each row of a batched pass is that intervention's own pass, in every regime."""
    model, tset, tokens = case
    layer = tset.layers[-1]
    edit_sets = [[Edit("set", layer, 3, None, 0.0)], [Edit("add", tset.layers[0], 5, 2, 4.0), Edit("scale", layer, 7, None, 2.0)], []]
    clean = clean_run(model, tset, tokens)
    for regime in Regime:
        batch = run_batch(model, tset, tokens, edit_sets, regime, clean)
        for b, edits in enumerate(edit_sets):
            alone = run_edited(model, tset, tokens, edits, regime, clean)
            torch.testing.assert_close(batch.logits[b], alone.logits, rtol=1e-4, atol=1e-4 * float(alone.logits.abs().max()))
            torch.testing.assert_close(batch.final_normalised[b], alone.final_normalised, rtol=1e-4, atol=1e-4)
        assert float((batch.logits[1] - batch.logits[2]).abs().max()) > 1e-2  # the rows differ: the edits took


@torch.no_grad()
def test_steering_a_last_layer_feature_moves_logits_by_its_logit_lens_row(tiny):
    tset = random_transcoders(tiny, d_sae=40, seed=3)
    tokens = prompt_tokens(tiny, PROMPT)
    last = tiny.cfg.n_layers - 1
    tc, index, amount = tset[last], 7, 2.5
    lens = top_logit_tokens(tiny, tc.W_dec, k=tiny.cfg.d_vocab)  # the catalog's logit lens, every token
    row = torch.zeros(tiny.cfg.d_vocab).scatter(0, lens.token[index], lens.weight[index])
    _, cache = tiny.run_with_cache(tokens[None])
    scale = float(cache["ln_final.hook_scale"][0, -1, 0])
    before = tiny(tokens[None])[0, -1]
    after = run_edited(tiny, tset, tokens, [Edit("add", last, index, len(tokens) - 1, amount)], Regime.FREEZE_ATTENTION).logits[-1]
    torch.testing.assert_close(after - before, amount * row / scale, rtol=1e-4, atol=1e-5)
    assert float((after - before).abs().max()) > 0.1


def test_edit_specs_parse_and_resolve(tiny):
    tset = random_transcoders(tiny, d_sae=40, seed=3, layers=[0, 2])
    n_pos = len(prompt_tokens(tiny, PROMPT))
    assert parse_edit("set", "L2/5@4=0") == Edit("set", 2, 5, 4, 0.0)
    assert parse_edit("add", "L0/9@*=5") == Edit("add", 0, 9, None, 5.0)
    assert parse_edit("scale", "L2/3=2") == Edit("scale", 2, 3, None, 2.0)
    assert resolve([parse_edit("set", "L2/5@-1=0")], tset, n_pos)[0].pos == n_pos - 1
    for text, message in [("L1/2@x=y", "malformed position"), ("L1/2@3=y", "malformed value"), ("L1/2@3=nan", "not a finite"),
                          ("L1/2@3=inf", "not a finite"), ("X1/2=0", "malformed feature"), ("L1/2", "malformed intervention")]:
        with pytest.raises(InterventionError, match=message):
            parse_edit("set", text)
    for text, message in [("L1/2=0", "no transcoder at layer 1"), ("L2/40=0", "has 40 features"),
                          (f"L2/3@{n_pos}=0", "out of range"), (f"L2/3@-{n_pos + 1}=0", "out of range")]:
        with pytest.raises(InterventionError, match=message):
            resolve([parse_edit("set", text)], tset, n_pos)


# ------------------------------------------------------------ against circuit-tracer's feature_intervention

@pytest.fixture(scope="module")
def ct_case(request, tmp_path_factory):
    cache = {}

    def get(arch: str):
        if arch not in cache:
            model_dir, model = request.getfixturevalue(f"{arch}_dir"), request.getfixturevalue(arch)
            tc_dir = tmp_path_factory.mktemp(f"tc-{arch}") / "tc"
            save_circuit_tracer(random_transcoders(model, d_sae=40, seed=3), tc_dir)
            cache[arch] = model, model_dir, tc_dir, load_transcoders(tc_dir)
        return cache[arch]

    return get


def circuit_tracer_logits(python, model_dir, tc_dir, tokens, cases: list[tuple[list[Edit], dict]], out) -> list[torch.Tensor]:
    """One circuit-tracer process for every case: (edits, options of run_intervention.py's case)."""
    spec = [{"interventions": [[e.layer, e.pos, e.index, e.value] for e in edits], **options} for edits, options in cases]
    done = subprocess.run([str(python), str(RUNNER), "--model", str(model_dir), "--transcoders", str(tc_dir),
                           "--token-ids", ",".join(map(str, tokens.tolist())), "--cases", json.dumps(spec), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = np.load(out)
    return [torch.from_numpy(result[f"logits_{i}"]) for i in range(len(cases))]


# circuit-tracer's regime for each of ours (NOTES.md, "Interventions"): its direct effects are its own
# model's; the others run its feature_intervention on the local replacement model's MLPs
REGIMES = {
    Regime.REPLACEMENT: {"mlp": "replacement"},
    Regime.FREEZE_ATTENTION: {"mlp": "replacement", "freeze_attention": True, "freeze_norms": True},
    Regime.DIRECT_ONLY: {"constrained": True},
}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_agrees_with_circuit_tracers_feature_intervention(arch, ct_case, tmp_path, ct_python):
    python = ct_python
    model, model_dir, tc_dir, tset = ct_case(arch)
    tokens = prompt_tokens(model, PROMPT)
    clean = clean_run(model, tset, tokens)
    n_pos = len(tokens)
    active = clean.z[1][3].nonzero().flatten()  # an active layer-1 feature at position 3, to ablate
    edits = [Edit("set", 1, int(active[0]), 3, 0.0), Edit("set", 0, 7, None, 2.0), Edit("set", 2, 11, n_pos - 1, 3.0)]
    # on circuit-tracer's own, unmodified model: edits at the last layer have no MLP downstream, so its
    # real-MLP model and our replacement model must agree with nothing frozen
    last = [Edit("set", 2, 11, n_pos - 1, 3.0), Edit("set", 2, 4, None, 0.0)]
    cases = [(edits, options) for options in REGIMES.values()] + [(last, {"mlp": "real"})]
    theirs = circuit_tracer_logits(python, model_dir, tc_dir, tokens, cases, tmp_path / "ct.npz")
    ours = [run_edited(model, tset, tokens, edits, regime, clean).logits for regime in REGIMES]
    ours.append(run_edited(model, tset, tokens, last, Regime.REPLACEMENT, clean).logits)
    for name, mine, ref in zip([*REGIMES, "last layer, real MLPs"], ours, theirs):
        assert float((ref - clean.logits).abs().max()) > 0.5  # the edits did something
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=2e-5 * float(ref.abs().max()), msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------ the CLI: recorded, validated, steered, refused

@pytest.fixture(scope="module")
def cli_catalog(tmp_path_factory, gpt2, gpt2_dir):
    """(model dir, transcoder dir, catalog dir, prompt id): a tiny GPT-2 catalog with one prompt's graph."""
    from circuit_catalog.catalog.manifest import Manifest
    from circuit_catalog.ingest.job import build_manifest, run_ingest
    from circuit_catalog.ingest.settings import IngestSettings
    from circuit_catalog.ingest.prompts import run_prompts
    from circuit_catalog.ingest.settings import AttributionSettings, PromptSpec
    from circuit_catalog.ingest.transcoder_formats import save_saelens

    tc_dir = tmp_path_factory.mktemp("cli-tc")
    for tc in random_transcoders(gpt2, d_sae=40, seed=3):
        save_saelens(tc, tc_dir / f"layer_{tc.layer}")
    tset = load_transcoders(tc_dir)
    root = tmp_path_factory.mktemp("cli-catalog") / "catalog"
    run_ingest(gpt2, tset, root, build_manifest(gpt2, "tiny", tset, str(tc_dir), IngestSettings(top_k=2, token_top_k=3)), progress=False)
    (pid,) = run_prompts(gpt2, tset, root, [PromptSpec(PROMPT)], AttributionSettings(), progress=False)
    assert Manifest.read(root).status == "complete"
    return gpt2_dir, tc_dir, root, pid


def cli(*args):
    from click.testing import CliRunner

    from circuit_catalog.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output, result.stdout  # output: stderr too (progress bars, errors)


def catalog_files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_records_an_intervention_and_validates_a_graph(cli_catalog, gpt2):
    import pyarrow.parquet as pq

    model_dir, tc_dir, root, pid = cli_catalog
    base = ["intervene", "--model", model_dir, "--transcoders", tc_dir, "--catalog", root]
    code, output, stdout = cli(*base, "--prompt", pid, "--set", "L1/4@-1=0", "--add", "L2/7@*=3", "--target", "paris", "--format", "json")
    assert code == 0, output
    shown = json.loads(stdout)
    rows = pq.read_table(root / layout.INTERVENTIONS).to_pylist()
    assert [r["id"] for r in rows] == [shown["id"]] and rows[0]["prompt_id"] == pid
    assert rows[0]["features"] == ["L1/4", "L2/7"] and rows[0]["target_tokens"] == ["paris"]
    # the recorded change is the model's: the same edits run here, in-process
    tokens = prompt_tokens(gpt2, PROMPT)
    edits = resolve([parse_edit("set", "L1/4@-1=0"), parse_edit("add", "L2/7@*=3")], load_transcoders(tc_dir), len(tokens))
    after = run_edited(gpt2, load_transcoders(tc_dir), tokens, edits).logits[-1]
    paris = gpt2.tokenizer.convert_tokens_to_ids("paris")
    with torch.no_grad():
        before = gpt2(tokens[None])[0, -1]
    assert rows[0]["logit_change"][0] == pytest.approx(float(after[paris] - before[paris]), abs=1e-4)
    # a store built from the catalog answers `interventions FEATURE`
    code, output, stdout = cli("interventions", "L2/7", "--catalog", root, "--format", "json")
    assert code == 0, output
    assert [u["id"] for u in json.loads(stdout)] == [shown["id"]]

    code, output, stdout = cli(*base, "--prompt", pid, "--validate", "-k", "6", "--paths", "2", "--format", "json")
    assert code == 0, output
    v = json.loads(stdout)
    assert len(v["checks"]) >= 6 and v["max_direct_error"] < 1e-4
    assert any(abs(p) > 0.05 for c in v["checks"] for p in c["predicted"])  # real predictions, not zeros
    assert any(abs(p - f) > 1e-3 for c in v["checks"] for p, f in zip(c["predicted"], c["full"]))  # and the full model differs


def test_cli_steered_generation(cli_catalog, gpt2):
    model_dir, tc_dir, _, _ = cli_catalog
    code, output, stdout = cli("intervene", "--model", model_dir, "--transcoders", tc_dir, "--prompt", PROMPT, "--add", "L2/7@*=8",
                       "--generate", "4", "--format", "json")
    assert code == 0, output
    generation = json.loads(stdout)["generation"]
    tokens = prompt_tokens(gpt2, PROMPT)
    with torch.no_grad():  # TransformerLens' own greedy generation is the unedited continuation
        expected = gpt2.generate(tokens[None], max_new_tokens=4, do_sample=False, use_past_kv_cache=False, verbose=False, stop_at_eos=False)
    assert generation["original"] == gpt2.tokenizer.decode(expected[0, len(tokens):].tolist())
    assert generation["steered"] != generation["original"]


@pytest.mark.parametrize("args, message", [
    (["--set", "L1/99@2=0"], "has 40 features"),
    (["--set", "L7/1=0"], "no transcoder at layer 7"),
    (["--set", "L1/2@40=0"], "out of range"),
    (["--set", "L1/2@x=y"], "malformed position"),
    (["--scale", "L1/2@3=nan"], "not a finite"),
    (["--add", "L1/2@3"], "malformed intervention"),
    (["--direct-only", "--set", "L1/2=0", "--generate", "3"], "default regime only"),
    (["--validate", "--set", "L1/2=0"], "--validate needs"),
    (["--set", "L1/2=0", "--target", "paris france"], "2 tokens"),
])
def test_cli_bad_specs_are_one_line_and_write_nothing(cli_catalog, args, message):
    model_dir, tc_dir, root, pid = cli_catalog
    before = catalog_files(root)
    code, output, _ = cli("intervene", "--model", model_dir, "--transcoders", tc_dir, "--catalog", root, "--prompt", pid, *args)
    assert code == 1, output
    assert "Traceback" not in output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], output
    assert catalog_files(root) == before


def test_feature_card_and_prompt_report_show_interventions(stats_catalog, gpt2, tmp_path):
    import shutil

    from circuit_catalog.catalog.manifest import Manifest
    from circuit_catalog.catalog.store import open_loaded_store
    from circuit_catalog.ingest.intervention_log import add_intervention, intervention_row
    from circuit_catalog.ingest.prompts import run_prompts
    from circuit_catalog.ingest.settings import AttributionSettings, PromptSpec
    from circuit_catalog.queries.lookups import Lookups
    from circuit_catalog.queries.reports.feature import write_feature_cards
    from circuit_catalog.queries.reports.prompt import write_prompt_report

    from tests.test_reports import Page

    source, tset = stats_catalog
    root = tmp_path / "catalog"
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("graph*"))
    (pid,) = run_prompts(gpt2, tset, root, [PromptSpec(PROMPT)], AttributionSettings(), progress=False)
    tokens = prompt_tokens(gpt2, PROMPT)
    edits = [parse_edit("set", "L1/3@-1=0"), parse_edit("add", "L2/4=2")]
    result = intervene(gpt2, tset, tokens, edits, Regime.FREEZE_ATTENTION, k=3)
    row = intervention_row(Manifest.read(root), tokens.tolist(), pid, edits, result)
    add_intervention(root, row)
    with Lookups(open_loaded_store(root, progress=False)) as lookups:
        (card,) = write_feature_cards(lookups, root, ["L1/3"], tmp_path / "out", k=5)
        (blind,) = write_feature_cards(lookups, root, ["L1/3"], tmp_path / "out", k=5, blind=True)
        report = write_prompt_report(lookups, root, pid, tmp_path / "out" / "p.html")
    (rows,) = Page(card.read_text()).rows("interventions")
    assert [r[:5] for r in rows] == [[row["id"], pid, "freeze-attention", "set L1/3@5=0", f"{row['kl']:.4f}"]]
    biggest = max(zip(row["target_tokens"], row["logit_change"]), key=lambda tc: abs(tc[1]))
    assert f"{biggest[1]:+.3f}" in rows[0][5]
    assert not Page(blind.read_text()).rows("interventions")  # its prompt would unblind the card
    (rows,) = Page(report.read_text()).rows("interventions")
    assert [r[3] for r in rows] == [row["spec"]]
