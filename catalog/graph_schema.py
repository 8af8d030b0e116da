"""What a catalog directory becomes in a graph store: node and relationship sets and their Parquet sources.

Both backends read this one description, so they cannot drift apart; `catalog_signature` covers it with
the catalog's content, so a store built for another schema is rebuilt. Property names follow the
Parquet columns (`index` is a reserved word in LadybugDB's Cypher: write it as `f.\\`index\\``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from circuit_catalog.catalog import layout
from circuit_catalog.catalog.manifest import Manifest

from circuit_catalog.errors import CatalogDirError


@dataclass(frozen=True)
class NodeSet:
    label: str
    columns: tuple[tuple[str, str], ...]  # (name, type) in load order; the first is the key
    files: str  # glob relative to the catalog directory
    lookups: tuple[str, ...] = ()  # non-key properties named queries find nodes by: each gets an index

    @property
    def key(self) -> str:
        return self.columns[0][0]


@dataclass(frozen=True)
class RelSet:
    type: str
    source: str  # label of the start node, keyed by the Parquet column `src`
    target: str  # label of the end node, keyed by `dst`
    properties: tuple[tuple[str, str], ...]  # columns after src, dst
    files: str


def node_set(label: str) -> NodeSet:
    return next(n for n in NODES if n.label == label)


NODES = (
    # the top-token summaries ride on the node, so a lookup needs no second traversal to orient the reader
    NodeSet("Feature", (("id", "STRING"), ("layer", "INT64"), ("index", "INT64"), ("transcoder", "STRING"),
                        ("deembed_tokens", "STRING[]"), ("deembed_ext_tokens", "STRING[]"), ("logit_tokens", "STRING[]"),
                        ("frequency", "DOUBLE"), ("mean_act", "FLOAT"), ("max_act", "FLOAT"),  # null until stats exist
                        ("inv_scale", "DOUBLE")),  # the layer's E[1/norm scale] (stats/layers.parquet): `--normalise`
            layout.FEATURES, lookups=("layer",)),  # upstream/downstream --layer
    NodeSet("Token", (("id", "INT64"), ("text", "STRING")), layout.TOKENS, lookups=("text",)),  # search, paths
    NodeSet("Prompt", (("id", "STRING"), ("text", "STRING"), ("target", "STRING"), ("n_tokens", "INT64"),
                       ("replacement_score", "FLOAT"), ("completeness_score", "FLOAT")), layout.PROMPT_INDEX,
            lookups=("text",)),  # a prompt is found by its text as well as its id
    # every node of every prompt's graph; `kept` marks the pruned graph, which is what ATTR edges hold
    NodeSet("PNode", (("id", "STRING"), ("prompt_id", "STRING"), ("kind", "STRING"), ("layer", "INT64"), ("pos", "INT64"),
                      ("feature_index", "INT64"), ("feature_id", "STRING"), ("token_id", "INT64"), ("token", "STRING"), ("activation", "FLOAT"),
                      ("value", "FLOAT"), ("bias", "FLOAT"), ("influence", "FLOAT"), ("probability", "FLOAT"),
                      ("kept", "BOOLEAN")), layout.prompt_part_glob("nodes"),
            lookups=("prompt_id",)),  # one prompt's graph among every prompt's nodes
    # `intervene --catalog`: what was edited and what it did (per-target logit changes on CHANGES)
    NodeSet("Intervention", (("id", "STRING"), ("prompt_id", "STRING"), ("prompt", "STRING"), ("regime", "STRING"),
                             ("spec", "STRING"), ("kl", "DOUBLE"), ("top_before", "STRING[]"), ("top_after", "STRING[]"),
                             ("generated_original", "STRING"), ("generated_steered", "STRING"), ("created", "STRING")),
            layout.INTERVENTIONS),
    # attention heads (`ingest.heads`): `L7H3`; OV and ATTR_HEAD edges name theirs in a `head` property
    NodeSet("Head", (("id", "STRING"), ("layer", "INT64"), ("head", "INT64"), ("kv_head", "INT64")), layout.HEAD_INDEX),
    # features playing one role (`ingest.supernodes`): per prompt (`prompt_id`) and over the prompt set (`prompt_id` "")
    NodeSet("Supernode", (("id", "STRING"), ("prompt_id", "STRING"), ("name", "STRING"), ("size", "INT64"), ("influence", "FLOAT")),
            layout.SUPERNODES, lookups=("prompt_id",)),
    # the features of the prompts' pruned graphs counted over the prompt set (`catalog.tallies`), keyed by their rank in
    # `recurring`'s order, so the top k are k key lookups instead of an aggregation over every prompt's nodes
    NodeSet("FeatureTally", (("rank", "INT64"), ("feature", "STRING"), ("prompts", "INT64"), ("influence", "DOUBLE")),
            layout.FEATURE_TALLY),
)
RELS = (
    RelSet("PULLBACK", "Feature", "Feature", (("weight", "FLOAT"),), layout.PULLBACK_PARTS),
    RelSet("DEEMBED", "Token", "Feature", (("weight", "FLOAT"), ("variant", "STRING")), layout.DEEMBED_PARTS),
    RelSet("LOGIT", "Feature", "Token", (("weight", "FLOAT"),), layout.LOGIT_PARTS),
    RelSet("ATTR", "PNode", "PNode", (("weight", "FLOAT"),), layout.prompt_part_glob("edges")),
    # each ATTR edge's terms per attention head (the last head its paths cross), `direct` and `other`: parallel
    # edges beside ATTR, which stays as it was; a row per (edge, head), so "edges carried by L7H3" is a property test
    RelSet("ATTR_HEAD", "PNode", "PNode", (("head", "STRING"), ("weight", "FLOAT")), layout.prompt_part_glob("edges_heads")),
    RelSet("INSTANCE_OF", "PNode", "Feature", (), layout.prompt_part_glob("links_feature")),
    RelSet("INSTANCE_OF", "PNode", "Token", (), layout.prompt_part_glob("links_token")),
    RelSet("ON", "Intervention", "Prompt", (), layout.INTERVENTION_ON),
    RelSet("TOUCHES", "Intervention", "Feature", (("edits", "STRING"),), layout.INTERVENTION_TOUCHES),
    RelSet("CHANGES", "Intervention", "Token", (("before", "FLOAT"), ("after", "FLOAT"), ("change", "FLOAT")), layout.INTERVENTION_CHANGES),
    # OV pullbacks per head: a (source, head, target) triple is an edge with the head's id as a property, so "which
    # earlier features reach f through which heads" is one hop into f
    RelSet("OV", "Feature", "Feature", (("weight", "FLOAT"), ("head", "STRING")), f"{layout.OV}/*.parquet"),
    RelSet("OV_TOKEN", "Token", "Feature", (("weight", "FLOAT"), ("head", "STRING")), f"{layout.OV_TOKENS}/*.parquet"),
    RelSet("GROUPS", "Supernode", "Feature", (), layout.SUPERNODE_MEMBERS),
)


def absent_columns(columns: Iterable[str], files: list[Path]) -> set[str]:
    """The columns none of `files` holds: parts written before the schema gained them (Feature `inv_scale` in a catalog
    from before the norm scales were recorded). Every loader takes them as null, as it would a null column."""
    import pyarrow.parquet as pq

    held = set().union(*(pq.read_schema(f).names for f in files)) if files else set()
    return {c for c in columns if c not in held}


def catalog_signature(catalog_dir: Path) -> str:
    """Changes whenever the catalog's content could have, or the schema a store holds it in: compared by stores
    to decide on a reload (a store built for an older schema lacks properties the named queries read)."""
    m = Manifest.read(Path(catalog_dir))
    if m.status != "complete":
        raise CatalogDirError(f"{catalog_dir}: the ingest has not finished; rerun the same ingest command to complete it")
    root = Path(catalog_dir)
    stats_info = layout.stats_info(root)
    stats = stats_info.read_text() if stats_info.is_file() else None
    blob = json.dumps({"identity": m.identity(), "completed": m.completed, "counts": m.counts, "stats": stats,
                       "prompts": digest(root / layout.PROMPT_INDEX), "schema": repr((NODES, RELS)),
                       # each digest keyed by the part written last of its set
                       "supernodes": digest(root / layout.SUPERNODES, root / layout.SUPERNODE_MEMBERS),
                       "interventions": digest(root / layout.INTERVENTION_CHANGES, root / layout.INTERVENTIONS)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def digest(last: Path, *others: Path) -> str | None:
    """sha256 of a set of files, None when the one written last is absent (the set was never written)."""
    if not last.is_file():
        return None
    return hashlib.sha256(b"".join(p.read_bytes() for p in (last, *others))).hexdigest()
