"""`Catalog`: every question the CLI answers, as one Python object over a catalog directory and its store.

    from circuit_catalog import Catalog
    with Catalog("catalog") as cat:                     # or Catalog("catalog", store="bolt://host:7687")
        cat.upstream("L8/355").to_pandas()
        cat.prompt_graph("The capital of France is").to_networkx()

Graph lookups go to the store (the embedded one is built or refreshed from the directory on first use);
statistics and SQL go to DuckDB over the Parquet files, so they work without any store. Tabular answers are
`Rows` of dataclasses with `.to_arrow()` / `.to_pandas()`; graphs offer `.to_networkx()`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from circuit_catalog.catalog.store import GraphStore, open_loaded_store, open_store
from circuit_catalog.catalog.ids import parse_feature_id
from circuit_catalog.errors import StoreError, UnknownFeature
from circuit_catalog.queries.caveats import Flag
from circuit_catalog.queries.lookups import (
    Edge,
    FeatureTokens,
    FeatureUse,
    Hit,
    InterventionUse,
    Lookups,
    Neighbourhood,
    PromptUse,
    Recurring,
    WeightPath,
)
from circuit_catalog.queries.diff import GraphDiff
from circuit_catalog.queries.motifs import CoOccurrence, RecurringPath, Supernode
from circuit_catalog.queries.prompt_graph import GraphSummary, PromptGraph, PromptInfo
from circuit_catalog.queries.rows import Rows, rows_of
from circuit_catalog.queries.stats import Component, FeatureStats


@dataclass
class FeatureCard:
    """`show`: a feature's tokens, what feeds it and what it feeds."""

    tokens: FeatureTokens
    upstream: Rows[Edge]
    downstream: Rows[Edge]
    flags: list[Flag]  # likely artefacts (`queries.caveats`), from the activation statistics


@dataclass
class PromptPath:
    """A path through a prompt's graph: its nodes' ids within the prompt, their labels, its attribution (the
    effect of its first node on the target through exactly this path), that as a share of the target's total
    absolute input, and its bottleneck (the smallest edge influence on the target along it): `queries.paths`."""

    nodes: list[str]
    labels: list[str]
    strength: float
    share: float
    bottleneck: float


class Catalog:
    """A catalog directory (from `ingest`) and the graph store that serves its lookups.

    `store` is "embedded" (LadybugDB inside the directory) or a bolt:// / neo4j:// URI (credentials from
    NEO4J_USER / NEO4J_PASSWORD). The store opens on the first lookup that needs it; `close()` (or `with`)
    releases it.
    """

    def __init__(self, directory: str | Path, store: str = "embedded", database: str | None = None, progress: bool = True):
        self.directory = Path(directory)
        self.store_uri = store
        self.database = database
        self.progress = progress
        self._lookups: Lookups | None = None

    def __repr__(self) -> str:
        return f"Catalog({str(self.directory)!r}, store={self.store_uri!r})"

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._lookups is not None:
            self._lookups.store.close()
            self._lookups = None

    @property
    def lookups(self) -> Lookups:
        """The named Cypher lookups on the store, opened (and for the embedded store, brought up to date) once."""
        if self._lookups is None:
            self._lookups = Lookups(open_loaded_store(self.directory, self.store_uri, self.database, progress=self.progress))
        return self._lookups

    @property
    def store(self) -> GraphStore:
        return self.lookups.store

    def load(self, writers: int | None = None) -> bool:
        """Load (or bring up to date) the store from the directory; False if it already was."""
        self.close()
        with open_store(self.directory, self.store_uri, self.database) as store:
            if writers and store.dialect != "neo4j":
                raise StoreError("parallel writers (--writers) applies to Neo4j stores (bolt://...) only")
            return store.load(self.directory, **({"writers": writers} if writers else {}))

    # ------------------------------------------------------------------ the weights graph

    def upstream(self, feature: str, k: int = 10, layer: int | None = None, sign: int | None = None,
                 normalise: bool = False) -> Rows[Edge]:
        """What feeds `feature` (e.g. "L8/355"): its k strongest incoming pullback edges by |weight|; `normalise`: weights
        times the reader's E[1/norm scale] (recorded with the statistics), comparable across layers."""
        return self.lookups.upstream(feature, k, layer, sign, normalise)

    def downstream(self, feature: str, k: int = 10, layer: int | None = None, sign: int | None = None,
                   normalise: bool = False) -> Rows[Edge]:
        """What `feature` feeds: its k strongest outgoing pullback edges by |weight|; `normalise`: weights times each
        reader's E[1/norm scale], so edges into different layers compare (the raw ones favour layers of large scale)."""
        return self.lookups.downstream(feature, k, layer, sign, normalise)

    def tokens(self, feature: str, k: int = 10) -> FeatureTokens:
        """The feature's raw and extended de-embedding and logit-lens tokens."""
        return self.lookups.tokens(feature, k)

    def show(self, feature: str, k: int = 10, normalise: bool = False) -> FeatureCard:
        return FeatureCard(self.tokens(feature, k), self.upstream(feature, k, normalise=normalise),
                           self.downstream(feature, k, normalise=normalise), self.flags(feature))

    def flags(self, feature: str) -> list[Flag]:
        """The feature's artefact flags (sink-like, dense) and its layer's (near-dead), from the activation statistics
        (`queries.caveats` defines them); empty without statistics."""
        import pyarrow.parquet as pq

        from circuit_catalog.catalog import layout
        from circuit_catalog.queries.caveats import flags_of

        parse_feature_id(feature)
        if not pq.read_table(self.directory / layout.FEATURES, columns=["id"], filters=[("id", "==", feature)]).num_rows:
            raise UnknownFeature(f"unknown feature {feature}: not in this catalog")
        return flags_of(self.directory, feature)

    def layer_flags(self) -> dict[int, list[Flag]]:
        """Near-dead layers (mean L0 < 1 or most features dead), by layer."""
        from circuit_catalog.queries.caveats import layer_flags

        return layer_flags(self.directory)

    def evaluation(self) -> dict | None:
        """The transcoders' evaluation (`circuit-catalog eval --out CATALOG/eval.json`: FVU, CE loss recovered), or None."""
        from circuit_catalog.queries.caveats import catalog_eval

        return catalog_eval(self.directory)

    def rare_warning(self) -> str | None:
        """Why the statistics cannot call a feature rarely firing (too few tokens counted), or None."""
        from circuit_catalog.queries.caveats import rare_warning

        return rare_warning(self.directory)

    def search(self, token: str, k: int = 20) -> Rows[Hit]:
        """Features whose top de-embedding or logit-lens tokens include `token`."""
        return self.lookups.search(token, k)

    def paths(self, from_token: str, to_logit: str, k: int = 10, max_hops: int = 2, beam: int = 256,
              starts: list[dict] | None = None, ends: list[dict] | None = None) -> Rows[WeightPath]:
        """The strongest token -> feature (-> feature ...) -> logit paths in the weights graph; `starts` / `ends`:
        first and last hops computed from the weights (`ingest.token_lens.token_ends`) instead of the stored top K."""
        return self.lookups.paths(from_token, to_logit, k=k, max_hops=max_hops, beam=beam, starts=starts, ends=ends)

    def why_no_paths(self, from_token: str, to_logit: str, max_hops: int) -> str:
        """Why `paths(from_token, to_logit)` is empty, in words, with what to try."""
        starts, ends = self.lookups.path_ends(from_token, to_logit)
        from circuit_catalog.catalog.manifest import Manifest

        top = Manifest.read(self.directory).token_top_k
        if not starts:
            return (f"no feature has {from_token!r} among its top {top} de-embedding tokens, so no path starts there; "
                    f"give --model and --transcoders to compute the ends from the weights, try `search {from_token.strip()}`, "
                    "or a prompt's graph (`paths --prompt`)")
        if not ends:
            return (f"no feature has {to_logit!r} among its top {top} logit-lens tokens, so no path ends there; "
                    f"give --model and --transcoders to compute the ends from the weights, try `search {to_logit.strip()}`, "
                    "or a prompt's graph (`paths --prompt`), whose edges into the logit are computed for every token")
        return (f"{starts} features start from {from_token!r} and {ends} end at {to_logit!r}, but no chain of at most "
                f"{max_hops} kept pullback edges joins them; try a larger --max-hops or --beam")

    def neighbourhood(self, feature: str, depth: int = 1, k: int = 5) -> Neighbourhood:
        """The feature's pullback neighbourhood (`.to_networkx()` for your own graph algorithms)."""
        return self.lookups.neighbourhood(feature, depth, k)

    def heads(self, feature: str, k: int = 10, head: str | None = None, layer: int | None = None):
        """Which earlier features and tokens reach `feature` through which attention heads (OV pullbacks per head;
        a catalog ingested with `heads_top_k`): a `HeadInputs`."""
        from circuit_catalog.queries.heads import head_inputs

        return head_inputs(self.lookups, feature, k, head, layer)

    # ------------------------------------------------------------------ prompts

    def prompts(self) -> Rows[PromptInfo]:
        """The prompts with attribution graphs, with their scores."""
        return self.lookups.prompts()

    def prompt_graph(self, prompt: str) -> PromptGraph:
        """A prompt's pruned attribution graph, by id or exact text."""
        return self.lookups.prompt_graph(prompt)

    def graph_summary(self, prompt: str, k: int = 15) -> GraphSummary:
        """Scores, node and edge counts, logit targets and the k most influential nodes of a prompt's graph, labelled
        (`PromptGraph.describe`), with the features' and layers' flags, the transcoders' quality and a warning when
        the replacement score is low."""
        from circuit_catalog.queries.caveats import feature_flags, quality_line

        summary = self.prompt_graph(prompt).summary(k)
        summary.flags = feature_flags(self.directory, sorted({n.feature_id for n in summary.top if n.feature_id}))
        summary.layer_flags = self.layer_flags()
        summary.quality = quality_line(self.evaluation())
        return summary

    def prompt_paths(self, prompt: str, to_logit: str, from_token: str | int | None = None, k: int = 10,
                     greedy: bool = False, iters: int = 3, branches: int = 5, rank: str = "bottleneck",
                     via: str | None = None, no_errors: bool = False, min_hops: int = 1) -> Rows[PromptPath]:
        """The k best paths from the token(s) at a position or with a text (every token if None) to a logit target,
        ranked by `rank` ("bottleneck": the smallest edge influence on the target along the path; "attribution":
        the path's own effect on the target; `queries.paths`), through the feature `via` (`L8/355`, or `L8/355@4`
        at one position), avoiding error nodes (`no_errors`), with at least `min_hops` edges; `greedy`: the seed's
        greedy search back from the logit (`iters` edges, `branches` paths per step)."""
        graph, found = self.lookups.prompt_paths(prompt, to_logit, from_token, k, greedy, iters, branches, rank, via,
                                                 no_errors, min_hops)
        return rows_of(PromptPath, (PromptPath([graph.nodes[i].local for i in p.nodes], [graph.nodes[i].label for i in p.nodes],
                                               p.strength, p.share, p.bottleneck) for p in found))

    def diff(self, a: str, b: str, target: str | None = None, k: int = 20) -> GraphDiff:
        """Two prompts' pruned graphs (ids or exact texts) aligned by node and position (the shared token prefix one to
        one, the rest from the end), with the k nodes and k edges whose attribution to the target changes most from
        `a` to `b`. The target is the logit with token text `target` in both, else each prompt's own (`queries.diff`)."""
        from circuit_catalog.queries.diff import diff_graphs

        return diff_graphs(self.prompt_graph(a), self.prompt_graph(b), target, k)

    def prompts_using(self, feature: str, k: int = 20) -> Rows[PromptUse]:
        """Prompts whose pruned graph contains the feature, by its influence there."""
        return self.lookups.prompts_using(feature, k)

    def feature_uses(self, feature: str, k: int = 10) -> Rows[FeatureUse]:
        """The feature's most influential occurrences in prompt graphs, with their strongest inputs."""
        return self.lookups.feature_uses(feature, k)

    def recurring(self, k: int = 20) -> Rows[Recurring]:
        """Features in the most prompts' pruned graphs."""
        return self.lookups.recurring(k)

    def supernodes(self, prompt: str | None = None, feature: str | None = None) -> Rows[Supernode]:
        """Groups of features playing one role: a prompt's (id or text; None: over the whole prompt set), or those
        holding `feature`."""
        from circuit_catalog.queries.motifs import supernodes

        return supernodes(self.lookups, prompt, feature)

    def cooccurring(self, feature: str, k: int = 20) -> Rows[CoOccurrence]:
        """Features found in the same prompts' pruned graphs as `feature`, by the number of prompts shared."""
        from circuit_catalog.queries.motifs import cooccurring

        return cooccurring(self.lookups, feature, k)

    def recurring_paths(self, hops: int = 1, k: int = 20) -> Rows[RecurringPath]:
        """Edges (`hops=1`) or two-edge paths (`hops=2`) of pruned graphs that recur across prompts, positions aside."""
        from circuit_catalog.queries.motifs import recurring_paths

        return recurring_paths(self.lookups, hops, k)

    def interventions(self, feature: str, k: int = 20) -> Rows[InterventionUse]:
        """Recorded interventions that edited the feature, newest first."""
        return self.lookups.interventions(feature, k)

    # ------------------------------------------------------------------ statistics, SQL, Cypher

    def stats(self, feature: str, k: int = 10) -> FeatureStats:
        """Activation statistics and examples (DuckDB over DIR/stats/; no store needed)."""
        from circuit_catalog.queries.stats import feature_stats

        return feature_stats(self.directory, feature, k)

    def components(self, feature: str) -> Rows[Component]:
        """What embeddings, each attention head and each MLP write directly into `feature`'s pre-activation, averaged
        over its top activating examples (largest first, then `bias` and `rest`; the rows sum to the mean
        pre-activation). Collected with the statistics."""
        from circuit_catalog.queries.stats import feature_components

        return Rows(feature_components(self.directory, feature))

    def sql(self, query: str) -> Rows[dict]:
        """A read-only DuckDB query over the catalog's Parquet views (features, pullbacks, stats, ...)."""
        from circuit_catalog.queries.sql import run_sql

        columns, rows = run_sql(self.directory, query)
        return Rows((dict(zip(columns, row)) for row in rows), columns)

    def cypher(self, query: str, params: dict[str, Any] | None = None, write: bool = False) -> Rows[dict]:
        """A Cypher statement on the store, with parameters; read-only unless `write`."""
        rows = self.store.cypher(query, params or {}, write=write)
        return Rows(rows, list(rows[0]) if rows else [])

    # ------------------------------------------------------------------ reports and exports

    def report_feature(self, features: Iterable[str], out_dir: Path | None = None, k: int = 10, blind: bool = False,
                       with_neighbours: bool = False, normalise: bool = False) -> list[Path]:
        """Feature cards (HTML), edges by raw or `normalise`d weight (see `upstream`); returns the files written."""
        from circuit_catalog.queries.reports.feature import write_feature_cards

        return write_feature_cards(self.lookups, self.directory, list(features), out_dir, k, blind, with_neighbours, normalise)

    def report_prompt(self, prompt: str, out_file: Path | None = None, max_nodes: int = 60, k: int = 10) -> Path:
        """A prompt's graph report (HTML)."""
        from circuit_catalog.queries.reports.prompt import write_prompt_report

        return write_prompt_report(self.lookups, self.directory, prompt, out_file, max_nodes=max_nodes, k=k)

    def report_overview(self, out_file: Path | None = None, eval_file: Path | None = None) -> Path:
        """The catalog overview (HTML): layers, quality, weight distribution, prompts."""
        from circuit_catalog.queries.reports.overview import write_overview

        return write_overview(self.directory, out_file, eval_file)

    def export_neuronpedia(self, prompt: str, out_file: Path, heads: bool = False) -> dict:
        """A prompt's graph as circuit-tracer / Neuronpedia JSON (graph-metadata.json beside it lists it); `heads`
        adds which attention heads carried each link and, in each node's label, its inputs."""
        from circuit_catalog.queries.neuronpedia import export_neuronpedia

        return export_neuronpedia(self.directory, prompt, Path(out_file), heads)
