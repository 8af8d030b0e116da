"""What a reader should distrust before reading a circuit: likely artefacts and what the catalog could not measure.

One definition of each warning, used by the CLI, the API and every report:

- a **sink-like** feature: at least `SINK_SHARE` of its top activating examples sit at position <= `SINK_POS` (the first
  real token after BOS; BOS itself is left out of the statistics). Such features fire at their maximum on whatever
  token opens a context: an attention-sink artefact more often than a concept.
- a **dense** feature: fires on more than `DENSE_FREQUENCY` of the statistics' tokens, so it says little about any one.
- a **near-dead layer**: its features' mean L0 (active features per token) is below `NEAR_DEAD_L0`, or more than
  `NEAR_DEAD_SHARE` of its features never fired on the statistics' tokens: its transcoder explains little, so most
  of that layer's work sits in error nodes.
- **too few tokens to call a feature rare**: "rarely firing" means under once in `RARE_TOKENS` tokens, which can only be
  told from "dead" when the statistics counted at least that many tokens.
- a **low replacement score** (< `LOW_REPLACEMENT`) in a prompt's graph: error nodes carry most of the influence.
- the transcoders' **quality** (FVU, CE loss recovered) from `CATALOG/eval.json` when `circuit-catalog eval` wrote it.

All flags are computed from the activation statistics (`stats/`) with DuckDB; a catalog without statistics has none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from circuit_catalog.catalog import layout
from circuit_catalog.catalog.ids import parse_feature_id
from circuit_catalog.errors import ReportError
from circuit_catalog.queries.sql import connect, views

SINK_POS, SINK_SHARE = 1, 0.8
DENSE_FREQUENCY = 0.5
NEAR_DEAD_L0, NEAR_DEAD_SHARE = 1.0, 0.5
RARE_TOKENS = 10_000  # "live" = fires more often than once in this many tokens (ingest.stats.LIVE_FREQUENCY)
LOW_REPLACEMENT = 0.5
EVAL_COMMAND = "circuit-catalog eval --model M --transcoders T --out CATALOG/eval.json"

SINK, DENSE, NEAR_DEAD = "sink-like", "dense", "near-dead layer"


@dataclass
class Flag:
    """One warning: its kind (`sink-like`, `dense`, `near-dead layer`) and why, in plain words with the figures."""

    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.reason}"


def feature_flags(root: Path, ids: list[str] | None = None) -> dict[str, list[Flag]]:
    """Flags of the features `ids` (every feature with statistics if None); features without flags are left out."""
    if ids is not None:
        for fid in ids:
            parse_feature_id(fid)
    if "stats" not in views(root) or ids == []:
        return {}
    # a list of constants (placeholders, never the ids' text) so DuckDB prunes the Parquet row groups by it
    where, params = ("", []) if ids is None else (f"WHERE {{}} IN ({', '.join('?' * len(ids))})", list(ids))
    con = connect(root)
    try:
        rows = con.execute(
            f"WITH s AS (SELECT id, frequency FROM stats {where.format('id')}), "
            f"t AS (SELECT feature, pos FROM top_examples {where.format('feature')}) "
            "SELECT s.id, s.frequency, count(t.pos), count(t.pos) FILTER (WHERE t.pos <= ?) "
            "FROM s LEFT JOIN t ON t.feature = s.id GROUP BY s.id, s.frequency",
            params + params + [SINK_POS],
        ).fetchall()
    finally:
        con.close()
    out: dict[str, list[Flag]] = {}
    for fid, frequency, top, early in rows:
        flags = []
        if top and early >= SINK_SHARE * top:
            flags.append(Flag(SINK, f"{early} of its {top} top activating examples are at position <= {SINK_POS} (the first "
                                    "token after BOS): likely an attention-sink artefact"))
        if frequency > DENSE_FREQUENCY:
            flags.append(Flag(DENSE, f"fires on {frequency:.1%} of the statistics' tokens (more than {DENSE_FREQUENCY:.0%}): "
                                     "it tells little about any one token"))
        if flags:
            out[fid] = flags
    return out


def layer_flags(root: Path) -> dict[int, list[Flag]]:
    """Near-dead layers: mean L0 below NEAR_DEAD_L0 or more than NEAR_DEAD_SHARE of the features never fired."""
    if "stats" not in views(root):
        return {}
    con = connect(root)
    try:
        rows = con.execute("SELECT layer, sum(frequency), count(*) FILTER (WHERE fired = 0), count(*) FROM stats GROUP BY layer").fetchall()
    finally:
        con.close()
    out: dict[int, list[Flag]] = {}
    for layer, l0, dead, total in rows:
        if l0 < NEAR_DEAD_L0 or dead > NEAR_DEAD_SHARE * total:
            out[layer] = [Flag(NEAR_DEAD, f"layer {layer}'s transcoder: mean L0 {l0:.2f} active features per token, {dead} of "
                                          f"{total} features never fired: most of this layer's work is in its error nodes")]
    return out


def flags_of(root: Path, fid: str) -> list[Flag]:
    """One feature's flags and its layer's."""
    return feature_flags(root, [fid]).get(fid, []) + layer_flags(root).get(parse_feature_id(fid)[0], [])


def counted_tokens(root: Path) -> int | None:
    """Tokens the statistics counted (BOS positions left out), from stats/info.json; None without statistics."""
    path = layout.stats_info(root)
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    return info["tokens"] // info["ctx_len"] * (info["ctx_len"] - 1)


def rare_warning(root: Path) -> str | None:
    """A plain line when the statistics counted too few tokens to call a feature rarely firing (or dead); else None."""
    n = counted_tokens(root)
    if n is None or n >= RARE_TOKENS:
        return None
    return (f"the statistics counted {n:,} tokens, fewer than the {RARE_TOKENS:,} needed to call a feature rarely firing "
            f"(under once in {RARE_TOKENS:,} tokens): one firing already counts as live here, so a rare feature cannot be told "
            f"apart; collect more with `circuit-catalog ingest ... --dataset D --tokens N` (N >= {RARE_TOKENS:,})")


def replacement_warning(score: float) -> str | None:
    """A plain-words warning for a prompt graph whose replacement score is below LOW_REPLACEMENT; else None."""
    if score >= LOW_REPLACEMENT:
        return None
    return (f"replacement score {score:.3f} < {LOW_REPLACEMENT}: errors carry most of the influence, so read the features' "
            "roles with caution")


def read_eval(path: Path) -> dict:
    """An `eval --out` JSON file, checked for the fields the readers use."""
    try:
        data = json.loads(path.read_text())
        for row in data["layers"]:
            int(row["layer"]), float(row["fvu"]), float(row["ce_recovered"])
        float(data["ce_recovered_all"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReportError(f"{path}: not a `circuit-catalog eval --out` file ({type(exc).__name__}: {exc})") from None
    return data


def catalog_eval(root: Path, eval_file: Path | None = None) -> dict | None:
    """The evaluation of the catalog's transcoders: `eval_file`, else CATALOG/eval.json if present, else None."""
    path = eval_file or root / layout.EVAL
    return read_eval(path) if eval_file is not None or path.is_file() else None


def quality_line(evaluation: dict | None) -> str:
    """The transcoders' quality in one line, or that it was not measured and how to measure it."""
    if evaluation is None:
        return f"transcoder quality (FVU, CE loss recovered) not measured: run `{EVAL_COMMAND}`"
    layers = evaluation["layers"]
    fvu = ", ".join(f"L{m['layer']} {m['fvu']:.3f}" for m in layers)
    return (f"transcoder quality over {evaluation.get('n_tokens', 0):,} tokens: FVU {fvu}; CE loss recovered with every "
            f"MLP replaced {evaluation['ce_recovered_all']:.3f}")
