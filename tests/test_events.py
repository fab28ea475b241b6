"""The events' wire format: large int versions, the patch event, and building patches."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import jsonpatch
import pytest
from pydantic import BaseModel, ValidationError

from asgi_session_sync import SessionPatch, SessionSynced, SessionUpdate, make_patch
from asgi_session_sync.events import MAX_SAFE_INTEGER


def wire(event: Any) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(event.to_json())
    return decoded


@pytest.mark.parametrize(
    ("version", "on_the_wire"),
    [
        (MAX_SAFE_INTEGER, MAX_SAFE_INTEGER),
        (-MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER),
        (MAX_SAFE_INTEGER + 1, str(MAX_SAFE_INTEGER + 1)),
        (-MAX_SAFE_INTEGER - 1, str(-MAX_SAFE_INTEGER - 1)),
        (2**64, "18446744073709551616"),
        ("18446744073709551616", "18446744073709551616"),
        ("42", 42),  # a digit string is an int, and a safe one is a number
        ("2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z"),
        (datetime(2026, 1, 1, tzinfo=timezone.utc), "2026-01-01T00:00:00Z"),
    ],
)
def test_ints_beyond_the_safe_range_go_out_as_decimal_strings(
    version: Any, on_the_wire: Any
) -> None:
    assert wire(SessionUpdate(session_id="s1", session={}, version=version))["version"] == (
        on_the_wire
    )
    assert wire(SessionSynced(session_id="s1", version=version))["version"] == on_the_wire
    patch = SessionPatch(session_id="s1", base_version=version, version=version, patch=[])
    assert wire(patch)["version"] == on_the_wire
    assert wire(patch)["base_version"] == on_the_wire


def test_a_decimal_string_version_is_read_as_an_int() -> None:
    event = SessionUpdate.model_validate_json(
        '{"session_id": "s1", "session": {}, "version": "18446744073709551617"}'
    )
    assert event.version == 2**64 + 1
    patch = SessionPatch(session_id="s1", base_version="9", version="10", patch=[])
    assert (patch.base_version, patch.version) == (9, 10)


def test_session_patch_has_the_wire_format_of_the_contract() -> None:
    patch = SessionPatch(
        session_id="s1",
        base_version=7,
        version=8,
        patch=[{"op": "replace", "path": "/interactions/3/response", "value": "Hel"}],
    )
    assert wire(patch) == {
        "type": "session_patch",
        "session_id": "s1",
        "base_version": 7,
        "version": 8,
        "patch": [{"op": "replace", "path": "/interactions/3/response", "value": "Hel"}],
    }


@pytest.mark.parametrize(
    "operations",
    [
        [{"op": "frobnicate", "path": "/a"}],
        [{"path": "/a", "value": 1}],
        [{"op": "add", "path": "a", "value": 1}],  # a JSON Pointer starts with "/"
        ["add /a 1"],
        [{"op": "add", "path": "/a"}],  # add, replace and test need a value
        [{"op": "test", "path": "/a"}],
        [{"op": "move", "path": "/a"}],  # move and copy need a from pointer
        [{"op": "copy", "path": "/a", "from": "b"}],
        [{"op": "add", "path": "/a", "value": float("nan")}],  # not JSON
        [{"op": "add", "path": "/a", "value": {1, 2}}],
    ],
)
def test_a_session_patch_refuses_what_is_not_rfc_6902(operations: Any) -> None:
    with pytest.raises(ValidationError):
        SessionPatch(session_id="s1", base_version=1, version=2, patch=operations)


def test_a_session_patch_needs_both_versions() -> None:
    with pytest.raises(ValidationError):
        SessionPatch(session_id="s1", version=2, patch=[])  # type: ignore[call-arg]


class Interaction(BaseModel):
    prompt: str
    response: str
    at: datetime


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ({"a": 1}, {"a": 1}),
        ({"items": [1, 2]}, {"items": [1, 2, 3]}),
        ({"text": "Hel"}, {"text": "Hello"}),
        ({"a/b": {"~": 1}}, {"a/b": {"~": 2}}),  # pointer escaping: ~1 and ~0
        ({"items": [1, 2, 3]}, {"items": [3, 1]}),
    ],
)
def test_make_patch_turns_the_old_state_into_the_new(old: Any, new: Any) -> None:
    operations = make_patch(old, new)
    assert jsonpatch.apply_patch(old, operations) == new
    assert (operations == []) == (old == new)


def test_make_patch_diffs_the_json_the_client_has() -> None:
    at = datetime(2026, 1, 1, tzinfo=timezone.utc)
    old = {"interactions": [Interaction(prompt="hi", response="", at=at)]}
    new = {"interactions": [Interaction(prompt="hi", response="Hel", at=at)]}
    assert make_patch(old, new) == [
        {"op": "replace", "path": "/interactions/0/response", "value": "Hel"}
    ]
