"""The shared version vectors (tests/vectors/versions.json), read the server's way.

tests/js/versions.test.mjs reads the same file with the browser client's ``asVersion`` and
``compareVersions``: both sides parse every literal to the same version and order every pair
the same way, so they agree by construction rather than by two grammars kept in step.
"""

from __future__ import annotations

import json
from itertools import product
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asgi_session_sync.protocol import MAX_VERSION, Version, as_version

VECTORS_FILE = Path(__file__).with_name("vectors") / "versions.json"
VECTORS: list[dict[str, Any]] = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))["vectors"]


def order(a: Version | None, b: Version | None) -> int | None:
    """1 if ``a`` is newer, -1 if older, 0 if the same; ``None`` unless both are versions."""
    if a is None or b is None:
        return None
    return (a > b) - (a < b)


def test_the_vectors_cover_the_cases_the_protocol_names() -> None:
    texts = {vector["text"] for vector in VECTORS}
    assert len(texts) == len(VECTORS) >= 40  # no duplicates
    named = {"0", "-0", "-1", "7.0", "7.5", "1e3", "7e0", "9007199254740991", "9007199254740992"}
    named |= {"9007199254740993", "1e62", "1" + "0" * 62, '"7"', '" 7"', '"007"', "true"}
    named |= {"false", "null", "[]", "{}", "-0.0", "1.0000000000000002", "9007199254740991.0"}
    named |= {'"2026-02-30T00:00:00Z"', '"2016-12-31T23:59:60Z"', '"0000-01-01T00:00:00Z"'}
    assert named <= texts, sorted(named - texts)
    expected = [vector["version"] for vector in VECTORS]
    # Both kinds of answer, and the edges of the range, are present.
    assert None in expected
    assert {0, MAX_VERSION} <= set(expected)
    assert all(v is None or type(v) is int for v in expected)


@pytest.mark.parametrize("vector", VECTORS, ids=[vector["text"] for vector in VECTORS])
def test_every_literal_reads_as_its_expected_version(vector: dict[str, Any]) -> None:
    version = as_version(json.loads(vector["text"]))
    assert version == vector["version"]
    assert type(version) is type(vector["version"])  # 7.0 reads as the int 7, not 7.0


def test_every_pair_orders_as_its_expected_versions() -> None:
    parsed = [as_version(json.loads(vector["text"])) for vector in VECTORS]
    expected = [vector["version"] for vector in VECTORS]
    wrong = [
        (VECTORS[i]["text"], VECTORS[j]["text"], order(parsed[i], parsed[j]))
        for i, j in product(range(len(VECTORS)), repeat=2)
        if order(parsed[i], parsed[j]) != order(expected[i], expected[j])
    ]
    assert wrong == []


@given(st.integers(min_value=0, max_value=MAX_VERSION))
def test_any_int_in_range_round_trips_through_json(value: int) -> None:
    assert as_version(json.loads(json.dumps(value))) == value
    assert as_version(json.loads(json.dumps(float(value)))) == value  # 7.0 is 7


@given(st.integers().filter(lambda value: not 0 <= value <= MAX_VERSION))
def test_no_int_out_of_range_is_a_version(value: int) -> None:
    assert as_version(json.loads(json.dumps(value))) is None


@given(st.text())
def test_no_string_is_a_version(text: str) -> None:
    assert as_version(text) is None
    assert as_version(json.loads(json.dumps(text))) is None
