"""Devices and dtypes: resolving `--device`/`--dtype`, a model and transcoders loaded there, and a bfloat16 ingest
whose catalog is float32 and close to the float32 one. The per-computation checks on each device live beside
each computation's own tests (parametrised over `conftest.DEVICES`)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from circuit_catalog.catalog import layout
from circuit_catalog.ingest.device import DTYPES, SCORE_DTYPES, resolve_device, resolve_dtype, score_dtype_for
from circuit_catalog.ingest.transcoder_formats import save_saelens
from click.testing import CliRunner

from circuit_catalog.cli import main
from circuit_catalog.errors import DeviceError
from tests.conftest import DEVICES, random_transcoders


def test_resolving_devices_and_dtypes():
    assert resolve_device(None) == resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(DeviceError, match=r"^cuda requested but torch.cuda.is_available\(\) is False"):
            resolve_device("cuda")
    with pytest.raises(DeviceError, match="cuda:99 requested"):
        resolve_device("cuda:99")
    for name in ("tpu", "gpu", "xla", ""):
        with pytest.raises(DeviceError, match="device"):
            resolve_device(name)
    assert [resolve_dtype(n) for n in (None, "float32", "bfloat16", "float16", torch.bfloat16)] == \
        [torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.bfloat16]
    with pytest.raises(DeviceError, match="float64"):
        resolve_dtype("float64")
    assert score_dtype_for("auto", torch.device("cpu")) == "float32"
    assert score_dtype_for("auto", torch.device("cuda")) == "bfloat16"
    assert score_dtype_for("bfloat16", torch.device("cpu")) == "bfloat16"


def test_the_cli_offers_the_device_modules_choices():
    """The CLI spells the choices out (importing torch to list them would slow every command's start)."""
    for command in ("train", "ingest", "eval", "active", "intervene"):
        params = {p.name: p for p in main.commands[command].params}
        assert list(params["dtype"].type.choices) == list(DTYPES), command
        assert params["device"].default == "auto", command
    assert tuple(next(p for p in main.commands["ingest"].params if p.name == "pullback_score_dtype").type.choices) == SCORE_DTYPES


@pytest.mark.parametrize("device", DEVICES)
def test_a_bfloat16_model_and_its_bound_transcoders(model_on, device):
    """Loaded in float32, cast to bfloat16 on the device: it predicts what the float32 model does, to bf16 precision;
    binding moves and casts the transcoders with it, and a feature's activation is the float32 one to that precision."""
    exact, model = model_on("gpt2"), model_on("gpt2", device, "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.cfg.dtype == torch.bfloat16
    assert {p.device.type for p in model.parameters()} == {device}
    tokens = exact.to_tokens("the capital of france is paris")
    with torch.no_grad():
        want, got = exact(tokens).log_softmax(-1), model(tokens.to(device)).float().log_softmax(-1).cpu()
    torch.testing.assert_close(got, want, rtol=0, atol=0.1 * float(want.abs().max()))
    tset, reference = random_transcoders(exact, d_sae=16), random_transcoders(exact, d_sae=16)
    tset.bind(model)
    assert {t.dtype for tc in tset for t in (tc.W_enc, tc.b_enc, tc.W_dec, tc.b_dec)} == {torch.bfloat16}
    assert tset[1].W_enc.device.type == device
    _, cache = exact.run_with_cache(tokens)
    x = cache["blocks.1.ln2.hook_normalized"][0]
    torch.testing.assert_close(tset[1].encode(x.to(device)).float().cpu(), reference[1].encode(x), rtol=0, atol=0.05)


def _columns(root) -> dict[str, dict]:
    """Every float column of every Parquet part in a catalog: {part: {column: arrow type}} (prompt ids, which hash
    the weights as computed and so differ between dtypes, left out of the part names)."""
    out = {}
    for path in sorted(root.rglob("*.parquet")):
        schema, part = pq.read_schema(path), path.relative_to(root).parts
        name = "/".join((part[0], "*", *part[2:]) if part[0] == layout.PROMPTS else part)
        out[name] = {f.name: f.type for f in schema if pa.types.is_floating(f.type)
                                            or pa.types.is_list(f.type) and pa.types.is_floating(f.type.value_type)}
    return out


def _weights(path, key) -> dict:
    return {tuple(r[k] for k in key): r["weight"] for r in pq.read_table(path).to_pylist()}


def _close_where_shared(got: dict, want: dict, share: float, atol: float) -> None:
    """Most keys are shared (top-k sets may differ at near-ties) and every shared value agrees within `atol`."""
    shared = set(got) & set(want)
    assert len(shared) >= share * len(want), (len(shared), len(want))
    worst = max(abs(got[k] - want[k]) for k in shared)
    assert worst <= atol, worst


def test_a_bfloat16_ingest_writes_the_float32_catalog_to_bf16_precision(gpt2, gpt2_dir, text_file, tmp_path):
    """`ingest --dtype bfloat16` and the same ingest in float32 (both with statistics and a prompt's graph): the same
    float32 columns, weights within bf16's error of each other; the bf16 graph validates against bf16 ablations; the
    manifest records the dtype, and a resume in the other dtype, or with other pullback scores, is refused in one line."""
    tc = tmp_path / "tc"
    for t in random_transcoders(gpt2, d_sae=24, seed=7):
        save_saelens(t, tc / f"layer_{t.layer}")
    (tmp_path / "p.txt").write_text("the capital of france is\n")

    def ingest(catalog, *extra):
        return CliRunner().invoke(main, ["ingest", "--model", str(gpt2_dir), "--transcoders", str(tc), "--catalog", str(catalog),
                                         "--top-k", "6", "--token-top-k", "8", "--dataset", str(text_file), "--tokens", "300",
                                         "--ctx-len", "16", "--prompts", str(tmp_path / "p.txt"), "--max-feature-nodes", "30",
                                         "--device", "cpu", *extra])

    full, half = tmp_path / "float32", tmp_path / "bfloat16"
    for catalog, dtype in ((full, "float32"), (half, "bfloat16")):
        result = ingest(catalog, "--dtype", dtype)
        assert result.exit_code == 0, result.output
        manifest = json.loads((catalog / layout.MANIFEST).read_text())
        assert (manifest["dtype"], manifest["pullback_score_dtype"], manifest["device"]) == (dtype, "float32", "cpu")
    columns = _columns(half)
    assert columns == _columns(full)
    assert all(t in (pa.float32(), pa.float64(), pa.list_(pa.float32())) for part in columns.values() for t in part.values())
    assert all(t == pa.float32() for part, cols in columns.items() for name, t in cols.items()
               if name in ("weight", "activation", "value", "max_act", "mean_act")), columns

    for lo, hi in ((0, 1), (0, 2), (1, 2)):
        want = _weights(layout.pullback_part(full, lo, hi), ("src", "dst"))
        _close_where_shared(_weights(layout.pullback_part(half, lo, hi), ("src", "dst")), want, 0.95, 0.005 * max(map(abs, want.values())))
    for layer in range(3):
        for part in (layout.deembed_part, layout.logit_part):
            want = _weights(part(full, layer), ("src", "dst"))
            _close_where_shared(_weights(part(half, layer), ("src", "dst")), want, 0.95, 0.01 * max(map(abs, want.values())))
    stats = [{r["id"]: r for r in pq.read_table(c / layout.STATS / "features.parquet").to_pylist()} for c in (full, half)]
    for fid, want in stats[0].items():
        assert abs(stats[1][fid]["fired"] - want["fired"]) <= max(2, 0.02 * want["fired"]), fid
        assert stats[1][fid]["max_act"] == pytest.approx(want["max_act"], rel=0.02, abs=0.01), fid
    prompts = [pq.read_table(c / layout.PROMPT_INDEX).to_pylist()[0] for c in (full, half)]
    assert prompts[1]["completeness_score"] == pytest.approx(prompts[0]["completeness_score"], abs=0.005)
    assert prompts[1]["replacement_score"] == pytest.approx(prompts[0]["replacement_score"], abs=0.005)

    validate = CliRunner().invoke(main, ["intervene", "--model", str(gpt2_dir), "--transcoders", str(tc), "--catalog", str(half),
                                         "--prompt", prompts[1]["id"], "--validate", "-k", "3", "--device", "cpu", "--dtype", "bfloat16",
                                         "--format", "json"])
    assert validate.exit_code == 0, validate.output
    assert json.loads(validate.output)["max_direct_error"] < 0.05  # the graph's prediction holds to bf16 precision

    for extra, changed in ((["--dtype", "float32"], "dtype"), (["--dtype", "bfloat16", "--pullback-score-dtype", "bfloat16"], "pullback_score_dtype")):
        result = ingest(half, *extra)
        assert result.exit_code == 1 and result.output.count("error:") == 1 and changed in result.output, result.output
