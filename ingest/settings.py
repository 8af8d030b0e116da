"""What an ingest is asked, apart from the model and transcoders: its settings and its prompts.

Torch-free on purpose (configuration apart from weights): the CLI builds these, the receipt (`ingest.receipt`)
digests them and answers a rerun with nothing to do before torch or TransformerLens is imported.
"""

from __future__ import annotations

import json
from dataclasses import KW_ONLY, dataclass, replace
from pathlib import Path

from circuit_catalog.errors import DatasetError

# Statistics fields added after the first statistics: a catalog without one gains it by collecting anew (nothing else
# differs); the ingest receipt holds these names too, so a rerun of a catalog older than one of them is not a no-op
STATS_ADDED = ("component_examples", "inv_scale")


@dataclass(kw_only=True)
class IngestSettings:
    top_k: int | None = 16
    min_weight: float | None = None
    token_top_k: int = 20
    # dtype of the pullback scores that choose candidate edges; the stored weights are float32 recomputations
    # (`select_edges`): "float32", "bfloat16", or "auto" (`ingest.device.score_dtype_for` the model's device)
    pullback_score_dtype: str = "auto"
    heads_top_k: int | None = None  # OV pullbacks per attention head (`ingest.heads`): kept per (target feature, head)


@dataclass(frozen=True)
class PromptSpec:
    text: str
    _: KW_ONLY
    target: str | None = None  # a token the graph must include as a logit target
    # a custom target (`ingest.targets`): these tokens' logits summed (`target` alone when only contrasts are
    # given) minus the contrasts', or a .npy direction; weighted in pruning as a logit of probability target_weight
    targets: tuple[str, ...] = ()
    contrast: tuple[str, ...] = ()
    direction: str | None = None
    target_weight: float = 1.0

    @property
    def custom(self) -> dict | None:
        """The custom target's definition, or None when the prompt has none."""
        tokens = self.targets or ((self.target,) if self.contrast and self.target is not None else ())
        if not (tokens or self.contrast or self.direction):
            return None
        return {"tokens": list(tokens), "contrast": list(self.contrast), "direction": self.direction, "weight": self.target_weight}


# feature nodes per attribution graph, chosen by estimated influence: circuit-tracer's command-line default. Features
# the cap leaves out are absent from the graph, so their share of each target falls to the error nodes; with 1,024 the
# main job's graphs held a quarter of their prompts' ~4,200 active features and replacement scores of 0.31-0.38,
# with this cap (all of them but the longest prompt's) 0.38-0.52 (README, "Attribution graphs")
MAX_FEATURE_NODES = 7500


@dataclass(kw_only=True)
class AttributionSettings:
    max_feature_nodes: int | None = MAX_FEATURE_NODES
    max_n_logits: int = 10
    desired_logit_prob: float = 0.95
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    batch_size: int = 256
    zero_bos: bool = True  # no feature nodes at position 0 (BOS or another special token), as circuit-tracer
    head_terms: int = 8  # per head-resolved edge: its terms through its top heads, `direct` and `other` (`ingest.head_terms`)
    # the pruned edges split by head, the most influential first (None: every pruned edge; ~50 bytes an edge on disk)
    head_edges: int | None = 1000
    # edges_full: every non-zero edge before pruning (~5 bytes an edge: 2-3 MB a SmolLM2 prompt); False keeps only
    # the unpruned edges into the logits and the custom target, which validation reads
    unpruned_edges: bool = False
    definitions: int = 4  # raised when what a graph holds changes, so older prompt graphs are recomputed


def read_prompts(path: Path) -> list[PromptSpec]:
    """One prompt per line (.txt), or JSON lines with `prompt` and optional `target`, and for a custom target
    `targets` (list), `contrast` (token or list), `direction` (.npy path) and `target_weight` (.jsonl)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8 text") from None
    specs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            # a null or a number is not a prompt: str() would store the text "None"
            if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("target"), (str, type(None)))):
                raise DatasetError(f"{path}:{number}: expected a JSON object with a string 'prompt' (and optional string 'target')")
            try:
                contrast = row.get("contrast") or ()
                specs.append(PromptSpec(
                    row["prompt"], target=row.get("target"), targets=tuple(map(str, row.get("targets") or ())),
                    contrast=(str(contrast),) if isinstance(contrast, str) else tuple(map(str, contrast)),
                    direction=None if row.get("direction") is None else str(row["direction"]),
                    target_weight=float(row.get("target_weight", 1.0))))
            except (TypeError, ValueError):
                raise DatasetError(f"{path}:{number}: a custom target's 'targets', 'contrast' (token or list), 'direction' (.npy path) "
                                   "or 'target_weight' (number) is malformed") from None
        else:
            specs.append(PromptSpec(line))
    if not specs:
        raise DatasetError(f"{path}: no prompts")
    return specs


def with_custom_target(specs: list[PromptSpec], targets: tuple[str, ...] = (), contrast: tuple[str, ...] = (),
                       direction: str | None = None, weight: float = 1.0) -> list[PromptSpec]:
    """Give every prompt without its own custom target this one (the CLI's --target/--contrast/--direction)."""
    if not (targets or contrast or direction):
        return specs
    custom = {"targets": tuple(targets), "contrast": tuple(contrast), "direction": direction, "target_weight": weight}
    return [s if s.custom is not None else replace(s, **custom) for s in specs]
