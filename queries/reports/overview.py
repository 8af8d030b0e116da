"""The catalog overview: what the catalog holds, per layer, and how its pullback weights are distributed.

Per layer: features, live / dead / rarely firing (from the activation statistics), mean L0 (sum of
firing frequencies: active features per token), warnings (`queries.caveats`: near-dead layers, counts of sink-like
and dense features), and FVU and CE loss recovered when an evaluation file
(`circuit-catalog eval --out CATALOG/eval.json`) is there, else a line saying quality was not measured. Pullback weights: a histogram of all kept
edges and a heatmap of mean |weight| per layer pair, computed by DuckDB over the Parquet parts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from circuit_catalog.catalog import layout
from circuit_catalog.catalog.ids import parse_feature_id, sql_feature_layer
from circuit_catalog.catalog.manifest import Manifest
from circuit_catalog.queries.caveats import (
    DENSE_FREQUENCY,
    NEAR_DEAD_L0,
    NEAR_DEAD_SHARE,
    SINK_POS,
    SINK_SHARE,
    Flag,
    catalog_eval,
    feature_flags,
    layer_flags,
    quality_line,
    rare_warning,
    replacement_warning,
)
from circuit_catalog.queries.reports import svg
from circuit_catalog.queries.reports.feature import OVERVIEW, card_feature
from circuit_catalog.queries.reports.html import Markup, banner, figures, join, link, page, section, table, tag, write_page
from circuit_catalog.queries.prompt_graph import prompt_index
from circuit_catalog.queries.reports.prompt import report_file
from circuit_catalog.queries.sql import connect, views


WEIGHT_BINS = 60
COUNT_LABELS = {"tokens": "vocabulary", "deembed_edges": "de-embedding edges"}


@dataclass
class LayerRow:
    layer: int
    features: int
    live: int | None = None
    dead: int | None = None  # never fired on the dataset
    rare: int | None = None  # fired, but not often enough to count as live
    l0: float | None = None  # sum of firing frequencies: mean active features per token
    fvu: float | None = None
    ce_recovered: float | None = None
    flags: list[Flag] = field(default_factory=list)  # the layer's own (near-dead)
    flagged: dict[str, int] = field(default_factory=dict)  # feature flag kind -> features of the layer with it


@dataclass
class Overview:
    manifest: Manifest
    layers: list[LayerRow]
    stats_info: dict | None
    evaluation: dict | None
    weight_edges: list[float] = field(default_factory=list)
    weight_counts: list[int] = field(default_factory=list)
    pair_strength: dict[tuple[int, int], float] = field(default_factory=dict)  # (src layer, dst layer) -> mean |weight|
    pair_normalised: bool = False  # pair_strength x the target layer's inv_scale (recorded with the statistics)
    cards: list[str] = field(default_factory=list)  # feature card files next to the overview
    prompts: list[dict] = field(default_factory=list)  # prompts.parquet rows, with `report` set where a report is written
    rare_warning: str | None = None  # the statistics counted too few tokens to call a feature rare
    training: dict | None = None  # CATALOG/training.json: how `train` made the transcoders, with its curve


def overview(root: Path, eval_file: Path | None = None, cards_dir: Path | None = None) -> Overview:
    """Gather the overview's figures (DuckDB over the catalog's Parquet)."""
    manifest = Manifest.read(root)
    evaluation = catalog_eval(root, eval_file)
    info_path = layout.stats_info(root)
    available = views(root)
    con = connect(root)
    try:
        rows = {layer: LayerRow(layer, n) for layer, n in con.execute("SELECT layer, count(*) FROM features GROUP BY layer ORDER BY layer").fetchall()}
        if "stats" in available:
            for layer, live, dead, rare, l0 in con.execute(
                "SELECT layer, count(*) FILTER (WHERE live), count(*) FILTER (WHERE fired = 0), count(*) FILTER (WHERE fired > 0 AND NOT live), sum(frequency) "
                "FROM stats GROUP BY layer"
            ).fetchall():
                rows[layer].live, rows[layer].dead, rows[layer].rare, rows[layer].l0 = live, dead, rare, l0
        result = Overview(manifest, list(rows.values()), json.loads(info_path.read_text()) if info_path.is_file() else None, evaluation)
        if "pullbacks" in available:
            _weights(con, result)
    finally:
        con.close()
    for layer, flags in layer_flags(root).items():
        rows[layer].flags = flags
    for fid, flags in feature_flags(root).items():
        counts = rows[parse_feature_id(fid)[0]].flagged
        for f in flags:
            counts[f.kind] = counts.get(f.kind, 0) + 1
    result.rare_warning = rare_warning(root)
    training_path = root / layout.TRAINING
    result.training = json.loads(training_path.read_text()) if training_path.is_file() else None
    for m in (evaluation or {}).get("layers", []):
        if m["layer"] in rows:
            rows[m["layer"]].fvu, rows[m["layer"]].ce_recovered = m["fvu"], m["ce_recovered"]
    if cards_dir is not None and cards_dir.is_dir():
        result.cards = sorted((p.name for p in cards_dir.glob("L*_*.html")), key=_card_order)
    result.prompts = prompt_index(root)
    for row in result.prompts:
        name = report_file(row["id"])
        row["report"] = name if cards_dir is not None and (cards_dir / name).is_file() else None
    return result


def _card_order(name: str) -> tuple[int, int, str]:
    fid = card_feature(name)
    return (*parse_feature_id(fid), name) if fid else (1 << 30, 0, name)


def _layer_scales(con) -> dict[int, float]:
    """Each layer's inv_scale (E[1/norm scale] at its transcoders' input), or {} when the catalog has not recorded them."""
    if "inv_scale" not in {row[0] for row in con.execute("DESCRIBE features").fetchall()}:
        return {}
    scales = dict(con.execute("SELECT layer, any_value(inv_scale) FROM features GROUP BY layer").fetchall())
    return {} if any(v is None for v in scales.values()) else scales


def _weights(con, result: Overview) -> None:
    """Histogram of all (raw) pullback weights over [-max|w|, max|w|], and mean |weight| per layer pair, normalised by
    the target layer's inv_scale where recorded: raw means favour target layers of large norm scale."""
    (extent,) = con.execute("SELECT max(abs(weight)) FROM pullbacks").fetchone()
    if not extent:
        return
    width = 2 * extent / WEIGHT_BINS
    counts = dict(con.execute(
        f"SELECT least(floor((weight + ?) / ?)::INTEGER, {WEIGHT_BINS - 1}) AS b, count(*) FROM pullbacks GROUP BY b", [extent, width]
    ).fetchall())
    result.weight_edges = [-extent + i * width for i in range(WEIGHT_BINS + 1)]
    result.weight_counts = [counts.get(i, 0) for i in range(WEIGHT_BINS)]
    scales = _layer_scales(con)
    result.pair_normalised = bool(scales)
    result.pair_strength = {(s, d): w * scales.get(d, 1.0) for s, d, w in con.execute(
        f"SELECT {sql_feature_layer('src')} AS s, {sql_feature_layer('dst')} AS d, avg(abs(weight)) FROM pullbacks GROUP BY s, d"
    ).fetchall()}


def write_overview(root: Path, out: Path | None = None, eval_file: Path | None = None) -> Path:
    """Write the overview page (default CATALOG/reports/overview.html), listing the cards next to it."""
    out = out or root / layout.REPORTS / OVERVIEW
    return write_page(out, render_overview(overview(root, eval_file, out.parent)))


def _opt(value: float | None, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def render_overview(o: Overview) -> str:
    m = o.manifest
    total = sum(r.features for r in o.layers)
    head = [("layers", f"{len(o.layers)}"), ("features", f"{total:,}")]
    head += [(COUNT_LABELS.get(name, name.replace("_", " ")), f"{n:,}") for name, n in m.counts.items() if name != "features"]
    if o.stats_info:
        live = sum(r.live or 0 for r in o.layers)
        head += [("statistics over", f"{o.stats_info['tokens']:,} tokens of {o.stats_info['dataset']}"), ("live features", f"{live / max(total, 1):.1%}")]
    if o.evaluation:
        head += [("CE original (nats)", f"{o.evaluation['ce_original']:.3f}"), ("CE recovered, all layers", f"{o.evaluation['ce_recovered_all']:.3f}")]
    parts = [figures(head), banner(quality_line(o.evaluation), "info" if o.evaluation else "warn")]
    if o.rare_warning:
        parts.append(banner(f"Too few tokens to call a feature rare: {o.rare_warning}.", "warn"))
    parts.append(_layers_section(o))
    if o.training and o.training.get("curve"):
        parts.append(_training_section(o.training))
    if o.weight_counts:
        parts.append(_weights_section(o))
    parts.append(_cards_section(o.cards))
    if o.prompts:
        parts.append(_prompts_section(o.prompts))
    fmt = f" ({m.transcoder_format})" if m.transcoder_format else ""
    subtitle = f"{m.model} · transcoders {m.transcoders}{fmt} · top-k {m.top_k} · completed {m.completed or 'not yet'}"
    return page("Catalog overview", join(parts), subtitle, meta={"circuit-catalog-report": "overview"})


def _layers_section(o: Overview) -> Markup:
    columns = [("layer", lambda r: f"{r.layer}"), ("features", lambda r: f"{r.features:,}")]
    if o.stats_info:
        columns += [("live", lambda r: _opt(r.live, "{:,}")), ("dead", lambda r: _opt(r.dead, "{:,}")),
                    ("rarely firing", lambda r: _opt(r.rare, "{:,}")), ("L0", lambda r: _opt(r.l0, "{:.1f}")),
                    ("warnings", _layer_warnings)]
    if o.evaluation:
        columns += [("FVU", lambda r: _opt(r.fvu, "{:.3f}")), ("CE recovered", lambda r: _opt(r.ce_recovered, "{:.3f}"))]
    rows = [[cell(r) for _, cell in columns] for r in o.layers]
    notes = []
    if o.stats_info:
        notes.append("Live: fires more often than once in 10,000 tokens; dead: never fired; L0: mean number of the layer's features active per token. "
                     f"Warnings (`queries/caveats.py`): a near-dead layer has mean L0 < {NEAR_DEAD_L0:g} or more than {NEAR_DEAD_SHARE:.0%} "
                     f"of its features dead; a sink-like feature has at least {SINK_SHARE:.0%} of its top examples at position <= {SINK_POS} "
                     f"(the first token after BOS); a dense one fires on more than {DENSE_FREQUENCY:.0%} of tokens.")
    notes.append("FVU and CE loss recovered from the evaluation file." if o.evaluation else
                 "For FVU and CE loss recovered per layer: `circuit-catalog eval ... --out CATALOG/eval.json` (or pass --eval FILE).")
    charts = []
    labels = [f"layer {r.layer}" for r in o.layers]
    if o.evaluation:
        charts.append(tag("div", tag("h3", "FVU per layer") + svg.bar_chart(labels, [r.fvu or 0.0 for r in o.layers], fmt="{:.3f}", label="FVU per layer")))
    if o.stats_info:
        charts.append(tag("div", tag("h3", "L0 per layer") + svg.bar_chart(labels, [r.l0 or 0.0 for r in o.layers], fmt="{:.1f}", label="L0 per layer")))
    table_html = table([name for name, _ in columns], rows, numeric=[i for i, (name, _) in enumerate(columns) if name != "warnings"], cls="layers")
    return section("Layers", table_html, tag("div", join(charts), cls="grid"), note=" ".join(notes))


def _training_section(record: dict) -> Markup:
    """How the transcoders were trained, and the training curve (means over layers) against training tokens."""
    c, curve = record["config"], record["curve"]
    method = (f"BatchTopK, k = {c['k']}, saved as JumpReLU" if c.get("activation") == "batchtopk" else
              f"ReLU + L1 ({c['l1_coefficient']:g})") + (", skip transcoders" if c.get("skip") else "")
    head = [("method", method), ("features per layer", f"{c['d_sae']:,}"),
            ("training tokens", f"{c['n_tokens']:,} x {c['epochs']} epoch{'s' if c['epochs'] > 1 else ''}"),
            ("learning rate", f"{c['lr']:g}"), ("matmuls", c.get("matmul_dtype", "float32")),
            ("training time", f"{curve[-1]['seconds'] / 60:.1f} min")]
    tokens = [p["tokens"] for p in curve]
    charts = [(key, title, fmt) for key, title, fmt in (
        ("fvu", "FVU (minibatch)", "{:.3f}"), ("l0", "L0", "{:.1f}"), ("dead_fraction", "dead features", "{:.1%}"),
        ("ce_recovered", "CE loss recovered (held-out)", "{:.3f}")) if any(p.get(key) is not None for p in curve)]
    grid = tag("div", join(tag("div", tag("h3", title) + svg.line_chart(tokens, [p.get(key) for p in curve], x_label="training tokens",
                                                                      y_label=title, fmt=fmt, label=f"{title} during training"))
                           for key, title, fmt in charts), cls="grid")
    return section("Training", figures(head), grid,
                   note="From the transcoders' training record (`train` writes OUT/training.json; ingest copies it here). "
                        "FVU, L0 and dead features are means over layers on the training minibatches (dead: silent for the "
                        "last `dead_tokens` tokens); CE loss recovered, with every MLP replaced at once, on held-out tokens "
                        "where `train --curve-ce N` measured it.")


def _layer_warnings(r: LayerRow) -> str:
    """The layer's own flags, then how many of its features carry each feature flag."""
    return "; ".join([f.kind for f in r.flags] + [f"{n} {kind}" for kind, n in sorted(r.flagged.items())])


def _weights_section(o: Overview) -> Markup:
    hist = svg.histogram(o.weight_edges, o.weight_counts, log_y=True, x_label="pullback weight", y_label="edges", x_tick=lambda v: f"{v:.3g}",
                         bin_label=lambda a, b: f"{a:+.3g} to {b:+.3g}", label="histogram of pullback weights")
    src_layers = sorted({s for s, _ in o.pair_strength})
    dst_layers = sorted({d for _, d in o.pair_strength})
    grid = [[o.pair_strength.get((s, d)) for s in src_layers] for d in dst_layers]
    kind = "normalised" if o.pair_normalised else "raw"
    heat = svg.heatmap([f"L{d}" for d in dst_layers], [f"L{s}" for s in src_layers], grid, x_label="source layer", y_label="target layer",
                       label=f"mean absolute {kind} pullback weight per layer pair")
    scale_note = (" The per-pair means are normalised: times the target layer's E[1/norm scale] over the statistics' tokens, so "
                  "target layers compare." if o.pair_normalised else
                  " The per-pair means are raw (the target layer's norm scale left out), so they favour target layers of large "
                  "norm scale; an ingest with --dataset records the scales and normalises them.")
    return section("Pullback weights", tag("h3", "All kept edges, raw weights (log-scale counts)") + hist,
                   tag("h3", f"Mean |{kind} weight| per layer pair") + heat,
                   note="Kept edges only (top-k per feature and earlier layer, and/or above --min-weight), so small weights are "
                        "under-represented." + scale_note)


def _prompts_section(prompts: list[dict]) -> Markup:
    rows = [[link(p["report"], p["text"], "no report written: `circuit-catalog report prompt ID`"), p["n_tokens"],
             f"{p['replacement_score']:.3f}", f"{p['completeness_score']:.3f}", p["n_feature_nodes"], p["n_kept_nodes"],
             replacement_warning(p["replacement_score"]) or "", p["id"]] for p in prompts]
    return section("Attribution graphs", table(["prompt", "tokens", "replacement", "completeness", "feature nodes", "kept nodes", "warning", "id"],
                                               rows, numeric=[1, 2, 3, 4, 5], cls="prompts"))


def _cards_section(cards: list[str]) -> Markup:
    if not cards:
        return section("Feature cards", note="No feature cards next to this page yet: `circuit-catalog report feature FEATURE --catalog DIR`.")
    full = [c for c in cards if not c.endswith(".blind.html")]
    blind = [c for c in cards if c.endswith(".blind.html")]
    items = [tag("h3", title) + tag("p", join((link(c, c.split(".")[0].replace("_", "/")) for c in names), " · "))
             for title, names in (("Cards", full), ("Blind cards (no example text)", blind)) if names]
    return section("Feature cards", *items)
