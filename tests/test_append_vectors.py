"""The shared append vectors (tests/vectors/append.json), read the server's way.

tests/js/append.test.mjs applies the same cases with the browser client's ``applyPatch``: both
sides give each case's result, or refuse it and keep the document, so the server's
:func:`~asgi_session_sync.protocol.apply_patch` and the browser agree by construction. The
offsets count UTF-16 code units, JavaScript's ``string.length``: :func:`utf16_length` is checked
against node itself on every string of the vectors, and against the definition on any text.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_js_client import node_or_skip

from asgi_session_sync.protocol import (
    Kind,
    SessionPatch,
    apply_patch,
    parse_frame,
    patch_problem,
    utf16_length,
)

VECTORS_FILE = Path(__file__).with_name("vectors") / "append.json"
VECTORS: list[dict[str, Any]] = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))
SUCCESSES = [vector for vector in VECTORS if "result" in vector]
ERRORS = [vector for vector in VECTORS if vector.get("error")]

# The failures that are about the operation's own members, not the document it meets: every
# reader of a frame (the publisher, the hub) refuses them before any client sees them.
MALFORMED = {
    "value is not a string",
    "value is missing",
    "offset is missing",
    "offset is negative",
    "offset is a fraction",
    "offset is a string of digits",
    "offset is a boolean (true is not 1)",
    "path is missing",
}


def js_length(text: str) -> int:
    """JavaScript's ``string.length`` by its definition (ECMA-262 6.1.4): UTF-16 code units.

    A character beyond the Basic Multilingual Plane is two units (a surrogate pair); any other
    code point, a lone surrogate included, is one.
    """
    return sum(2 if ord(character) > 0xFFFF else 1 for character in text)


def strings_in(value: Any) -> list[str]:
    """Every string in a decoded JSON value, object keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in (key, *strings_in(item))]
    if isinstance(value, list):
        return [s for item in value for s in strings_in(item)]
    return []


VECTOR_STRINGS = sorted({s for vector in VECTORS for s in strings_in(vector)})
ASTRAL_STRINGS = [s for s in VECTOR_STRINGS if any(ord(c) > 0xFFFF for c in s)]


def test_the_vectors_cover_successes_failures_astral_text_and_malformed_operations() -> None:
    names = [vector["name"] for vector in VECTORS]
    assert len(set(names)) == len(names) >= 30
    for vector in VECTORS:
        assert set(vector) in (
            {"name", "document", "patch", "result"},
            {"name", "document", "patch", "error"},
        ), vector["name"]
        assert vector.get("error", True) is True, vector["name"]
    assert len(ERRORS) >= 10
    assert len(SUCCESSES) >= 10
    assert set(names) >= MALFORMED, sorted(MALFORMED - set(names))
    assert len(ASTRAL_STRINGS) >= 4
    # An astral character both in a document before the append and in an appended value.
    assert any(
        js_length(v["document"]["text"]) != len(v["document"]["text"])
        for v in SUCCESSES
        if isinstance(v["document"], dict) and isinstance(v["document"].get("text"), str)
    )


@pytest.mark.parametrize("vector", SUCCESSES, ids=[vector["name"] for vector in SUCCESSES])
def test_every_passing_case_gives_its_result_and_leaves_the_document_alone(
    vector: dict[str, Any],
) -> None:
    document = copy.deepcopy(vector["document"])
    assert apply_patch(document, vector["patch"]) == vector["result"]
    assert document == vector["document"]
    assert patch_problem(vector["patch"]) is None


@pytest.mark.parametrize("vector", ERRORS, ids=[vector["name"] for vector in ERRORS])
def test_every_failing_case_raises_value_error_and_keeps_the_document(
    vector: dict[str, Any],
) -> None:
    document = copy.deepcopy(vector["document"])
    with pytest.raises(ValueError, match="the patch does not apply"):
        apply_patch(document, vector["patch"])
    assert document == vector["document"]  # atomic: the state before the patch is kept


@pytest.mark.parametrize(
    "vector",
    [vector for vector in ERRORS if vector["name"] in MALFORMED],
    ids=sorted(MALFORMED, key=[v["name"] for v in VECTORS].index),
)
def test_a_malformed_append_is_refused_by_the_publisher_and_by_the_hubs_parse(
    vector: dict[str, Any],
) -> None:
    assert patch_problem(vector["patch"]) is not None
    with pytest.raises(ValueError, match="append"):
        SessionPatch(session_id="s1", base_version=1, version=2, patch=vector["patch"])
    frame = {
        "type": "session_patch",
        "session_id": "s1",
        "base_version": 1,
        "version": 2,
        "patch": vector["patch"],
    }
    assert isinstance(parse_frame(json.dumps(frame)), str)


@pytest.mark.parametrize("vector", SUCCESSES, ids=[vector["name"] for vector in SUCCESSES])
def test_the_hub_reads_each_appends_offset_and_length_in_utf16_units(
    vector: dict[str, Any],
) -> None:
    text = json.dumps(
        {
            "type": "session_patch",
            "session_id": "s1",
            "base_version": 1,
            "version": 2,
            "patch": vector["patch"],
        },
        ensure_ascii=False,
    )
    frame = parse_frame(text)
    assert not isinstance(frame, str), frame
    assert frame.kind is Kind.PATCH
    appends = [op for op in vector["patch"] if op["op"] == "append"]
    assert [(a.path, a.offset, a.length) for a in frame.appends] == [
        (op["path"], op["offset"], js_length(op["value"])) for op in appends
    ]
    assert frame.size == len(text.encode())


@pytest.mark.parametrize("text", ASTRAL_STRINGS)
def test_utf16_length_of_the_vectors_astral_strings_is_javascripts(text: str) -> None:
    assert utf16_length(text) == js_length(text)
    assert utf16_length(text) > len(text)  # Python's len counts code points: fewer


def test_utf16_length_agrees_with_node_on_every_string_of_the_vectors() -> None:
    node = node_or_skip()
    strings = [*VECTOR_STRINGS, "\ud800", "a\udfffb", "👍🏽", "🏳️‍🌈", "e\u0301"]
    # ensure_ascii: every character travels as \uXXXX escapes, lone surrogates included.
    script = (
        "let s='';process.stdin.on('data',d=>s+=d).on('end',"
        "()=>console.log(JSON.stringify(JSON.parse(s).map(t=>t.length))))"
    )
    result = subprocess.run(
        [node, "-e", script],
        input=json.dumps(strings, ensure_ascii=True),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lengths = json.loads(result.stdout)
    assert [utf16_length(s) for s in strings] == lengths
    assert dict(zip(strings[-5:], lengths[-5:], strict=True)) == {
        "\ud800": 1,
        "a\udfffb": 3,
        "👍🏽": 4,
        "🏳️‍🌈": 6,
        "e\u0301": 2,
    }


# Surrogates included: JSON can carry a lone one ("\ud800"), and JavaScript counts it 1.
any_text = st.text(
    st.one_of(
        st.characters(codec=None, exclude_categories=()),
        st.sampled_from(["\ud800", "\udfff", "😀", "\U0001f3fd", "é"]),
    )
)


@given(any_text)
def test_utf16_length_is_javascripts_string_length_for_any_text(text: str) -> None:
    assert utf16_length(text) == js_length(text)


@given(any_text, any_text)
def test_an_append_at_utf16_length_applies_and_any_other_offset_fails(
    before: str, value: str
) -> None:
    offset = utf16_length(before)
    result = apply_patch(
        {"t": before}, [{"op": "append", "path": "/t", "offset": offset, "value": value}]
    )
    assert result == {"t": before + value}
    assert utf16_length(result["t"]) == offset + utf16_length(value)
    for wrong in {offset - 1, offset + 1, len(before.encode("utf-8", "surrogatepass"))} - {offset}:
        if wrong >= 0:
            with pytest.raises(ValueError, match="UTF-16 units long"):
                apply_patch(
                    {"t": before}, [{"op": "append", "path": "/t", "offset": wrong, "value": value}]
                )
