"""Datasets: the Brown corpus's tagged format, JSONL, and fixed-length contexts."""

from __future__ import annotations

import json

import pytest
from circuit_catalog.ingest.datasets import iter_texts, token_contexts

from circuit_catalog.errors import DatasetError


def test_brown_tags_are_stripped(tmp_path):
    (tmp_path / "ca01").write_text(
        "\n\n\tThe/at Fulton/np-tl jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, Friday/nr ./.\n\n"
        "\tIt/pps ended/vbd ./.\n"
    )
    (texts,) = list(iter_texts(str(tmp_path)))
    assert texts == 'The Fulton jury said " no evidence ", Friday.\nIt ended.'


def test_jsonl_and_bad_lines(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert list(iter_texts(str(good))) == ["one", "two"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(DatasetError, match="b.jsonl:2"):
        list(iter_texts(str(bad)))
    with pytest.raises(DatasetError, match="not found"):
        list(iter_texts(str(tmp_path / "missing.txt")))


def test_contexts_start_with_bos_and_follow_the_text(gpt2, text_file):
    tok = gpt2.tokenizer
    ctx = token_contexts(tok, str(text_file), n_tokens=200, ctx_len=16)
    assert ctx.shape == (13, 16) and (ctx[:, 0] == tok.bos_token_id).all()
    first_doc = next(iter_texts(str(text_file)))
    assert ctx[0, 1:].tolist() == tok.encode(first_doc, add_special_tokens=False)[:15]
    held_out = token_contexts(tok, str(text_file), n_tokens=200, ctx_len=16, skip_contexts=2)
    assert held_out.tolist() == token_contexts(tok, str(text_file), 232, 16)[2:].tolist()
