"""No tensor on a hard-coded device in ingest/ and queries/ (an AST walk, so it holds for code not yet run on a GPU).

A torch factory (`torch.zeros`, `ones`, `empty`, `full`, `arange`, `eye`, `rand*`, `linspace`, `tensor`,
`from_numpy`) must say where its tensor goes with `device=`, normally the device of the data it combines
with; `*_like` and `x.new_*` inherit it and are fine. `"cpu"` and `"cuda"` are named only by
`ingest/device.py`, and `.cuda()` never. The exceptions below are deliberate, each with its reason; an entry
that no longer matches anything fails too, so the list stays true.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FACTORIES = {"zeros", "ones", "empty", "full", "arange", "eye", "rand", "randn", "randint", "randperm", "linspace",
             "logspace", "tensor", "as_tensor", "from_numpy"}
DEVICE_MODULE = "ingest/device.py"

# (file, innermost enclosing function, what) -> why it is allowed
ALLOWED = {
    ("ingest/datasets.py", "token_contexts", "torch.tensor"):
        "the dataset's tokens are built in host memory (all of them); each computation moves its batches to the model",
    ("ingest/datasets.py", "token_contexts", "torch.full"):
        "the BOS column of those host-memory tokens",
    ("ingest/train.py", "_activation_buffer", "torch.empty"):
        "the training buffer may exceed a GPU's memory, so it stays in host memory; minibatches are moved",
    ("ingest/mapped_weights.py", "read_mapped", "torch.from_numpy"):
        "a view of a file's mapped pages, host memory by nature; TranscoderSet.to/bind copy it to another device",
    ("ingest/release_formats.py", "_read_npz", "torch.from_numpy"):
        "loading a file: host memory first, then TranscoderSet.bind moves the set to the model's device",
    ("ingest/transcoder_formats.py", "_load_original_gpt2", "'cpu'"):
        "torch.load's map_location: a pickle saved on a GPU loads into host memory, then bind moves it",
    ("ingest/transcoder_formats.py", "save_saelens", "'cpu'"):
        "SAELens's cfg.json field `device` in the files we write, not a device we compute on",
    ("queries/neuronpedia.py", "neuronpedia_graph", "torch.tensor"):
        "influence read back from Parquet for an export: stored float32 data, no model or device involved",
}


def findings(path: Path) -> list[tuple[str, str, int]]:
    """(enclosing function, what, line) of every factory call without `device=`, device literal and `.cuda()`."""
    found: list[tuple[str, str, int]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            func = node.func
            if (isinstance(func.value, ast.Name) and func.value.id == "torch" and func.attr in FACTORIES
                    and not any(k.arg == "device" for k in node.keywords)):
                found.append((function, f"torch.{func.attr}", node.lineno))
            if func.attr == "cuda":
                found.append((function, ".cuda()", node.lineno))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and (node.value in ("cpu", "cuda") or node.value.startswith("cuda:")):
            found.append((function, repr(node.value), node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(path.read_text(encoding="utf-8")), "<module>")
    return found


def test_no_tensor_on_a_hard_coded_device():
    seen, offending = set(), []
    for folder in ("ingest", "queries"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            if name == DEVICE_MODULE:
                continue
            for function, what, line in findings(path):
                if (name, function, what) in ALLOWED:
                    seen.add((name, function, what))
                else:
                    offending.append(f"{name}:{line} in {function}: {what}")
    assert not offending, "create tensors on the device of the data they combine with (device=x.device), or add a " \
                          "justified entry to ALLOWED:\n" + "\n".join(offending)
    assert not set(ALLOWED) - seen, f"allow-list entries that match nothing any more: {sorted(set(ALLOWED) - seen)}"


def test_the_lint_catches_what_it_should(tmp_path):
    """The walk itself: a factory without device=, a literal, .cuda(); and with device= or *_like, nothing."""
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\ndef f(x):\n    a = torch.zeros(3)\n    b = x.to('cuda')\n    c = x.cuda()\n"
                   "    d = torch.zeros(3, device=x.device)\n    e = torch.zeros_like(x)\n    return torch.arange(3, device='cpu')\n")
    assert [(f, what) for f, what, _ in findings(bad)] == [("f", "torch.zeros"), ("f", "'cuda'"), ("f", ".cuda()"), ("f", "'cpu'")]

