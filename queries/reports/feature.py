"""Feature cards: one self-contained HTML page per feature, the seed's feature dashboard plus its circuit.

A card shows the activation histogram, the top activating examples with the firing token marked,
examples from each activation interval, the de-embedding (raw, extended) and logit-lens tokens, and
the strongest upstream and downstream pullback edges, linked to those features' cards.

Blind mode (the seed's blind case study) leaves every example's text out of the data before anything
is rendered, so no dataset token can reach the page: only input-independent circuit evidence
(de-embeddings, logit lens, pullback neighbours) and where and how strongly the feature fires.
Blind cards are written as `L8_355.blind.html` and link only to blind cards, so a click never leads
from a blind card to one with examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from circuit_catalog.catalog import layout
from circuit_catalog.catalog.ids import FEATURE_ID, parse_feature_id
from circuit_catalog.catalog.layout import histogram_log10_edges
from circuit_catalog.catalog.manifest import Manifest
from circuit_catalog.queries.caveats import Flag, flags_of, rare_warning
from circuit_catalog.queries.lookups import Edge, FeatureTokens, FeatureUse, InterventionUse, Lookups
from circuit_catalog.queries.reports import svg
from circuit_catalog.queries.reports.html import (
    Markup,
    banner,
    figures,
    join,
    link,
    page,
    section,
    signed,
    table,
    tag,
    token,
    token_window,
    write_page,
)
from circuit_catalog.queries.stats import FeatureStats, feature_stats

OVERVIEW = "overview.html"


@dataclass
class FeatureCard:
    id: str
    tokens: FeatureTokens
    upstream: list[Edge]
    downstream: list[Edge]
    stats: FeatureStats | None  # None when the catalog has no activation statistics
    uses: list[FeatureUse] = field(default_factory=list)  # occurrences in prompts' attribution graphs
    interventions: list[InterventionUse] = field(default_factory=list)  # recorded interventions that edited it
    flags: list[Flag] = field(default_factory=list)  # likely artefacts of the feature and its layer (`queries.caveats`)
    rare_warning: str | None = None  # the statistics counted too few tokens to call it rarely firing
    normalised: bool = False  # edge weights times the reader's E[1/norm scale] (`Lookups.upstream`), else raw


def card_file(fid: str, blind: bool = False) -> str:
    """'L8/355' -> 'L8_355.html' (blind: 'L8_355.blind.html')."""
    return fid.replace("/", "_") + (".blind.html" if blind else ".html")


def card_feature(name: str) -> str | None:
    """The feature a card file is of ('L8_355.html', 'L8_355.blind.html' -> 'L8/355'); None for another file."""
    fid = name.split(".")[0].replace("_", "/", 1)
    return fid if FEATURE_ID.fullmatch(fid) else None


def feature_card(lookups: Lookups, root: Path, fid: str, k: int = 10, blind: bool = False, normalise: bool = False) -> FeatureCard:
    """Everything a card shows: edges (raw or `normalise`d weights) and tokens from the graph store, statistics from DuckDB."""
    tokens = lookups.tokens(fid, k)  # unknown ids fail here, before anything is written
    stats = feature_stats(root, fid, k) if layout.stats_file(root, "features").is_file() else None
    if blind and stats is not None:
        stats = blinded(stats)
    uses = lookups.feature_uses(fid, k, token_text=not blind)
    interventions = [] if blind else lookups.interventions(fid, k)  # their prompts and texts would unblind the card
    return FeatureCard(fid, tokens, lookups.upstream(fid, k, normalise=normalise), lookups.downstream(fid, k, normalise=normalise),
                       stats, uses, interventions, flags_of(root, fid), rare_warning(root), normalise)


def blinded(stats: FeatureStats) -> FeatureStats:
    """The statistics without any example text: locations and activations stay, tokens go."""
    return replace(
        stats,
        examples=[replace(e, tokens=[], firing=-1) for e in stats.examples],
        intervals=[replace(i, examples=[]) for i in stats.intervals],
    )


def write_feature_cards(lookups: Lookups, root: Path, ids: Iterable[str], out_dir: Path | None = None, k: int = 10,
                        blind: bool = False, with_neighbours: bool = False, normalise: bool = False) -> list[Path]:
    """Write a card per feature (and, with `with_neighbours`, per upstream/downstream neighbour) into
    `out_dir` (default CATALOG/reports), edges by raw or `normalise`d weight. Links go to cards written now or
    already in `out_dir`; any other neighbour is shown unlinked. Every id is looked up before anything is written.
    """
    out_dir = out_dir or root / layout.REPORTS
    cards = {fid: feature_card(lookups, root, fid, k, blind, normalise) for fid in dict.fromkeys(ids)}
    if with_neighbours:
        for card in list(cards.values()):
            for e in card.upstream + card.downstream:
                if e.feature not in cards:
                    cards[e.feature] = feature_card(lookups, root, e.feature, k, blind, normalise)

    def href(fid: str) -> str | None:
        name = card_file(fid, blind)
        return name if fid in cards or (out_dir / name).is_file() else None

    manifest = Manifest.read(root)
    nav = [(OVERVIEW, "catalog overview")] if (out_dir / OVERVIEW).is_file() and not blind else []
    return [write_page(out_dir / card_file(fid, blind), render_feature(card, manifest, href, blind, nav)) for fid, card in cards.items()]


def render_feature(card: FeatureCard, manifest: Manifest, href: Callable[[str], str | None], blind: bool = False,
                   nav: Sequence[tuple[str, str]] = ()) -> str:
    layer, index = parse_feature_id(card.id)
    subtitle = f"layer {layer}, feature {index} · {manifest.model} · transcoders {manifest.transcoders}"
    circuit = [_tokens_section(card.tokens), _circuit_section(card, href), _uses_section(card.uses, blind)]
    if not blind:
        circuit.append(interventions_section(card.interventions, "this feature's edits"))
    if card.stats is None:
        observed = [section("Activations", note="No activation statistics in this catalog: run `circuit-catalog ingest ... --dataset D --tokens N`.")]
    elif not card.stats.fired:
        observed = [section("Activations", note="The feature never fired on the dataset of the statistics.")]
    elif blind:
        observed = [_histogram_section(card.stats), _components_section(card.stats), _locations_section(card.stats), _intervals_table(card.stats)]
    else:
        observed = [_histogram_section(card.stats), _components_section(card.stats), _top_examples_section(card.stats), _intervals_section(card.stats)]
    head = [_headline(card.stats), *(banner(f"Warning: {f}.", "warn") for f in card.flags)]
    if card.rare_warning and card.stats is not None:
        head.append(banner(f"Too few tokens to call a feature rare: {card.rare_warning}.", "warn"))
    if blind:
        head.append(banner("Blind case-study mode: the texts of the examples that activate this feature are left out. "
                           "Shown are input-independent circuit evidence (de-embeddings, logit lens, pullback neighbours) "
                           "and where and how strongly the feature fires; linked cards are blind too.", "blind"))
    body = join(head + (circuit + observed if blind else observed + circuit))
    return page(f"Feature {card.id}", body, subtitle, nav, meta={"circuit-catalog-report": "feature-blind" if blind else "feature"})


def _headline(stats: FeatureStats | None) -> Markup:
    if stats is None:
        return Markup("")
    return figures([
        ("fires on", f"{stats.frequency:.4%}"), ("firing tokens", f"{stats.fired:,}"), ("status", "live" if stats.live else "dead"),
        ("mean when firing", f"{stats.mean_act:.3f}"), ("max", f"{stats.max_act:.3f}"),
        ("quantiles 50 / 90 / 99 %", f"{stats.q50:.3g} / {stats.q90:.3g} / {stats.q99:.3g}"),
    ])


def _histogram_section(stats: FeatureStats) -> Markup:
    counts = stats.log10_histogram
    used = [i for i, c in enumerate(counts) if c]
    lo, hi = max(used[0] - 1, 0), min(used[-1] + 2, len(counts))
    edges = histogram_log10_edges()[lo: hi + 1]
    chart = svg.histogram(edges, counts[lo:hi], x_label="activation (log scale)", y_label="tokens", x_tick=lambda v: f"{10 ** v:.3g}",
                          label=f"histogram of activations of {stats.id}")
    return section("Activation histogram", chart, note="Firing tokens by activation, on a logarithmic axis (bins of log10 activation).")


def _components_section(stats: FeatureStats) -> Markup:
    """Seed 002's component tally as bars: which heads, MLPs and the embeddings write the feature's pre-activation."""
    title = "What writes this feature"
    if not stats.components:
        return section(title, note="No component tallies in this catalog's statistics (collected by `ingest --dataset` "
                                   "for transcoders reading the MLP input).")
    labels = [c.component for c in stats.components]
    chart = svg.bar_chart(labels, [c.contribution for c in stats.components], fmt="{:+.3f}", label=f"component tally of {stats.id}")
    total = sum(c.contribution for c in stats.components)
    return section(title, chart, note=f"Mean direct contribution to the pre-activation over the top {stats.components[0].examples} "
                                      f"activating examples (norm scale frozen at each example's value): the largest terms, then the "
                                      f"encoder and attention biases (`bias`) and the terms not shown (`rest`); they sum to {total:+.3f}.")


def _example_rows(examples, blind: bool = False) -> list[list[object]]:
    return [[f"{i + 1}", f"{e.activation:.3f}", f"{e.context:,}", f"{e.pos}"] + ([] if blind else [token_window(e.tokens, e.firing, e.activation)])
            for i, e in enumerate(examples)]


def _top_examples_section(stats: FeatureStats) -> Markup:
    rows = _example_rows(stats.examples)
    return section("Top activating examples", table(["#", "activation", "context", "pos", "text (firing token marked)"], rows, numeric=(0, 1, 2, 3), cls="examples"),
                   note="The highest activations over the dataset; the window runs from a few tokens before the firing token to a few after.")


def _locations_section(stats: FeatureStats) -> Markup:
    rows = _example_rows(stats.examples, blind=True)
    return section("Top activating example locations", table(["#", "activation", "context", "pos"], rows, numeric=(0, 1, 2, 3), cls="locations"),
                   note="Where the feature fires most strongly (dataset context and position): inputs for input-dependent analysis. Tokens hidden.")


def _interval_title(i) -> str:
    return f"Between {i.lower:.3g} and {i.upper:.3g}: {i.frequency:.4%} of tokens ({i.count:,})"


def _intervals_section(stats: FeatureStats) -> Markup:
    if not stats.intervals:
        return section("Examples by activation interval", note="None in these statistics (collected before interval sampling existed).")
    parts = [tag("h3", _interval_title(i)) + table(["#", "activation", "context", "pos", "text (firing token marked)"], _example_rows(i.examples), numeric=(0, 1, 2, 3), cls="examples")
             for i in stats.intervals]
    return section("Examples by activation interval", *parts, id="intervals",
                   note="The activation range (0, max] in equal intervals, highest first; each shows examples drawn uniformly at random from the tokens in it.")


def _intervals_table(stats: FeatureStats) -> Markup:
    rows = [[f"{i.lower:.3g}", f"{i.upper:.3g}", f"{i.frequency:.4%}", f"{i.count:,}"] for i in stats.intervals]
    return section("Activation intervals", table(["above", "up to", "of tokens", "firing tokens"], rows, numeric=(0, 1, 2, 3)),
                   note="How often the feature fires at each strength (examples hidden).")


def _token_table(title: str, pairs: list[tuple[str, float]]) -> Markup:
    return tag("div", tag("h3", title) + table(["token", "weight"], [[token(t), signed(w)] for t, w in pairs], numeric=(1,)))


def _tokens_section(tokens: FeatureTokens) -> Markup:
    grid = tag("div", join([_token_table("De-embedding (raw)", tokens.deembed), _token_table("De-embedding (extended)", tokens.deembed_extended),
                            _token_table("Logit lens", tokens.logits)]), cls="grid")
    return section("Tokens", grid, note="Input-independent: which input tokens drive the feature directly (raw: W_E; extended: through MLP0 and the reader's norm, "
                                       "MLP0 left out for layer-0 features, which read before it), "
                                       "and which output logits its decoder pushes. The two de-embedding weights are on different "
                                       "scales (compare tokens within a table): raw leaves the reader's norm scale out, extended "
                                       "puts the token's vector through the norm as if it were the whole residual (RMS 1), so it "
                                       "is typically many times larger.")


def _uses_section(uses: list[FeatureUse], blind: bool) -> Markup:
    if not uses:
        return section("In attribution graphs", note="The feature is in no prompt's pruned attribution graph in this catalog "
                                                      "(`circuit-catalog ingest ... --prompts FILE`).")
    rows = [[u.prompt if u.text is None else join([u.text, " ", tag("small", u.prompt)]), u.pos, f"{u.activation:.3f}", f"{u.influence:.4f}",
             join((join([name, " ", signed(w, "{:+.3g}")]) for name, w in u.inputs), " · ")] for u in uses]
    note = ("Input-dependent attributions: where the feature sits in prompts' pruned attribution graphs, its influence on "
            "their logits, and its strongest direct inputs there (edge weight: the source's effect on this feature's pre-activation).")
    if blind:
        note += " Blind mode: token inputs are named by position only."
    return section("In attribution graphs", table(["prompt", "position", "activation", "influence", "strongest inputs"], rows,
                                                  numeric=(1, 2, 3), cls="uses"), note=note)


def interventions_section(uses: list[InterventionUse], edits_column: str) -> Markup:
    """Recorded interventions (`circuit-catalog intervene --catalog`): what was edited and what it did."""
    if not uses:
        return section("Interventions", note="None recorded in this catalog (`circuit-catalog intervene ... --catalog DIR`).")
    rows = [[u.id, u.prompt_id or u.prompt, u.regime, u.edits, f"{u.kl:.4f}",
             join((join([token(t), " ", signed(c)]) for t, c in u.changes[:5]), " · "),
             "" if u.generated_steered is None else f"{u.generated_original!r} → {u.generated_steered!r}"] for u in uses]
    return section("Interventions", table(["intervention", "prompt", "regime", edits_column, "KL", "largest logit changes", "generation"],
                                          rows, numeric=(4,), cls="interventions"),
                   note="Tests of the circuit: feature edits run on the local replacement model and the change they made to "
                        "each target logit (KL: of the next-token distribution, before || after).")


def _edge_table(edges: list[Edge], href: Callable[[str], str | None], normalised: bool) -> Markup:
    rows = [[link(href(e.feature), e.feature), signed(e.weight, "{:+.4f}"), join((token(t) for t in e.tokens), " ")] for e in edges]
    return table(["feature", "normalised weight" if normalised else "raw weight", "its top extended de-embedding tokens"], rows,
                 numeric=(1,), cls="edges")


def _circuit_section(card: FeatureCard, href: Callable[[str], str | None]) -> Markup:
    # three columns (upstream, this feature, downstream), each ordered by layer: with a column per layer,
    # an edge that skips layers would run behind the nodes in between and look as if it came from them
    nodes = {card.id: svg.Node(card.id, card.id, 1, focus=True, title=f"{card.id} (this feature)")}
    for column, edges in ((0, card.upstream), (2, card.downstream)):
        for rank, e in enumerate(edges):
            nodes[e.feature] = svg.Node(e.feature, e.feature, column, order=parse_feature_id(e.feature)[0] * len(edges) + rank,
                                        href=href(e.feature), title=f"{e.feature}: {' '.join(e.tokens)}")
    links = [svg.Link(e.feature, card.id, e.weight) for e in card.upstream] + [svg.Link(card.id, e.feature, e.weight) for e in card.downstream]
    headings = {0: "upstream", 1: "this feature", 2: "downstream"}
    diagram = svg.layered_graph(list(nodes.values()), links, column_label=headings.get, column_width=220,
                                label=f"pullback neighbourhood of {card.id}") if links else Markup("")
    unlinked = sum(href(e.feature) is None for e in card.upstream + card.downstream)
    note = ("Pullback edges (input-independent): an upstream edge is the change in this feature's pre-activation per unit of "
            "the earlier feature along the direct residual path (attention, and the MLPs and skip paths of the layers in "
            "between, left out); a downstream edge, this feature's effect on the later one, likewise. "
            + ("Normalised weights: raw weight times the reading (later) feature's E[1/norm scale] over the statistics' "
               "tokens, so edges into different layers compare. " if card.normalised else
               "Raw weights: the reading (later) feature's norm scale is left out, so downstream edges into layers of large "
               "norm scale look stronger than they act (`--normalise` compares layers). ")
            + "Blue positive, red negative.")
    if unlinked:
        note += f" Features with a dashed underline ({unlinked}) have no card in this directory (write them with --with-neighbours)."
    return section("Circuit", diagram, tag("div", tag("div", tag("h3", "Upstream: what feeds it") + _edge_table(card.upstream, href, card.normalised))
                                            + tag("div", tag("h3", "Downstream: what it feeds") + _edge_table(card.downstream, href, card.normalised)), cls="grid"),
                   note=note)
