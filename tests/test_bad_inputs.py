"""Bad input, every command: one `error:` line, a non-zero exit (2 for usage errors), no traceback,
and the catalog and its store exactly as they were (every file hashed before and after).

The table holds the audit's classes: files of the wrong type, encoding or shape, truncated files,
out-of-range numbers, ids that are almost right, output paths that cannot be written, hostile or
oversized queries. `TOTALS` is printed at the end for the issue's closing note.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from circuit_catalog.catalog import layout
from circuit_catalog.ingest.transcoder_formats import save_saelens
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from circuit_catalog.cli import main
from tests.conftest import random_transcoders
from tests.test_security import digest

TOTALS: Counter[str] = Counter()


@pytest.fixture(scope="module")
def env(tmp_path_factory, gpt2, gpt2_dir, text_file) -> dict[str, str]:
    """Every path a case names: a loaded catalog with statistics and a prompt, and damaged inputs of each kind."""
    d = tmp_path_factory.mktemp("bad-inputs")
    tc = d / "tc"
    for t in random_transcoders(gpt2, d_sae=8, seed=2):
        save_saelens(t, tc / f"layer_{t.layer}")

    def transcoders(name: str, damage) -> Path:
        target = d / name
        shutil.copytree(tc, target)
        damage(target / "layer_1")
        return target

    def tensors(fn):
        def damage(layer_dir: Path) -> None:
            w = load_file(layer_dir / "sae_weights.safetensors")
            fn(w)
            save_file(w, layer_dir / "sae_weights.safetensors")
        return damage

    def model(name: str, damage) -> Path:
        target = d / name
        shutil.copytree(gpt2_dir, target)
        damage(target)
        return target

    binary = d / "binary.jsonl"
    binary.write_bytes(bytes(range(256)) * 8)
    (d / "file.txt").write_text("just a file\n")
    (d / "a_dir").mkdir()
    (d / "long.txt").write_text(" ".join(["the"] * 100) + "\n")
    (d / "null.jsonl").write_text('{"prompt": null}\n')
    (d / "target.jsonl").write_text('{"prompt": "the capital of", "target": "france is"}\n')
    (d / "prompts.txt").write_text("the capital of france is\n")
    catalog = d / "catalog"
    result = CliRunner().invoke(main, ["ingest", "--model", str(gpt2_dir), "--transcoders", str(tc), "--catalog", str(catalog),
                                       "--top-k", "2", "--dataset", str(text_file), "--tokens", "200", "--ctx-len", "16",
                                       "--prompts", str(d / "prompts.txt"), "--max-feature-nodes", "20"])
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(main, ["load", "--catalog", str(catalog)]).exit_code == 0
    return {
        "cat": str(catalog), "model": str(gpt2_dir), "tc": str(tc), "txt": str(text_file), "tmp": str(d), "new": str(d / "new-catalog"),
        "pid": next(p.name for p in (catalog / layout.PROMPTS).iterdir()),
        "bin": str(binary), "file": str(d / "file.txt"), "dir": str(d / "a_dir"),
        "tc_list_cfg": str(transcoders("tc-list-cfg", lambda p: (p / "cfg.json").write_text("[1, 2, 3]"))),
        "tc_binary_cfg": str(transcoders("tc-binary-cfg", lambda p: (p / "cfg.json").write_bytes(b"\xff\xfe{\x00"))),
        "tc_1d": str(transcoders("tc-1d", tensors(lambda w: w.update(W_enc=torch.randn(32))))),
        "tc_nan": str(transcoders("tc-nan", tensors(lambda w: w["W_dec"].__setitem__((0, 0), float("nan"))))),
        "tc_truncated": str(transcoders("tc-truncated", lambda p: (p / "sae_weights.safetensors").write_bytes(
            (p / "sae_weights.safetensors").read_bytes()[:300]))),
        "model_list_cfg": str(model("model-list-cfg", lambda p: (p / "config.json").write_text("[]"))),
        "model_utf16_cfg": str(model("model-utf16-cfg", lambda p: (p / "config.json").write_bytes(
            (p / "config.json").read_text().encode("utf-16")))),
        "model_truncated": str(model("model-truncated", lambda p: (p / "model.safetensors").write_bytes(
            (p / "model.safetensors").read_bytes()[:1000]))),
        "model_no_layers": str(model("model-no-layers", lambda p: (p / "config.json").write_text(json.dumps(
            {k: v for k, v in json.loads((p / "config.json").read_text()).items() if k != "n_layer"})))),
    }


ING = ["ingest", "--model", "{model}", "--transcoders", "{tc}", "--catalog", "{new}"]
ACT = ["active", "--model", "{model}", "--transcoders", "{tc}", "--prompt", "the capital of france is"]
EVAL = ["eval", "--model", "{model}", "--transcoders", "{tc}", "--dataset", "{txt}", "--tokens", "16"]
CAT = ["--catalog", "{cat}"]
INT = ["intervene", "--model", "{model}", "--transcoders", "{tc}", *CAT, "--prompt", "{pid}"]

CASES = [  # (id, arguments, exit code, a fragment of the error line)
    # ---- models
    ("unknown model", ["ingest", "--model", "no-such-model", "--transcoders", "{tc}", "--catalog", "{new}"], 1, "offline options"),
    ("model is a plain file", ["ingest", "--model", "{file}", "--transcoders", "{tc}", "--catalog", "{new}"], 1, "neither"),
    ("model config a JSON list", ["ingest", "--model", "{model_list_cfg}", "--transcoders", "{tc}", "--catalog", "{new}"], 1, "JSON object"),
    ("model config UTF-16", ["ingest", "--model", "{model_utf16_cfg}", "--transcoders", "{tc}", "--catalog", "{new}"], 1, "config.json"),
    ("model weights truncated", ["ingest", "--model", "{model_truncated}", "--transcoders", "{tc}", "--catalog", "{new}"], 1, "cannot read"),
    ("model config without n_layer", ["ingest", "--model", "{model_no_layers}", "--transcoders", "{tc}", "--catalog", "{new}"], 1, "does not match"),
    ("active: model config a list", ["active", "--model", "{model_list_cfg}", "--transcoders", "{tc}", "--prompt", "the"], 1, "JSON object"),
    ("eval: unknown model", ["eval", "--model", "nope", "--transcoders", "{tc}"], 1, "offline options"),
    ("train: unknown model", ["train", "--model", "nope", "--out", "{new}"], 1, "offline options"),
    # ---- devices and dtypes (--device cuda itself where there is no CUDA device: the cases after the table)
    ("device absent", [*ING, "--device", "cuda:99"], 1, "cuda:99 requested"),
    ("device unknown", [*ACT, "--device", "tpu"], 1, "unknown device 'tpu'"),
    ("eval: device of another kind", [*EVAL, "--device", "xla"], 1, "unsupported device"),
    ("dtype unknown", [*ING, "--dtype", "float64"], 2, "--dtype"),
    ("pullback score dtype unknown", [*ING, "--pullback-score-dtype", "float16"], 2, "--pullback-score-dtype"),
    ("train: dtype unknown", ["train", "--model", "{model}", "--out", "{new}", "--dtype", "int8"], 2, "--dtype"),
    ("intervene: device unknown", [*INT, "--set", "L1/2=0", "--device", "gpu"], 1, "unknown device 'gpu'"),
    # ---- transcoders
    ("transcoders missing", ["ingest", "--model", "{model}", "--transcoders", "{tmp}/nope", "--catalog", "{new}"], 1, "nope"),
    ("transcoders a plain file", ["ingest", "--model", "{model}", "--transcoders", "{file}", "--catalog", "{new}"], 1, "file.txt"),
    ("transcoder cfg a JSON list", ["ingest", "--model", "{model}", "--transcoders", "{tc_list_cfg}", "--catalog", "{new}"], 1, "cfg.json"),
    ("transcoder cfg binary", ["ingest", "--model", "{model}", "--transcoders", "{tc_binary_cfg}", "--catalog", "{new}"], 1, "cfg.json"),
    ("transcoder W_enc 1-D", ["ingest", "--model", "{model}", "--transcoders", "{tc_1d}", "--catalog", "{new}"], 1, "W_enc"),
    ("transcoder weights NaN", ["ingest", "--model", "{model}", "--transcoders", "{tc_nan}", "--catalog", "{new}"], 1, "NaN"),
    ("transcoder weights truncated", ["ingest", "--model", "{model}", "--transcoders", "{tc_truncated}", "--catalog", "{new}"], 1, "safetensors"),
    ("active: transcoders 1-D", ["active", "--model", "{model}", "--transcoders", "{tc_1d}", "--prompt", "the"], 1, "W_enc"),
    ("eval: transcoders truncated", ["eval", "--model", "{model}", "--transcoders", "{tc_truncated}"], 1, "safetensors"),
    # ---- ingest options
    ("catalog path is a file", ["ingest", "--model", "{model}", "--transcoders", "{tc}", "--catalog", "{file}"], 1, "is a file"),
    ("layers reversed", [*ING, "--layers", "5-2"], 2, "--layers"),
    ("layers not numbers", [*ING, "--layers", "a-b"], 2, "--layers"),
    ("layers absent from the transcoders", [*ING, "--layers", "7"], 1, "7"),
    ("min weight NaN", [*ING, "--min-weight", "nan"], 2, "finite"),
    ("min weight negative", [*ING, "--min-weight", "-1"], 2, "--min-weight"),
    ("top k zero", [*ING, "--top-k", "0"], 2, "--top-k"),
    ("ingest has no -k (rows shown, elsewhere)", [*ING, "-k", "3"], 2, "-k"),
    ("tokens zero", [*ING, "--tokens", "0"], 2, "--tokens"),
    ("node threshold NaN", [*ING, "--node-threshold", "nan"], 2, "finite"),
    ("head edges zero", [*ING, "--head-edges", "0"], 2, "positive integer"),
    ("head edges not a count", [*ING, "--head-edges", "most"], 2, "'all'"),
    ("prompts binary", [*ING, "--prompts", "{bin}"], 1, "binary.jsonl"),
    ("prompts missing", [*ING, "--prompts", "{tmp}/nope.txt"], 1, "not found"),
    ("prompt null", [*ING, "--prompts", "{tmp}/null.jsonl"], 1, "string 'prompt'"),
    ("prompt over-long", [*ING, "--prompts", "{tmp}/long.txt"], 1, "context is 64"),
    ("prompt target of two tokens", [*ING, "--prompts", "{tmp}/target.jsonl"], 1, "single token"),
    ("dataset binary", [*ING, "--dataset", "{bin}", "--ctx-len", "16"], 1, "binary.jsonl"),
    ("dataset missing", [*ING, "--dataset", "{tmp}/nope.txt", "--ctx-len", "16"], 1, "not found"),
    ("ctx-len beyond the model", [*ING, "--dataset", "{txt}", "--ctx-len", "1000"], 1, "context"),
    ("rerun with other settings", ["ingest", "--model", "{model}", "--transcoders", "{tc}", *CAT, "--top-k", "5"], 1, "other top_k"),
    ("rerun with other statistics", ["ingest", "--model", "{model}", "--transcoders", "{tc}", *CAT, "--top-k", "2", "--dataset", "{txt}",
                                     "--tokens", "400", "--ctx-len", "16"], 1, "other settings"),
    # ---- active, eval, train
    ("active position out of range", [*ACT, "--pos", "999"], 1, "999"),
    ("active empty prompt", ["active", "--model", "{model}", "--transcoders", "{tc}", "--prompt", " "], 1, "empty"),
    ("active layer absent", [*ACT, "--layers", "9"], 1, "9"),
    ("eval ctx-len beyond the model", [*EVAL, "--ctx-len", "1000"], 1, "context"),
    ("eval dataset missing", ["eval", "--model", "{model}", "--transcoders", "{tc}", "--dataset", "{tmp}/nope.txt", "--ctx-len", "16"], 1, "not found"),
    ("eval out into a directory", [*EVAL, "--ctx-len", "16", "--out", "{dir}"], 1, "a_dir"),
    ("train d-sae zero", ["train", "--model", "{model}", "--out", "{new}", "--d-sae", "0"], 2, "--d-sae"),
    ("train lr NaN", ["train", "--model", "{model}", "--out", "{new}", "--lr", "nan"], 2, "finite"),
    ("train out is a file", ["train", "--model", "{model}", "--dataset", "{txt}", "--out", "{file}", "--tokens", "2000", "--d-sae", "8"], 1, "file.txt"),
    ("train k beyond d-sae", ["train", "--model", "{model}", "--dataset", "{txt}", "--out", "{new}", "--tokens", "2000", "--d-sae", "8", "--k", "16"], 1, "k = 16"),
    ("train ctx-len beyond the model", ["train", "--model", "{model}", "--dataset", "{txt}", "--out", "{new}", "--ctx-len", "1000"], 1, "context"),
    # ---- catalog readers
    ("catalog missing", ["show", "L1/2", "--catalog", "{tmp}/nope"], 1, "not a catalog"),
    ("catalog is a file", ["show", "L1/2", "--catalog", "{file}"], 1, "is a file"),
    ("load: catalog missing", ["load", "--catalog", "{tmp}/nope"], 1, "not a catalog"),
    ("load: catalog is a file", ["load", "--catalog", "{file}"], 1, "is a file"),
    ("feature unknown", ["show", "L1/7000", *CAT], 1, "unknown feature"),
    ("feature id with a newline", ["show", "L1/2\n", *CAT], 1, "malformed"),
    ("feature index of 5,000 digits", ["show", "L1/" + "9" * 5000, *CAT], 1, "malformed"),
    ("feature id malformed", ["tokens", "feature-2", *CAT], 1, "malformed"),
    ("tokens k zero", ["tokens", "L1/2", *CAT, "-k", "0"], 2, "-k"),
    ("upstream unknown feature", ["upstream", "L2/99", *CAT], 1, "unknown feature"),
    ("upstream layer beyond 64 bits", ["upstream", "L2/1", *CAT, "--layer", "99999999999999999999"], 2, "--layer"),
    ("downstream sign unknown", ["downstream", "L0/1", *CAT, "--sign", "x"], 2, "--sign"),
    ("downstream feature id empty", ["downstream", "", *CAT], 1, "malformed"),
    ("downstream --normalise given a value", ["downstream", "L0/1", *CAT, "--normalise=yes"], 2, "--normalise"),
    ("upstream --normalise of an unknown feature", ["upstream", "L2/99", *CAT, "--normalise"], 1, "unknown feature"),
    ("show --normalise given a value", ["show", "L1/2", *CAT, "--normalise=no"], 2, "--normalise"),
    ("search k zero", ["search", "paris", *CAT, "-k", "0"], 2, "-k"),
    ("prompts: catalog missing", ["prompts", "--catalog", "{tmp}/nope"], 1, "not a catalog"),
    ("recurring k negative", ["recurring", *CAT, "-k", "-1"], 2, "-k"),
    ("k zero", ["show", "L1/2", *CAT, "-k", "0"], 2, "-k"),
    ("format unknown", ["show", "L1/2", *CAT, "--format", "xml"], 2, "--format"),
    ("store unknown", ["show", "L1/2", *CAT, "--store", "http://localhost"], 1, "unknown store"),
    ("paths without a start", ["paths", *CAT, "--to-logit", "paris"], 2, "--from-token"),
    ("paths: unknown prompt", ["paths", *CAT, "--prompt", "nope", "--to-logit", "paris"], 1, "unknown prompt"),
    ("paths: logit not in the graph", ["paths", *CAT, "--prompt", "{pid}", "--to-logit", "zzz"], 1, "zzz"),
    ("prompts-using unknown feature", ["prompts-using", "L2/99", *CAT], 1, "unknown feature"),
    ("graph: unknown prompt", ["graph", *CAT, "--prompt", "nope"], 1, "unknown prompt"),
    ("diff: one prompt", ["diff", *CAT, "--prompt", "{pid}"], 2, "exactly twice"),
    ("diff: unknown prompt", ["diff", *CAT, "--prompt", "{pid}", "--prompt", "nope"], 1, "unknown prompt"),
    ("diff: target not a logit", ["diff", *CAT, "--prompt", "{pid}", "--prompt", "{pid}", "--target", "zzz"], 1, "zzz"),
    ("diff: k zero", ["diff", *CAT, "--prompt", "{pid}", "--prompt", "{pid}", "-k", "0"], 2, "-k"),
    ("sql: unknown prompt view column", ["sql", "SELECT nope FROM prompt_edges", *CAT], 1, "nope"),
    ("export: unknown prompt", ["export", *CAT, "--prompt", "nope", "--neuronpedia", "{tmp}/out/g.json"], 1, "nope"),
    ("export into a directory", ["export", *CAT, "--prompt", "{pid}", "--neuronpedia", "{dir}"], 1, "a_dir"),
    ("export under a file", ["export", *CAT, "--prompt", "{pid}", "--neuronpedia", "{file}/g.json"], 1, "file.txt"),
    ("export unwritable", ["export", *CAT, "--prompt", "{pid}", "--neuronpedia", "/proc/g.json"], 1, "/proc"),
    ("stats unknown feature", ["stats", "L1/99", *CAT], 1, "unknown feature"),
    ("stats malformed feature", ["stats", "L1/2 ", *CAT], 1, "malformed"),
    ("heads: catalog without heads", ["heads", "L1/2", *CAT], 1, "--heads-top-k"),
    ("heads: head malformed", ["heads", "L1/2", *CAT, "--head", "7.3"], 1, "malformed head"),
    ("heads: unknown feature", ["heads", "L1/99", *CAT], 1, "unknown feature"),
    ("qk: unknown head", ["qk", "--model", "{model}", "--transcoders", "{tc}", *CAT, "--prompt", "{pid}", "--head", "L9H0",
                          "--query-pos", "2", "--key-pos", "1"], 1, "unknown head"),
    ("qk: key after the query", ["qk", "--model", "{model}", "--transcoders", "{tc}", *CAT, "--prompt", "{pid}", "--head", "L1H0",
                                 "--query-pos", "1", "--key-pos", "3"], 1, "causal"),
    ("qk: unknown prompt", ["qk", "--model", "{model}", "--transcoders", "{tc}", *CAT, "--prompt", "nope", "--head", "L1H0",
                            "--query-pos", "1", "--key-pos", "0"], 1, "nope"),
    ("components: unknown feature", ["components", "L1/99", *CAT], 1, "unknown feature"),
    ("components: malformed feature", ["components", "L1/", *CAT], 1, "malformed"),
    ("supernodes: unknown prompt", ["supernodes", *CAT, "--prompt", "nope"], 1, "unknown prompt"),
    ("supernodes: feature and prompt", ["supernodes", "L1/2", *CAT, "--prompt", "{pid}"], 2, "not both"),
    ("supernodes: unknown feature", ["supernodes", "L1/99", *CAT], 1, "unknown feature"),
    ("cooccur: unknown feature", ["cooccur", "L2/99", *CAT], 1, "unknown feature"),
    ("cooccur k zero", ["cooccur", "L1/2", *CAT, "-k", "0"], 2, "-k"),
    ("recurring-paths: three hops", ["recurring-paths", *CAT, "--hops", "3"], 2, "--hops"),
    ("serve: idle zero", ["serve", "--model", "{model}", "--transcoders", "{tc}", "--idle-minutes", "0"], 2, "--idle-minutes"),
    ("serve: transcoders missing", ["serve", "--model", "{model}", "--transcoders", "{tmp}/nope"], 1, "nope"),
    ("tokens --token without the weights", ["tokens", "L1/2", *CAT, "--token", "the"], 2, "--model"),
    ("tokens --token of two tokens", ["tokens", "L1/2", *CAT, "--token", "the city", "--model", "{model}", "--transcoders", "{tc}"], 1, "tokens"),
    # ---- queries
    ("cypher syntax", ["cypher", "MATCH (n RETURN n", *CAT], 1, ""),
    ("cypher write without --write", ["cypher", "CREATE (:Feature {{id: 'x'}})", *CAT], 1, "read-only"),
    ("cypher reads a file", ["cypher", "LOAD FROM '/etc/passwd' (file_format='csv') RETURN *", *CAT], 1, "read-only"),
    ("cypher checkpoint", ["cypher", "CHECKPOINT", *CAT], 1, "read-only"),
    ("cypher nested deeply", ["cypher", "RETURN " + "[" * 500 + "]" * 500, *CAT], 1, "nested"),
    ("cypher nested deeply, --write", ["cypher", "RETURN " + "(" * 500 + "1" + ")" * 500, *CAT, "--write"], 1, "nested"),
    ("cypher huge", ["cypher", "RETURN " + " + ".join(["1"] * 40_000), *CAT], 1, "characters"),
    ("cypher long operator chain", ["cypher", "RETURN " + "+".join(["1"] * 3_000), *CAT], 1, "tokens"),
    ("cypher param malformed", ["cypher", "RETURN $x", *CAT, "--param", "x"], 2, "name=value"),
    ("cypher unreachable server", ["cypher", "RETURN 1", *CAT, "--store", "bolt://127.0.0.1:9"], 1, "127.0.0.1:9"),
    ("sql drop", ["sql", "DROP TABLE features", *CAT], 1, "only SELECT"),
    ("sql copy via explain", ["sql", "EXPLAIN ANALYZE COPY features TO '{tmp}/f.csv'", *CAT], 1, "COPY"),
    ("sql reads a file", ["sql", "SELECT * FROM read_text('/etc/passwd')", *CAT], 1, "/etc/passwd"),
    ("sql syntax", ["sql", "SELEC 1", *CAT], 1, "syntax"),
    ("sql empty", ["sql", " ", *CAT], 1, "one SELECT"),
    ("sql nested deeply", ["sql", "SELECT " + "(" * 3000 + "1" + ")" * 3000, *CAT], 1, ""),
    ("sql huge", ["sql", "SELECT " + " + ".join(["1"] * 40_000), *CAT], 1, "characters"),
    # ---- reports and exports
    ("report feature unknown", ["report", "feature", "L2/99", *CAT, "--out", "{tmp}/cards"], 1, "unknown feature"),
    ("report feature out is a file", ["report", "feature", "L1/2", *CAT, "--out", "{file}"], 1, "file.txt"),
    ("report prompt unknown", ["report", "prompt", "nope", *CAT, "--out", "{tmp}/p.html"], 1, "unknown prompt"),
    ("report prompt into a directory", ["report", "prompt", "{pid}", *CAT, "--out", "{dir}"], 1, "a_dir"),
    ("report prompt unwritable", ["report", "prompt", "{pid}", *CAT, "--out", "/proc/p.html"], 1, "/proc"),
    ("report overview eval binary", ["report", "overview", *CAT, "--eval", "{bin}", "--out", "{tmp}/o.html"], 1, "binary.jsonl"),
    ("report overview into a directory", ["report", "overview", *CAT, "--out", "{dir}"], 1, "a_dir"),
    ("neo4j import out is a file", ["export-neo4j-import", *CAT, "--out", "{file}"], 1, "file.txt"),
    ("neo4j import catalog missing", ["export-neo4j-import", "--catalog", "{tmp}/nope", "--out", "{tmp}/imp"], 1, "not a catalog"),
    # ---- interventions (recorded in the catalog when they succeed: refused ones write nothing)
    ("intervene unknown feature", [*INT, "--set", "L1/99=0"], 1, "has 8 features"),
    ("intervene layer without transcoder", [*INT, "--set", "L7/1=0"], 1, "no transcoder at layer 7"),
    ("intervene position out of range", [*INT, "--set", "L1/2@40=0"], 1, "out of range"),
    ("intervene malformed spec", [*INT, "--set", "L1/2@x=y"], 1, "malformed position"),
    ("intervene NaN value", [*INT, "--add", "L1/2=nan"], 1, "not a finite"),
    ("intervene multi-token target", [*INT, "--set", "L1/2=0", "--target", "paris france"], 1, "2 tokens"),
    ("intervene nothing to do", [*INT], 1, "nothing to do"),
    ("intervene validate unknown prompt", [*INT[:-1], "nope", "--validate"], 1, "unknown prompt"),
    ("interventions unknown feature", ["interventions", "L2/99", *CAT], 1, "unknown feature"),
    # ---- usage
    ("unknown command", ["frobnicate"], 2, "frobnicate"),
    ("missing argument", ["show", *CAT], 2, "FEATURE"),
    ("missing option", ["show", "L1/2"], 2, "--catalog"),
    ("unknown option", ["sql", "SELECT 1", *CAT, "--colour"], 2, "--colour"),
]


if not torch.cuda.is_available():  # the case: on a machine without CUDA, asking for it is one line
    CASES += [(f"{command}: --device cuda without CUDA", [*args, "--device", "cuda"], 1, "cuda requested but torch.cuda.is_available() is False")
              for command, args in (("ingest", ING), ("active", ACT), ("eval", EVAL), ("intervene", [*INT, "--set", "L1/2=0"]),
                                    ("train", ["train", "--model", "{model}", "--out", "{new}"]))]


@pytest.mark.parametrize("name, args, code, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(env, name, args, code, fragment):
    catalog = Path(env["cat"])
    before = digest(catalog)
    result = CliRunner().invoke(main, [a.format(**env) for a in args])
    traceback = result.exception is not None and not isinstance(result.exception, SystemExit)
    TOTALS["traceback" if traceback else "usage error" if result.exit_code == 2 else "one-line error" if result.exit_code else "exit 0"] += 1
    assert not traceback, f"{type(result.exception).__name__}: {result.exception}"
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert result.exit_code == code, result.output[-500:]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output[-500:]
    assert fragment in errors[0], errors[0]
    assert digest(catalog) == before, "the catalog or its store changed"
    created = Path(env["new"]).exists()
    shutil.rmtree(env["new"], ignore_errors=True)  # so one failure does not fail every later case
    assert not created, "a refused command created the catalog or output it was refused"


def test_the_table_is_large_and_covers_every_command():
    assert len(CASES) >= 60
    commands = {c[1][0] for c in CASES} | {f"report {c[1][1]}" for c in CASES if c[1][0] == "report"}
    every = set(main.commands) - {"report"} | {f"report {n}" for n in main.commands["report"].commands}
    assert every <= commands, every - commands
    print(f"\nbad inputs: {len(CASES)} cases; {dict(TOTALS)}")


@pytest.mark.parametrize("args", [[], ["report"]])
def test_a_bare_command_still_shows_its_help(args):
    """Usage errors are one line, but asking for nothing is asking for the help, which stays whole."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and result.output.startswith("Usage:") and "Commands:" in result.output
