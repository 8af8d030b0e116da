"""HTML reports: the numbers on the pages are the catalog's, blind cards carry no example text, and
every page loads in a real headless Chromium without console errors, its links resolving to written files."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, replace
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from circuit_catalog.catalog import layout
from circuit_catalog.catalog.ids import parse_local, split_node_id, token_node
from circuit_catalog.catalog.manifest import Manifest
from circuit_catalog.catalog.store import open_loaded_store
from circuit_catalog.ingest.datasets import token_contexts
from circuit_catalog.ingest.evaluate import evaluate_transcoders
from circuit_catalog.ingest.prompts import run_prompts
from circuit_catalog.ingest.settings import AttributionSettings, PromptSpec
from circuit_catalog.queries.lookups import Lookups
from circuit_catalog.queries.reports.feature import card_file, feature_card, render_feature, write_feature_cards
from circuit_catalog.queries.reports.overview import write_overview
from circuit_catalog.queries.reports.prompt import report_file, write_prompt_report
from circuit_catalog.queries.stats import feature_stats

from tests.test_cli import assert_one_line_error, run
from tests.tools.browser import PACKAGES, Browser, find_driver

FEATURE = "L1/3"
PROMPT = "the capital of france is"


class Page(HTMLParser):
    """Text nodes in document order, and the rows of each table by its class (style text left out)."""

    def __init__(self, html: str):
        super().__init__()
        self.texts: list[str] = []
        self.tables: list[tuple[str, list[list[str]]]] = []
        self._style = False
        self._cell: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self._style = self._style or tag == "style"
        if tag == "table":
            self.tables.append((dict(attrs).get("class") or "", []))
        elif tag == "tr" and self.tables:
            self.tables[-1][1].append([])
        elif tag == "td":
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "style":
            self._style = False
        elif tag == "td" and self._cell is not None:
            self.tables[-1][1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._style:
            return
        self.texts.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def rows(self, cls: str) -> list[list[list[str]]]:
        """The body rows of every table of class `cls`, in page order."""
        return [[r for r in rows if r] for c, rows in self.tables if c == cls]

    def shows(self, tokens: list[str]) -> bool:
        """Whether these tokens appear as consecutive text nodes (how a context window renders)."""
        n = len(tokens)
        return any(self.texts[i: i + n] == tokens for i in range(len(self.texts) - n + 1))


def shown(text: str) -> str:
    """A token as the pages display it."""
    return text.replace("\n", "↵").replace("\t", "⇥") or "∅"


@pytest.fixture(scope="module")
def reports(stats_catalog, gpt2, text_file, tmp_path_factory):
    """Cards (with neighbours, plain and blind), a prompt's graph and the overview, written into one directory."""
    source, tset = stats_catalog
    root = tmp_path_factory.mktemp("report-catalog") / "catalog"
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("graph*"))
    run_prompts(gpt2, tset, root, [PromptSpec(PROMPT)], AttributionSettings(max_feature_nodes=None), progress=False)
    out = tmp_path_factory.mktemp("reports")
    eval_file = out / "eval.json"
    tokens = token_contexts(gpt2.tokenizer, str(text_file), 128, 16)
    eval_file.write_text(json.dumps(asdict(evaluate_transcoders(gpt2, tset, tokens, progress=False))))
    with Lookups(open_loaded_store(root, progress=False)) as lookups:
        cards = write_feature_cards(lookups, root, [FEATURE], out, k=5, with_neighbours=True)
        blind = write_feature_cards(lookups, root, [FEATURE, "L2/4", "L0/2"], out, k=5, blind=True, with_neighbours=True)
        upstream, downstream = lookups.upstream(FEATURE, 5), lookups.downstream(FEATURE, 5)
        prompt = write_prompt_report(lookups, root, PROMPT, out / report_file(lookups.prompt(PROMPT).id), max_nodes=20)
    overview = write_overview(root, out / "overview.html", eval_file)
    return {"root": root, "out": out, "cards": cards, "blind": blind, "overview": overview, "eval": eval_file,
            "upstream": upstream, "downstream": downstream, "prompt": prompt}


def test_card_shows_the_catalog_numbers(reports):
    root, out = reports["root"], reports["out"]
    page = Page((out / card_file(FEATURE)).read_text())
    top, *intervals = page.rows("examples")
    expected = [r for r in pq.read_table(layout.stats_file(root, "top_examples")).to_pylist() if r["feature"] == FEATURE]
    assert [row[1] for row in top] == [f"{r['activation']:.3f}" for r in sorted(expected, key=lambda r: r["rank"])]
    stats = feature_stats(root, FEATURE, 5)
    assert [len(rows) for rows in intervals] == [len(i.examples) for i in stats.intervals] and intervals
    assert [[row[1] for row in rows] for rows in intervals] == [[f"{e.activation:.3f}" for e in i.examples] for i in stats.intervals]
    for e in stats.examples + [e for i in stats.intervals for e in i.examples]:
        assert page.shows([shown(t) for t in e.tokens])
    edges = page.rows("edges")[0]
    assert [(row[0], row[1]) for row in edges] == [(e.feature, f"{e.weight:+.4f}") for e in reports["upstream"]]
    html = (out / card_file(FEATURE)).read_text()
    for e in reports["upstream"]:
        assert f'href="{card_file(e.feature)}"' in html and (out / card_file(e.feature)).is_file()


def test_cards_say_which_weight_they_draw(reports, tmp_path):
    """A card drawn with normalised weights shows the store's normalised weights under that name and says so; the plain
    card says its weights are raw."""
    root = reports["root"]
    with Lookups(open_loaded_store(root, progress=False)) as lookups:
        (path,) = write_feature_cards(lookups, root, [FEATURE], tmp_path, k=5, normalise=True)
        upstream, downstream = lookups.upstream(FEATURE, 5, normalise=True), lookups.downstream(FEATURE, 5, normalise=True)
    page, html = Page(path.read_text()), path.read_text()
    up, down = page.rows("edges")
    assert [(row[0], row[1]) for row in up + down] == [(e.feature, f"{e.weight:+.4f}") for e in upstream + downstream]
    assert "normalised weight" in html and "Normalised weights: raw weight times" in html
    plain = (reports["out"] / card_file(FEATURE)).read_text()
    assert "raw weight" in plain and "Raw weights: the reading (later) feature" in plain


def test_overview_normalises_the_layer_pair_means(reports):
    """Mean |weight| per layer pair times the target layer's inv_scale, against pyarrow over the Parquet."""
    from circuit_catalog.queries.reports.overview import overview

    root = reports["root"]
    inv = {r["layer"]: r["inv_scale"] for r in pq.read_table(layout.stats_file(root, "layers")).to_pylist()}
    edges = [r for f in layout.part_files(root, layout.PULLBACK_PARTS) for r in pq.read_table(f).to_pylist()]
    pairs = {(int(e["src"][1]), int(e["dst"][1])) for e in edges}
    expected = {(s, d): sum(abs(e["weight"]) for e in edges if (int(e["src"][1]), int(e["dst"][1])) == (s, d))
                / sum((int(e["src"][1]), int(e["dst"][1])) == (s, d) for e in edges) * inv[d] for s, d in pairs}
    got = overview(root)
    assert got.pair_normalised and got.pair_strength == pytest.approx(expected, rel=1e-5)
    assert "Mean |normalised weight| per layer pair" in reports["overview"].read_text()


def test_overview_shows_layers_and_eval(reports):
    root = reports["root"]
    page = Page(reports["overview"].read_text())
    (layers,) = page.rows("layers")
    figures = json.loads(reports["eval"].read_text())
    stats = pq.read_table(layout.stats_file(root, "features")).to_pylist()
    live = {layer: sum(r["live"] for r in stats if r["layer"] == layer) for layer in (0, 1, 2)}
    assert [row[0] for row in layers] == ["0", "1", "2"] and all(row[1] == "24" for row in layers)
    assert [row[2] for row in layers] == [str(live[layer]) for layer in (0, 1, 2)]
    assert [row[7] for row in layers] == [f"{m['fvu']:.3f}" for m in figures["layers"]]
    assert all(f'href="{card_file(fid)}"' in reports["overview"].read_text() for fid in [FEATURE])


def test_prompt_report_shows_the_graph(reports):
    root, path = reports["root"], reports["prompt"]
    page = Page(path.read_text())
    with Lookups(open_loaded_store(root, progress=False)) as lookups:
        info = lookups.prompt(PROMPT)
        graph = lookups.prompt_graph(info.id)
        top = max(graph.of_kind("logit"), key=lambda n: n.probability)
        _, paths = lookups.prompt_paths(info.id, top.token, k=10)
    assert f"{info.replacement_score:.3f}" in page.texts and f"{info.completeness_score:.3f}" in page.texts
    (logits,) = page.rows("logits")
    assert [row[1] for row in logits] == [f"{n.probability:.4f}" for n in sorted(graph.of_kind("logit"), key=lambda n: -n.probability)]
    (rows,) = page.rows("paths")
    assert [(row[0], row[1]) for row in rows] == [(f"{p.bottleneck:.4f}", f"{p.share:+.2%}") for p in paths] and rows
    html = path.read_text()
    drawn = html.count('class="node ')
    assert drawn == len(graph.of_kind("token")) + len(graph.of_kind("logit")) + min(20, len(graph.of_kind("feature")) + len(graph.of_kind("error")))
    overview = Page(reports["overview"].read_text())
    (prompts,) = overview.rows("prompts")
    assert [row[-1] for row in prompts] == [info.id] and f'href="{path.name}"' in reports["overview"].read_text()


def test_prompt_report_outlines_the_supernodes(reports, tmp_path):
    """Three supernodes written into a copy of the catalog: one of two drawn features, one of a drawn feature and one left
    out of the picture, and one (the most influential) of that one alone. The first two get one colour each: an outline
    centred on every drawn member node and none elsewhere, and a legend entry saying how many of its nodes are drawn; the
    third, with nothing drawn, is left out of the picture."""
    from circuit_catalog.catalog.parquet_io import write_atomic

    root = shutil.copytree(reports["root"], tmp_path / "catalog", ignore=shutil.ignore_patterns("graph*"))
    (info,) = pq.read_table(root / layout.PROMPT_INDEX).to_pylist()
    kept = [n for n in pq.read_table(layout.prompt_part(root, info["id"], "nodes")).to_pylist() if n["kept"]]
    inner = sorted((n for n in kept if n["kind"] in ("feature", "error")), key=lambda n: -n["influence"])
    drawn = {n["id"] for n in inner[:20]}  # the report's max_nodes below
    features = list(dict.fromkeys(n["feature_id"] for n in inner if n["kind"] == "feature"))
    hidden = next(f for f in reversed(features) if all(n["id"] not in drawn for n in kept if n["feature_id"] == f))
    groups = {"sn-c": ("group c", [hidden], 3.0), "sn-a": ("group a", features[:2], 2.0), "sn-b": ("group b", [features[2], hidden], 1.0)}
    write_atomic(pa.table({"src": [g for g, (_, m, _) in groups.items() for _ in m], "dst": [f for _, m, _ in groups.values() for f in m]},
                          schema=layout.SUPERNODE_MEMBER_SCHEMA), root / layout.SUPERNODE_MEMBERS)
    write_atomic(pa.table({"id": list(groups), "prompt_id": [info["id"]] * 3, "name": [n for n, _, _ in groups.values()],
                           "size": [len(m) for _, m, _ in groups.values()], "influence": [i for _, _, i in groups.values()]},
                          schema=layout.SUPERNODE_SCHEMA), root / layout.SUPERNODES)
    with Lookups(open_loaded_store(root, progress=False)) as lookups:
        html = write_prompt_report(lookups, root, info["id"], tmp_path / "p.html", max_nodes=20).read_text()

    number = r'"([-\d.]+)"'
    box = rf'<rect x={number} y={number} width={number} height={number}'
    centres = {m[0]: (float(m[1]) + float(m[3]) / 2, float(m[2]) + float(m[4]) / 2)  # local id -> centre of its node's box
               for m in re.findall(r'<g class="node feature">(?:<a [^>]*>)?<title>(\S+) [^<]*</title>' + box, html)}
    outlines = re.findall(r'<g class="group"><title>([^<]*)</title>((?:<rect [^>]*></rect>)*)</g>', html)
    legend = dict(re.findall(r'<g class="legend"><rect [^>]*stroke="(#\w+)"[^>]*></rect><text [^>]*>([^<]*)</text></g>', html))
    assert len(outlines) == 2 and len(set(legend)) == 2
    for (name, members, _), (title, rects) in zip(list(groups.values())[1:], outlines):
        nodes = [split_node_id(n["id"])[1] for n in kept if n["feature_id"] in members]
        shown = [n for n in nodes if f"{info['id']}:{n}" in drawn]
        assert shown and title == f"{name} ({len(shown)} of {len(nodes)} drawn)"
        found = [(float(x) + float(w) / 2, float(y) + float(h) / 2, colour)
                 for x, y, w, h, colour in re.findall(box + r' rx="4" fill="none" stroke="(#\w+)"', rects)]
        flat = [v for xy in sorted((x, y) for x, y, _ in found) for v in xy]
        assert flat == pytest.approx([v for xy in sorted(centres[n] for n in shown) for v in xy], abs=0.11)  # coordinates to 0.1
        assert len({colour for *_, colour in found}) == 1 and legend[found[0][2]] == title
    assert "2 of the graph&#x27;s 3 (the most influential with members drawn" in html


def test_cards_show_input_dependent_attributions(reports, tmp_path):
    """A feature in the prompt's pruned graph: its card lists where, with its strongest inputs; blind cards name no token."""
    root = reports["root"]
    nodes = [n for f in root.glob(layout.prompt_part_glob("nodes")) for n in pq.read_table(f).to_pylist()]
    edges = [e for f in root.glob(layout.prompt_part_glob("edges")) for e in pq.read_table(f).to_pylist()]
    kind = {n["id"]: n["kind"] for n in nodes}
    fed = {e["dst"] for e in edges if kind[e["src"]] == "token" and parse_local(split_node_id(e["src"])[1]).pos in range(1, 9)}
    used = next(n for n in sorted(nodes, key=lambda n: -n["influence"]) if n["kind"] == "feature" and n["kept"] and n["id"] in fed)
    fid = used["feature_id"]
    with Lookups(open_loaded_store(root, progress=False)) as lookups:
        (plain,) = write_feature_cards(lookups, root, [fid], tmp_path, k=5)
        (blind,) = write_feature_cards(lookups, root, [fid], tmp_path, k=5, blind=True)
    inputs = sorted((e for e in edges if e["dst"] == used["id"]), key=lambda e: -abs(e["weight"]))[:5]
    (rows,) = Page(plain.read_text()).rows("uses")
    row = next(r for r in rows if r[1] == str(used["pos"]))
    assert row[3] == f"{used['influence']:.4f}"
    tokens = {n["id"]: n["token"] for n in nodes if n["kind"] == "token"}
    for e in inputs:
        local = split_node_id(e["src"])[1]
        name = f"{tokens[e['src']]!r}@{parse_local(local).pos}" if e["src"] in tokens else local
        assert f"{name} {e['weight']:+.3g}" in row[4]
    (blind_rows,) = Page(blind.read_text()).rows("uses")
    blind_row = next(r for r in blind_rows if r[1] == str(used["pos"]))
    assert all(repr(t) not in blind_row[4] for t in tokens.values()) and any(token_node(n["pos"]) in blind_row[4] for n in nodes if n["kind"] == "token")


def test_blind_cards_leak_no_example_text(reports):
    """Every example window (top and per interval) is on the plain card and on no blind card."""
    root, out = reports["root"], reports["out"]
    assert reports["blind"] and all(p.name.endswith(".blind.html") for p in reports["blind"])
    for path in reports["blind"]:
        fid = path.name.split(".")[0].replace("_", "/")
        html = path.read_text()
        page = Page(html)
        assert "<mark" not in html and 'class="window"' not in html
        assert not page.rows("examples")
        assert all(h == "data:," or h.endswith(".blind.html") for h in re.findall(r'href="([^"]*)"', html))  # blind cards link only to blind cards
        stats = feature_stats(root, fid, 5)
        windows = [e.tokens for e in stats.examples + [e for i in stats.intervals for e in i.examples]]
        assert windows
        for tokens in windows:
            around = [shown(t) for t in tokens[:4]]  # four consecutive tokens of the window, as the plain card renders them
            assert not page.shows(around), (fid, around)
    plain = Page((out / card_file(FEATURE)).read_text())
    assert all(plain.shows([shown(t) for t in e.tokens[:4]]) for e in feature_stats(root, FEATURE, 5).examples)  # the check can fire


def test_cards_without_statistics_or_firing(reports):
    """A catalog without statistics, and a feature that never fired, still give a readable card."""
    root = reports["root"]
    with Lookups(open_loaded_store(root, progress=False)) as lookups:
        card = feature_card(lookups, root, FEATURE, 5)
    manifest = Manifest.read(root)
    silent = replace(card.stats, fired=0, frequency=0.0, examples=[], intervals=[], log10_histogram=[0] * len(card.stats.log10_histogram))
    for stats, note in ((None, "No activation statistics"), (silent, "never fired")):
        html = render_feature(replace(card, stats=stats), manifest, lambda fid: None)
        assert note in html and "De-embedding (raw)" in html and "Upstream" in html


def test_report_cli(stats_catalog, tmp_path):
    root, _ = stats_catalog
    code, output = run("report", "feature", "L0/2", "L2/1", "--catalog", root, "--out", tmp_path)
    assert code == 0, output
    assert (tmp_path / "L0_2.html").is_file() and (tmp_path / "L2_1.html").is_file()
    code, output = run("report", "overview", "--catalog", root, "--out", tmp_path / "o.html")
    assert code == 0 and (tmp_path / "o.html").is_file(), output
    assert_one_line_error(*run("report", "feature", "L1/3", "L9/1", "--catalog", root, "--out", tmp_path / "x"), "unknown feature L9/1")
    assert not (tmp_path / "x").exists()  # nothing written when one id is unknown
    assert_one_line_error(*run("report", "feature", "L1-3", "--catalog", root), "malformed feature id")
    (tmp_path / "bad.json").write_text("{}")
    assert_one_line_error(*run("report", "overview", "--catalog", root, "--eval", tmp_path / "bad.json"), "not a `circuit-catalog eval --out` file")
    assert_one_line_error(*run("report", "overview", "--catalog", tmp_path / "nowhere"), "not a catalog directory")


@pytest.fixture(scope="module")
def browser():
    found = find_driver()
    if found is None:
        pytest.skip(f"no headless Chromium: install the {PACKAGES}")
    b = Browser(*found)
    yield b
    b.close()


def _local_targets(b: Browser, selector: str) -> list[Path]:
    """The files that the links matching `selector` point to (HTML and SVG links alike)."""
    hrefs = b.run(f"return Array.from(document.querySelectorAll({selector!r}), a => new URL(a.getAttribute('href'), document.baseURI).href)")
    return [Path(unquote(urlparse(h).path)) for h in hrefs]


def test_pages_in_chromium(reports, browser, tmp_path):
    out = reports["out"]
    pages = [out / card_file(FEATURE), out / card_file(FEATURE, blind=True), reports["overview"], reports["prompt"]]
    for path in pages:
        browser.open(path)
        assert browser.run("return document.readyState") == "complete"
        assert browser.run("return document.title").startswith(("Feature", "Catalog", "Attribution")), path
        errors = [e for e in browser.console() if e["level"] in ("SEVERE", "WARNING")]
        assert not errors, (path.name, errors)
        assert browser.run("return document.querySelectorAll('svg.chart rect').length") > 0
        for target in _local_targets(browser, "a[href]"):
            assert target.is_file(), (path.name, target)  # no dead links among what was written
        shot = browser.screenshot(tmp_path / f"{path.stem}.png")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000

    browser.open(out / card_file(FEATURE))
    assert browser.run("return document.querySelector('svg[aria-label^=\"histogram\"]') !== null")
    assert browser.run("return document.querySelectorAll('table.examples tbody tr').length") >= 5
    assert browser.run("return document.querySelectorAll('table.examples mark').length") >= 5
    linked = [p.name for p in _local_targets(browser, "table.edges a")]
    assert linked == [card_file(e.feature) for e in reports["upstream"] + reports["downstream"]]  # every neighbour's card was written
    assert browser.run("return document.querySelectorAll('svg g.node').length") >= 2

    browser.open(reports["prompt"])
    assert browser.run("return document.querySelectorAll('svg g.node.token').length") == 6  # BOS + five words
    assert browser.run("return document.querySelectorAll('svg line.edge').length") > 0
    assert browser.run("return document.querySelectorAll('table.paths tbody tr').length") > 0

    browser.open(out / card_file(FEATURE, blind=True))
    text = browser.run("return document.body.innerText")
    assert "Blind case-study mode" in text and browser.run("return document.querySelectorAll('mark, .window').length") == 0
    assert all(p.name.endswith(".blind.html") for p in _local_targets(browser, "a[href]"))
