"""Feature ids, prompt-graph node ids and attention-head ids: the one module that writes and reads them.

A feature is `L{layer}/{index}` (`L8/355`). A node of a prompt's attribution graph is `<prompt_id>:<local>`,
the local part naming it within its graph by kind (the `kind` column of nodes.parquet):

- feature `L8/355@3` (feature L8/355 at position 3), error `err:L8@3` (layer 8's MLP error at position 3),
- token `tok@3` (the input token at position 3), logit `logit:1234` (the logit of token id 1234),
- target `target` (the prompt's custom target, `ingest.targets`; at most one per graph).

An attention head is `L{layer}H{head}` (`L7H3`, the seeds' naming). Prompt ids are hex digests, so the first `:`
ends them. Malformed ids are user errors, printed on one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa

from circuit_catalog.errors import UnknownFeature, UnknownHead, UnknownPrompt

FEATURE_ID = re.compile(r"L(\d{1,6})/(\d{1,12})")  # bounded: int() of 5,000 digits raises
TARGET = "target"
_LOCAL = re.compile(r"L(?P<layer>\d{1,6})/(?P<index>\d{1,12})@(?P<pos>\d{1,9})"
                    r"|err:L(?P<err_layer>\d{1,6})@(?P<err_pos>\d{1,9})"
                    r"|tok@(?P<tok_pos>\d{1,9})|logit:(?P<token_id>\d{1,12})|" + TARGET)
_EXAMPLES = "L8/355@3, err:L8@3, tok@3, logit:1234 or target"


def feature_id(layer: int, index: int) -> str:
    return f"L{layer}/{index}"


def parse_feature_id(fid: str) -> tuple[int, int]:
    """'L8/355' -> (8, 355); anything else is a user error."""
    m = FEATURE_ID.fullmatch(fid)  # not match + $: that accepts a trailing newline
    if not m:
        raise UnknownFeature(f"malformed feature id {fid[:40]!r}: expected L<layer>/<index>, e.g. L8/355")
    return int(m.group(1)), int(m.group(2))


def feature_ids(layer: int, indices: pa.Array) -> pa.Array:
    """Vectorised `feature_id` (a Python loop over millions of edges would dominate ingest)."""
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(f"L{layer}", pc.cast(indices, pa.string()), "/")


def sql_feature_layer(column: str) -> str:
    """A SQL expression (DuckDB) for the layer of the feature id in `column`."""
    return f"CAST(split_part(substr({column}, 2), '/', 1) AS INTEGER)"


def feature_node(layer: int, index: int, pos: int) -> str:
    return f"{feature_id(layer, index)}@{pos}"


def error_node(layer: int, pos: int) -> str:
    return f"err:L{layer}@{pos}"


def token_node(pos: int) -> str:
    return f"tok@{pos}"


def logit_node(token_id: int) -> str:
    return f"logit:{token_id}"


def node_id(prompt_id: str, local: str) -> str:
    return f"{prompt_id}:{local}"


def split_node_id(nid: str) -> tuple[str, str]:
    """'<prompt_id>:L8/355@3' -> ('<prompt_id>', 'L8/355@3')."""
    prompt_id, sep, local = nid.partition(":")
    if not (sep and prompt_id and local):
        raise UnknownPrompt(f"malformed node id {nid[:60]!r}: expected <prompt id>:<node>, the node e.g. {_EXAMPLES}")
    return prompt_id, local


@dataclass(frozen=True)
class LocalNode:
    """What a node's local id says; what it does not say is None (a token's layer is in nodes.parquet, not its id)."""

    kind: str  # feature | error | token | logit | target
    layer: int | None = None
    pos: int | None = None
    feature_index: int | None = None
    token_id: int | None = None


def parse_local(local: str) -> LocalNode:
    """'L8/355@3' -> LocalNode('feature', 8, 3, 355); each kind of local id, or a user error."""
    m = _LOCAL.fullmatch(local)
    if not m:
        raise UnknownPrompt(f"malformed node {local[:60]!r}: expected {_EXAMPLES}")
    g = {k: None if v is None else int(v) for k, v in m.groupdict().items()}
    if g["index"] is not None:
        return LocalNode("feature", g["layer"], g["pos"], g["index"])
    if g["err_layer"] is not None:
        return LocalNode("error", g["err_layer"], g["err_pos"])
    if g["tok_pos"] is not None:
        return LocalNode("token", pos=g["tok_pos"])
    if g["token_id"] is not None:
        return LocalNode("logit", token_id=g["token_id"])
    return LocalNode(TARGET)


HEAD_ID = re.compile(r"L(\d{1,6})H(\d{1,6})")


def head_id(layer: int, head: int) -> str:
    """An attention head's id: `L7H3` is head 3 of layer 7 (the seeds' naming)."""
    return f"L{layer}H{head}"


def parse_head_id(hid: str) -> tuple[int, int]:
    """'L7H3' -> (7, 3); anything else is a user error."""
    m = HEAD_ID.fullmatch(hid)
    if not m:
        raise UnknownHead(f"malformed head id {hid[:40]!r}: expected L<layer>H<head>, e.g. L7H3")
    return int(m.group(1)), int(m.group(2))
