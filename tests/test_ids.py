"""Feature and node ids: every kind written by `catalog.ids` reads back as itself; malformed ids are one-line user errors."""

from __future__ import annotations

import pyarrow as pa
import pytest
from circuit_catalog.catalog import ids

from circuit_catalog.errors import UnknownFeature, UnknownPrompt, UserError

PID = "0123456789abcdef"


def test_feature_ids_round_trip():
    for layer, index in [(0, 0), (8, 355), (25, 16383), (999_999, 10**12 - 1)]:
        assert ids.parse_feature_id(ids.feature_id(layer, index)) == (layer, index)
    assert ids.feature_id(8, 355) == "L8/355"
    assert ids.feature_ids(8, pa.array([0, 355])).to_pylist() == [ids.feature_id(8, 0), ids.feature_id(8, 355)]


@pytest.mark.parametrize("local, parsed", [
    (ids.feature_node(8, 355, 3), ids.LocalNode("feature", layer=8, pos=3, feature_index=355)),
    (ids.error_node(8, 3), ids.LocalNode("error", layer=8, pos=3)),
    (ids.token_node(3), ids.LocalNode("token", pos=3)),
    (ids.logit_node(1234), ids.LocalNode("logit", token_id=1234)),
    (ids.TARGET, ids.LocalNode("target")),
])
def test_node_ids_round_trip(local, parsed):
    nid = ids.node_id(PID, local)
    assert ids.split_node_id(nid) == (PID, local)
    assert ids.parse_local(local) == parsed


def test_the_written_forms():
    """The on-disk forms nodes.parquet holds (README, `catalog/layout.py`): a change here is a format change."""
    assert [ids.feature_node(8, 355, 3), ids.error_node(8, 3), ids.token_node(3), ids.logit_node(1234)] == \
        ["L8/355@3", "err:L8@3", "tok@3", "logit:1234"]
    assert ids.node_id(PID, "tok@3") == f"{PID}:tok@3"


@pytest.mark.parametrize("fid", ["", "L8", "L8/", "l8/355", "L8/355\n", "L8/-1", "8/355", "L8/355@3", "L" + "9" * 5000 + "/1"])
def test_malformed_feature_ids_are_one_line_errors(fid):
    with pytest.raises(UnknownFeature) as info:
        ids.parse_feature_id(fid)
    assert "\n" not in str(info.value) and "expected L<layer>/<index>" in str(info.value)


@pytest.mark.parametrize("nid", ["", "tok@3", ":tok@3", f"{PID}:", "x\ny"])
def test_malformed_node_ids_are_one_line_errors(nid):
    with pytest.raises(UnknownPrompt) as info:
        ids.split_node_id(nid)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("local", ["", "tok@", "tok@x", "tok@-1", "err:L8", "err:8@3", "logit:", "logit:-3", "L8/355",
                                   "L8/355@3@4", "targets", "target\n", "tok@3 "])
def test_malformed_local_ids_are_one_line_errors(local):
    with pytest.raises(UserError) as info:
        ids.parse_local(local)
    assert isinstance(info.value, UnknownPrompt) and "\n" not in str(info.value)
