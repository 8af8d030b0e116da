"""examples/quickstart.ipynb runs top to bottom (nbclient, a real kernel) on the tiny GPT-2, and says what the API says."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from circuit_catalog import Catalog

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"
PROMPT = "the capital of france is"


def _text(cell) -> str:
    parts = []
    for o in cell.get("outputs", []):
        parts.append(o.get("text", ""))
        parts.append(o.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def test_quickstart_notebook_executes(tmp_path, monkeypatch, gpt2_dir, saelens_dir):
    catalog = tmp_path / "catalog"
    for name, value in (("MODEL", gpt2_dir), ("TRANSCODERS", saelens_dir), ("CATALOG", catalog), ("PROMPT", PROMPT)):
        monkeypatch.setenv(f"QUICKSTART_{name}", str(value))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]

    with Catalog(catalog, progress=False) as cat:  # the same answers, asked here
        graph = cat.prompt_graph(PROMPT)
        summary = graph.summary(5)
        feature = next(n.feature_id for n in summary.top if n.kind == "feature")
        upstream = cat.upstream(feature, k=5)
        g = graph.to_networkx()
    assert f"{g.number_of_nodes()} nodes, {g.number_of_edges()} edges" in _text(code[4])
    assert repr(feature) in _text(code[2])
    table = _text(code[3])
    assert "feature" in table and "weight" in table
    for edge in upstream:
        assert edge.feature in table
    assert any("<iframe" in o.get("data", {}).get("text/html", "") for o in code[5].outputs)
    assert (catalog / "reports").is_dir()
