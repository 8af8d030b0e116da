"""Lookups about attention heads over a graph store: which earlier features and tokens reach a feature through
which heads (the OV pullbacks per head of `ingest.heads`), as dataclasses for the CLI, reports and Python."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from circuit_catalog.catalog import layout
from circuit_catalog.catalog.ids import parse_head_id
from circuit_catalog.errors import CatalogDirError, UnknownHead
from circuit_catalog.queries.lookups import Lookups

if TYPE_CHECKING:  # the store lookups below need no torch; qk_for_prompt imports the model side when called
    from circuit_catalog.ingest.qk import QKAttribution
    from circuit_catalog.ingest.transcoder import TranscoderSet


@dataclass
class HeadInput:
    """One OV pullback: `source` reaches the feature through `head` with `weight` (per unit, pattern 1, scales out)."""

    source: str  # feature id, or token text for token sources
    head: str  # e.g. L7H3
    weight: float
    tokens: list[str] = field(default_factory=list)  # a feature source's top extended de-embedding tokens


@dataclass
class HeadInputs:
    feature: str
    features: list[HeadInput]
    tokens: list[HeadInput]


def head_inputs(lookups: Lookups, fid: str, k: int = 10, head: str | None = None, layer: int | None = None,
                n_tokens: int = 5) -> HeadInputs:
    """The k strongest feature sources and the k strongest token sources of `fid` through attention heads (all, or
    one `head`; feature sources of one `layer`), strongest |weight| first."""
    lookups.check_feature(fid)
    if head is not None:
        parse_head_id(head)
    if not lookups._q("head", id=""):
        raise CatalogDirError("this catalog has no attention-head edges: ingest it with --heads-top-k K")
    if head is not None and not lookups._q("head", id=head):
        raise UnknownHead(f"unknown head {head}: not in this model")
    rows = lookups._q("heads", id=fid, k=k, head=head or "", layer=-1 if layer is None else layer)
    features = [HeadInput(r["source"], r["head"], float(r["weight"]), list(r["tokens"] or [])[:n_tokens]) for r in rows]
    tokens = [HeadInput(r["token"], r["head"], float(r["weight"])) for r in lookups._q("heads_tokens", id=fid, k=k, head=head or "")]
    return HeadInputs(fid, features, tokens)


def qk_for_prompt(model, tset: TranscoderSet, prompt: str, head: str, query_pos: int, key_pos: int,
                  catalog_dir: Path | None = None) -> QKAttribution:
    """QK attribution on a catalog prompt (by id or text, on the token ids its graph was built on) or on any text."""
    from circuit_catalog.ingest.attribution import prompt_tokens
    from circuit_catalog.ingest.qk import qk_attribution
    from circuit_catalog.queries.intervention_runs import graph_tokens
    from circuit_catalog.queries.prompt_graph import prompt_record

    if catalog_dir is not None and (Path(catalog_dir) / layout.PROMPT_INDEX).is_file():
        tokens, zero_bos = graph_tokens(model, prompt_record(catalog_dir, prompt))
    else:
        tokens, zero_bos = prompt_tokens(model, prompt), True
    return qk_attribution(model, tset, tokens, head, query_pos, key_pos, zero_bos)


def edge_heads(lookups: Lookups, prompt_id: str) -> dict[tuple[str, str], list[tuple[str, float]]]:
    """A prompt's pruned edges split by head: (src, dst) -> [(head, term)], largest |term| first; `direct` is the part
    through no head and `other` the heads beyond the stored top ones. Empty for a prompt computed without them."""
    return by_edge(lookups._q("prompt_edge_heads", id=prompt_id))


def by_edge(rows: Iterable[dict]) -> dict[tuple[str, str], list[tuple[str, float]]]:
    """Rows (src, dst, head, weight) of edges_heads grouped by edge, largest |term| first."""
    found: dict[tuple[str, str], list[tuple[str, float]]] = {}
    for r in rows:
        found.setdefault((r["src"], r["dst"]), []).append((r["head"], float(r["weight"])))
    for terms in found.values():
        terms.sort(key=lambda t: -abs(t[1]))
    return found


def carried_by(terms: list[tuple[str, float]], weight: float, n: int = 3) -> str:
    """'L7H3 62%, L9H1 20%, direct 10%': each term's share of the edge's weight (shares of a signed sum: they add to
    100% and may exceed it where terms cancel)."""
    if not weight:
        return ""
    return ", ".join(f"{head} {term / weight:.0%}" for head, term in terms[:n])
