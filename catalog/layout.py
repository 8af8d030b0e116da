"""Where each part of a catalog directory lives, the column schemas of its Parquet files, and the format
version they make up (`FORMAT`). The file name of every catalog part is written here and nowhere else.

Columns follow the graph schema (`catalog.graph_schema`): ids are those of `catalog.ids`, edges have
`src`, `dst`, `weight` (float32).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

# Raised when a part's name or columns change so that an older catalog would be misread (2: the prompt-graph
# node column `feature` became `feature_index`); the manifest records it and a catalog of another is refused.
FORMAT = 2
MANIFEST = "manifest.json"
FEATURES = "features.parquet"
TOKENS = "tokens.parquet"
PULLBACKS = "pullbacks"  # pullbacks/L{lo:03d}_to_L{hi:03d}.parquet (`pullback_part`)
DEEMBED = "deembed"  # deembed/L{layer:03d}.parquet (`deembed_part`)
LOGITS = "logits"  # logits/L{layer:03d}.parquet (`logit_part`)
STATS = "stats"  # stats/<part>.parquet for each of STATS_PARTS (`stats_file`), and stats/info.json (`stats_info`)
STATS_PARTS = ("features", "top_examples", "quantile_examples", "tokens", "components", "layers")  # components: when computable
STATS_INFO = "info.json"  # what the statistics were collected from, and each part's rows
TRAINING = "training.json"  # the transcoders' training record and curve, copied by ingest when `train` wrote them
EVAL = "eval.json"  # optional: `circuit-catalog eval --out DIR/eval.json`, read by the overview report
REPORTS = "reports"  # default directory for HTML reports
PROMPTS = "prompts"  # prompts/<prompt_id>/: prompt.json (`prompt_info`) and <part>.parquet for each of PROMPT_PARTS (`prompt_part`)
PROMPT_PARTS = ("nodes", "edges", "edges_full", "links_feature", "links_token", "edges_heads")
PROMPT_INFO = "prompt.json"
PROMPT_INDEX = "prompts.parquet"
# `intervene --catalog`: one row per intervention (INTERVENTION_SCHEMA), and the store's links derived from it:
# (:Intervention)-[:ON]->(:Prompt), -[:TOUCHES {edits}]->(:Feature), -[:CHANGES {before, after, change}]->(:Token)
INTERVENTIONS = "interventions.parquet"
INTERVENTION_ON = "interventions_on.parquet"
INTERVENTION_TOUCHES = "interventions_touches.parquet"
INTERVENTION_CHANGES = "interventions_changes.parquet"
# Attention heads (`ingest.heads`): OV pullbacks per head, `heads/ov/A{m}_L{L}.parquet` (feature sources) and
# `heads/ov_tokens/A{m}_L{L}.parquet` (token sources) for attention layer m into transcoder layer L, and the
# Head nodes `heads/heads.parquet`
HEADS = "heads"
OV = "heads/ov"
OV_TOKENS = "heads/ov_tokens"
HEAD_INDEX = "heads/heads.parquet"
# supernodes (`ingest.supernodes`): groups of features playing one role, per prompt (`prompt_id`) and over the prompt
# set (`prompt_id` ""), and their members (:Supernode)-[:GROUPS]->(:Feature)
SUPERNODES = "supernodes.parquet"
SUPERNODE_MEMBERS = "supernode_members.parquet"
# per feature of any pruned prompt graph: in how many prompts, its summed influence and its rank (`catalog.tallies`,
# FEATURE_TALLY_SCHEMA), derived from the prompt parts and rewritten whenever the prompt set changes
FEATURE_TALLY = "feature_tally.parquet"
GRAPH = "graph"  # the embedded store's database file (graph.wal, graph.shadow beside it while open)
INGEST_RECEIPT = "ingest-receipt.json"  # what the last ingest was asked, for a rerun with nothing to do (`ingest.receipt`)
WRITER_LOCK = ".writer.lock"  # held by the one process writing the catalog or its embedded store

# Globs relative to the catalog directory, for `part_files` and the graph schema
PULLBACK_PARTS = f"{PULLBACKS}/*.parquet"
DEEMBED_PARTS = f"{DEEMBED}/*.parquet"
LOGIT_PARTS = f"{LOGITS}/*.parquet"
OV_PARTS = f"{OV}/*.parquet"
OV_TOKEN_PARTS = f"{OV_TOKENS}/*.parquet"
PROMPT_INFOS = f"{PROMPTS}/*/{PROMPT_INFO}"

# Crash leftovers: everything written under a temporary name has a hidden one, `.<name>.tmp-*`
# (parts, the stats and prompt directories) or `.graph.loading-*` (a store being built)
TEMPORARY = (".*.tmp-*", f".{GRAPH}.loading-*")

# stats/features.parquet `log10_histogram`: counts of positive activations over HIST_BINS equal bins
# of log10(activation) from HIST_LOG10_MIN to HIST_LOG10_MAX (values outside fall into the end bins)
HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS = -4.0, 4.0, 64


def histogram_log10_edges() -> list[float]:
    """The HIST_BINS + 1 bin edges of `log10_histogram`, in log10(activation)."""
    step = (HIST_LOG10_MAX - HIST_LOG10_MIN) / HIST_BINS
    return [HIST_LOG10_MIN + i * step for i in range(HIST_BINS + 1)]


PULLBACK_SCHEMA = pa.schema([("src", pa.string()), ("dst", pa.string()), ("weight", pa.float32())])
DEEMBED_SCHEMA = pa.schema(
    [("src", pa.int64()), ("dst", pa.string()), ("weight", pa.float32()), ("variant", pa.string())]
)
LOGIT_SCHEMA = pa.schema([("src", pa.string()), ("dst", pa.int64()), ("weight", pa.float32())])
OV_SCHEMA = pa.schema([("src", pa.string()), ("dst", pa.string()), ("weight", pa.float32()), ("head", pa.string())])
OV_TOKEN_SCHEMA = pa.schema([("src", pa.int64()), ("dst", pa.string()), ("weight", pa.float32()), ("head", pa.string())])
HEAD_SCHEMA = pa.schema([("id", pa.string()), ("layer", pa.int64()), ("head", pa.int64()), ("kv_head", pa.int64())])
TOKEN_SCHEMA = pa.schema([("id", pa.int64()), ("text", pa.string())])
# stats/layers.parquet (`ingest.stats`): per transcoder layer, the mean over the statistics' tokens (BOS left out) of
# 1 / the norm scale at its input (`hook_scale`, e.g. blocks.L.ln2.hook_scale; null and inv_scale 1 for a raw-residual reader)
LAYER_SCALE_SCHEMA = pa.schema([("layer", pa.int32()), ("hook_scale", pa.string()), ("inv_scale", pa.float64())])
# component tallies (`ingest.components`): a feature's mean direct terms over its top examples; `component` is `embed`,
# a Head id (`L7H3`), `MLP{m}`, `bias` or `rest` (the terms not kept); a feature's rows sum to its mean pre-activation
COMPONENT_SCHEMA = pa.schema([
    ("feature", pa.string()), ("component", pa.string()), ("kind", pa.string()), ("layer", pa.int32()), ("head", pa.int32()),
    ("contribution", pa.float32()), ("examples", pa.int32()),
])

# One prompt's attribution graph. Node ids are written and read by `catalog.ids` (`<prompt_id>:L8/355@3`, ...);
# layer is -1 for tokens and n_layers for logits.
PNODE_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt_id", pa.string()), ("kind", pa.string()), ("layer", pa.int32()),
    ("pos", pa.int32()), ("feature_index", pa.int32()), ("feature_id", pa.string()), ("token_id", pa.int64()),
    ("token", pa.string()), ("activation", pa.float32()), ("value", pa.float32()), ("bias", pa.float32()),
    ("dropped", pa.float32()), ("probability", pa.float32()), ("influence", pa.float32()), ("kept", pa.bool_()),
])
ATTR_SCHEMA = pa.schema([("src", pa.string()), ("dst", pa.string()), ("weight", pa.float32())])
# per-head terms of each pruned edge (`ingest.head_terms`): `head` is a Head id (`L7H3`), `direct` (no attention on
# the path) or `other` (the heads beyond the top ones); an edge's rows sum to its ATTR weight
ATTR_HEAD_SCHEMA = pa.schema([("src", pa.string()), ("dst", pa.string()), ("head", pa.string()), ("weight", pa.float32())])
SUPERNODE_SCHEMA = pa.schema([("id", pa.string()), ("prompt_id", pa.string()), ("name", pa.string()), ("size", pa.int64()),
                              ("influence", pa.float32())])
SUPERNODE_MEMBER_SCHEMA = pa.schema([("src", pa.string()), ("dst", pa.string())])
FEATURE_TALLY_SCHEMA = pa.schema([("rank", pa.int64()), ("feature", pa.string()), ("prompts", pa.int64()), ("influence", pa.float64())])
PROMPT_SCHEMA = pa.schema([
    ("id", pa.string()), ("text", pa.string()), ("target", pa.string()), ("n_tokens", pa.int32()),
    ("replacement_score", pa.float32()), ("completeness_score", pa.float32()), ("n_active_features", pa.int32()),
    ("n_feature_nodes", pa.int32()), ("capped", pa.bool_()), ("n_kept_nodes", pa.int32()), ("n_kept_edges", pa.int32()),
    ("settings", pa.string()),
])

INTERVENTION_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt_id", pa.string()), ("prompt", pa.string()), ("regime", pa.string()),
    ("spec", pa.string()), ("features", pa.list_(pa.string())), ("feature_edits", pa.list_(pa.string())),
    ("target_ids", pa.list_(pa.int64())), ("target_tokens", pa.list_(pa.string())),
    ("logit_before", pa.list_(pa.float32())), ("logit_after", pa.list_(pa.float32())), ("logit_change", pa.list_(pa.float32())),
    ("kl", pa.float64()), ("top_before", pa.list_(pa.string())), ("top_after", pa.list_(pa.string())),
    ("generated_original", pa.string()), ("generated_steered", pa.string()), ("created", pa.string()),
])


def temporaries(root: Path) -> list[Path]:
    """Every temporary in the catalog: stale whenever no writer holds the lock."""
    dirs = (root, root / PULLBACKS, root / DEEMBED, root / LOGITS, root / STATS, root / PROMPTS, root / HEADS, root / OV, root / OV_TOKENS)
    return sorted({p for d in dirs for pattern in TEMPORARY for p in d.glob(pattern)})


def part_files(root: Path, pattern: str) -> list[Path]:
    """The parts matching `pattern` (relative to `root`), never a crash leftover: temporaries have hidden names."""
    root = Path(root)
    return sorted(p for p in root.glob(pattern) if not any(s.startswith(".") for s in p.relative_to(root).parts))


def parquet_name(part: str) -> str:
    """The file name of a named part: 'nodes' -> 'nodes.parquet'."""
    return f"{part}.parquet"


def _named(part: str, parts: tuple[str, ...]) -> str:
    if part not in parts:
        raise ValueError(f"no part {part!r}: expected one of {parts}")  # a bug: callers name parts in code
    return parquet_name(part)


def stats_part(part: str) -> str:
    """A statistics part relative to the catalog directory: 'features' -> 'stats/features.parquet'."""
    return f"{STATS}/{_named(part, STATS_PARTS)}"


def stats_file(root: Path, part: str) -> Path:
    return root / stats_part(part)


def stats_info(root: Path) -> Path:
    return root / STATS / STATS_INFO


def prompt_dir(root: Path, prompt_id: str) -> Path:
    return root / PROMPTS / prompt_id


def prompt_part(root: Path, prompt_id: str, part: str) -> Path:
    return prompt_dir(root, prompt_id) / _named(part, PROMPT_PARTS)


def prompt_part_glob(part: str) -> str:
    """One part of every prompt, relative to the catalog directory: 'nodes' -> 'prompts/*/nodes.parquet'."""
    return f"{PROMPTS}/*/{_named(part, PROMPT_PARTS)}"


def prompt_info(root: Path, prompt_id: str) -> Path:
    return prompt_dir(root, prompt_id) / PROMPT_INFO


def pullback_part(root: Path, src_layer: int, dst_layer: int) -> Path:
    return root / PULLBACKS / f"L{src_layer:03d}_to_L{dst_layer:03d}.parquet"


def deembed_part(root: Path, layer: int) -> Path:
    return root / DEEMBED / f"L{layer:03d}.parquet"


def logit_part(root: Path, layer: int) -> Path:
    return root / LOGITS / f"L{layer:03d}.parquet"


def ov_part(root: Path, attn_layer: int, dst_layer: int) -> Path:
    return root / OV / f"A{attn_layer:03d}_L{dst_layer:03d}.parquet"


def ov_token_part(root: Path, attn_layer: int, dst_layer: int) -> Path:
    return root / OV_TOKENS / f"A{attn_layer:03d}_L{dst_layer:03d}.parquet"
