"""Structure across prompts: supernodes (features grouped by role, `ingest.supernodes`), features that co-occur in
graphs, and edges and paths that recur across prompts. Each is one named Cypher query over the store."""

from __future__ import annotations

from dataclasses import dataclass

from circuit_catalog.catalog.ids import parse_feature_id
from circuit_catalog.queries.lookups import Lookups
from circuit_catalog.queries.rows import Rows, rows_of


@dataclass
class Supernode:
    id: str
    prompt: str  # the prompt whose graph it groups; "" for the whole prompt set
    name: str  # the members' most common top tokens: `→` logit lens, `←` de-embedding
    influence: float
    members: list[str]  # feature ids, sorted


@dataclass
class CoOccurrence:
    feature: str
    prompts: int  # prompts whose pruned graphs hold both features
    influence: float  # the partner's summed influence in those graphs


@dataclass
class RecurringPath:
    """A path of pruned-graph edges, positions aside: its nodes (feature ids, or token texts for tokens and logits, with
    their kinds) and in how many prompts it occurs, with its summed weight (product of its weights, per occurrence)."""

    nodes: list[str]
    kinds: list[str]
    prompts: int
    weight: float


def supernodes(lookups: Lookups, prompt: str | None = None, feature: str | None = None) -> Rows[Supernode]:
    """A prompt's supernodes (`prompt`; "" or None: those over the whole prompt set), or those holding `feature`."""
    if feature is not None:
        lookups.check_feature(feature)
        found = lookups._q("supernodes_feature", id=feature)
    else:
        if prompt:
            prompt = lookups.prompt(prompt).id
        found = lookups._q("supernodes_prompt", id=prompt or "")
    return rows_of(Supernode, (Supernode(r["id"], r.get("prompt", prompt or ""), r["name"], float(r["influence"]),
                                         sorted(r["members"], key=parse_feature_id)) for r in found))


def cooccurring(lookups: Lookups, feature: str, k: int = 20) -> Rows[CoOccurrence]:
    """Features in the same prompts' pruned graphs as `feature`, by shared prompts."""
    lookups.check_feature(feature)
    return rows_of(CoOccurrence, (CoOccurrence(r["feature"], int(r["prompts"]), float(r["influence"] or 0.0))
                                  for r in lookups._q("cooccur", id=feature, k=k)))


def recurring_paths(lookups: Lookups, hops: int = 1, k: int = 20) -> Rows[RecurringPath]:
    """Edges (`hops` 1) or two-edge paths (2) of pruned graphs found in the most prompts."""
    if hops == 1:
        return rows_of(RecurringPath, (RecurringPath([r["source"], r["target"]], [r["source_kind"], r["target_kind"]],
                                                     int(r["prompts"]), float(r["weight"])) for r in lookups._q("recurring_edges", k=k)))
    if hops == 2:
        return rows_of(RecurringPath, (RecurringPath([r["source"], r["via"], r["target"]], [r["source_kind"], "feature", r["target_kind"]],
                                                     int(r["prompts"]), float(r["weight"])) for r in lookups._q("recurring_paths", k=k)))
    raise ValueError(f"hops={hops}: recurring paths have 1 or 2 edges")
