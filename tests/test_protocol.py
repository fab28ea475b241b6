"""The wire protocol: the events' bytes, what a version is, building patches, reading frames."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import jsonpatch
import pytest
from pydantic import BaseModel, ValidationError

from asgi_session_sync import make_patch
from asgi_session_sync.protocol import (
    HEARTBEAT,
    MAX_VERSION,
    Frame,
    Kind,
    SessionPatch,
    SessionSynced,
    SessionUpdate,
    as_version,
    parse_frame,
    patch_problem,
    sse_event,
    version_from_text,
)

# --------------------------------------------------------------------------------------------
# The events' wire format
# --------------------------------------------------------------------------------------------


def test_session_update_bytes_name_type_session_id_version_owner_session_in_order() -> None:
    event = SessionUpdate(session_id="s1", version=7, owner="alice", session={"title": "Hé"})
    assert event.to_json() == (
        b'{"type":"session_update","session_id":"s1","version":7,"owner":"alice",'
        b'"session":{"title":"H\xc3\xa9"}}'
    )


def test_session_update_without_version_leaves_version_out_and_keeps_a_null_owner() -> None:
    event = SessionUpdate(session_id="s1", session={"a": 1})
    assert event.to_json() == (
        b'{"type":"session_update","session_id":"s1","owner":null,"session":{"a":1}}'
    )


def test_a_resync_snapshot_carries_reset_true_last() -> None:
    event = SessionUpdate(session_id="s1", version=3, session={}, reset=True)
    assert event.to_json() == (
        b'{"type":"session_update","session_id":"s1","version":3,"owner":null,"session":{},'
        b'"reset":true}'
    )


def test_reset_can_only_be_true_or_left_out() -> None:
    with pytest.raises(ValidationError):
        SessionUpdate(session_id="s1", version=3, session={}, reset=False)  # type: ignore[arg-type]


def test_session_synced_bytes() -> None:
    assert SessionSynced(session_id="s1", version=7).to_json() == (
        b'{"type":"session_synced","session_id":"s1","version":7}'
    )


def test_session_patch_has_the_members_of_the_contract() -> None:
    patch = SessionPatch(
        session_id="s1",
        base_version=7,
        version=8,
        patch=[{"op": "replace", "path": "/interactions/3/response", "value": "Hel"}],
    )
    decoded = json.loads(patch.to_json())
    decoded.pop("owner", None)  # whether a missing owner is left out: see the next test
    assert decoded == {
        "type": "session_patch",
        "session_id": "s1",
        "base_version": 7,
        "version": 8,
        "patch": [{"op": "replace", "path": "/interactions/3/response", "value": "Hel"}],
    }


def test_session_patch_without_owner_leaves_owner_out() -> None:
    patch = SessionPatch(session_id="s1", base_version=7, version=8, patch=[])
    assert patch.to_json() == (
        b'{"type":"session_patch","session_id":"s1","version":8,"base_version":7,"patch":[]}'
    )


def test_session_patch_names_its_owner_when_given() -> None:
    patch = SessionPatch(session_id="s1", owner="alice", base_version=7, version=8, patch=[])
    assert json.loads(patch.to_json())["owner"] == "alice"


def test_the_event_type_is_fixed() -> None:
    with pytest.raises(ValidationError):
        SessionUpdate(type="token", session_id="s1", session={})  # type: ignore[arg-type]


def test_unknown_members_are_refused() -> None:
    with pytest.raises(ValidationError):
        SessionUpdate(session_id="s1", session={}, colour="red")  # type: ignore[call-arg]


def test_heartbeat_is_a_frame_of_its_own_type() -> None:
    frame = parse_frame(HEARTBEAT)
    assert isinstance(frame, Frame)
    assert frame.kind is Kind.OTHER
    assert json.loads(HEARTBEAT) == {"type": "heartbeat"}


# --------------------------------------------------------------------------------------------
# Versions: whole numbers from 0 to 2**53 - 1
# --------------------------------------------------------------------------------------------

NOT_VERSIONS = [
    "7",  # a digit string is text, not a number
    "2026-01-01T00:00:00Z",
    datetime(2026, 1, 1, tzinfo=timezone.utc),
    MAX_VERSION + 1,
    2**64,
    -1,
    True,
    False,
    7.5,
    -0.5,
    float("inf"),
    float("nan"),
    float(MAX_VERSION + 1),
    [7],
]


@pytest.mark.parametrize("value", [0, 1, 7, MAX_VERSION, 7.0, 0.0, float(MAX_VERSION)])
def test_whole_numbers_from_0_to_2_53_minus_1_are_versions(value: object) -> None:
    version = as_version(value)
    assert version == value
    assert type(version) is int


@pytest.mark.parametrize("value", NOT_VERSIONS, ids=repr)
def test_anything_else_is_not_a_version(value: object) -> None:
    assert as_version(value) is None


def test_max_version_is_javascripts_largest_exact_integer() -> None:
    assert MAX_VERSION == 2**53 - 1 == 9007199254740991


@pytest.mark.parametrize("value", NOT_VERSIONS, ids=repr)
def test_events_refuse_what_is_not_a_version(value: Any) -> None:
    with pytest.raises(ValidationError):
        SessionUpdate(session_id="s1", session={}, version=value)
    with pytest.raises(ValidationError):
        SessionSynced(session_id="s1", version=value)
    with pytest.raises(ValidationError):
        SessionPatch(session_id="s1", base_version=value, version=MAX_VERSION, patch=[])
    with pytest.raises(ValidationError):
        SessionPatch(session_id="s1", base_version=0, version=value, patch=[])


def test_a_whole_float_is_the_same_version_as_its_int() -> None:
    as_float = SessionUpdate.model_validate({"session_id": "s1", "session": {}, "version": 7.0})
    assert as_float.to_json() == (SessionUpdate(session_id="s1", session={}, version=7).to_json())
    patch = SessionPatch.model_validate(
        {"session_id": "s1", "base_version": 6.0, "version": 7.0, "patch": []}
    )
    assert (patch.base_version, patch.version) == (6, 7)
    assert b'"version":7,' in patch.to_json()


def test_json_input_reads_versions_as_json_parse_does() -> None:
    read = SessionUpdate.model_validate_json('{"session_id": "s1", "session": {}, "version": 7e0}')
    assert read.version == 7
    with pytest.raises(ValidationError):
        SessionUpdate.model_validate_json('{"session_id": "s1", "session": {}, "version": "7"}')


@pytest.mark.parametrize(("base_version", "version"), [(5, 5), (5, 4), (0, 0)])
def test_a_session_patch_refuses_a_version_not_greater_than_its_base(
    base_version: int, version: int
) -> None:
    with pytest.raises(ValidationError, match="greater than base_version"):
        SessionPatch(session_id="s1", base_version=base_version, version=version, patch=[])


def test_a_session_patch_needs_both_versions() -> None:
    with pytest.raises(ValidationError):
        SessionPatch(session_id="s1", version=2, patch=[])  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        SessionPatch(session_id="s1", base_version=1, patch=[])  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("7", 7),
        ("007", 7),
        ("9007199254740991", MAX_VERSION),  # 16 digits
        ("0009007199254740", 9007199254740),
        ("9007199254740992", None),  # 2**53
        ("9999999999999999", None),
        ("00000000000000007", None),  # 17 digits, whatever their value
        ("1" * 100, None),
        ("", None),
        ("x", None),
        ("7a", None),
        ("-3", None),
        ("+3", None),
        (" 3", None),
        ("3 ", None),
        ("7.0", None),
        ("1e3", None),
        ("١٢", None),  # Arabic-Indic digits are digits to str.isdigit, not to a version
        ("\uff12", None),  # a fullwidth 2
    ],
)
def test_version_from_text(text: str, expected: int | None) -> None:
    assert version_from_text(text) == expected


# --------------------------------------------------------------------------------------------
# Patch operations
# --------------------------------------------------------------------------------------------

NOT_RFC_6902 = [
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
]


@pytest.mark.parametrize("operations", NOT_RFC_6902)
def test_a_session_patch_refuses_what_is_not_rfc_6902(operations: Any) -> None:
    with pytest.raises(ValidationError):
        SessionPatch(session_id="s1", base_version=1, version=2, patch=operations)
    assert patch_problem(operations) is not None


@pytest.mark.parametrize(
    "operations",
    [
        [],
        [{"op": "remove", "path": "/a"}],
        [{"op": "move", "path": "/a", "from": ""}],
        [{"op": "replace", "path": "", "value": None}],
        [{"op": "test", "path": "/a~1b/0", "value": [1]}],
    ],
)
def test_rfc_6902_patches_have_no_problem(operations: Any) -> None:
    assert patch_problem(operations) is None
    SessionPatch(session_id="s1", base_version=1, version=2, patch=operations)


@pytest.mark.parametrize("operations", [None, {"op": "remove", "path": "/a"}, "[]"])
def test_a_patch_that_is_not_a_list_has_a_problem(operations: object) -> None:
    assert patch_problem(operations) == "the patch is not a list of operations"


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
    assert patch_problem(operations) is None


def test_make_patch_diffs_the_json_the_client_has() -> None:
    at = datetime(2026, 1, 1, tzinfo=timezone.utc)
    old = {"interactions": [Interaction(prompt="hi", response="", at=at)]}
    new = {"interactions": [Interaction(prompt="hi", response="Hel", at=at)]}
    assert make_patch(old, new) == [
        {"op": "replace", "path": "/interactions/0/response", "value": "Hel"}
    ]


# --------------------------------------------------------------------------------------------
# Reading frames
# --------------------------------------------------------------------------------------------


def frame_of(**members: Any) -> str:
    return json.dumps(members, ensure_ascii=False)


def parsed(text: str) -> Frame:
    frame = parse_frame(text)
    assert isinstance(frame, Frame), frame
    return frame


def test_an_update_is_parsed_once_with_what_ordering_and_routing_need() -> None:
    text = frame_of(type="session_update", session_id="s1", owner="bob", version=7, session={})
    assert parse_frame(text) == Frame(
        text, Kind.UPDATE, "s1", "bob", 7, None, reset=False, size=len(text)
    )


def test_a_patch_is_parsed_with_both_versions() -> None:
    text = frame_of(type="session_patch", session_id="s1", base_version=7, version=8, patch=[])
    frame = parsed(text)
    assert (frame.kind, frame.base_version, frame.version) == (Kind.PATCH, 7, 8)
    assert frame.text is text


def test_synced_is_parsed() -> None:
    frame = parsed(frame_of(type="session_synced", session_id="s1", version=3))
    assert (frame.kind, frame.version) == (Kind.SYNCED, 3)


def test_an_update_without_version_is_a_frame_without_version() -> None:
    frame = parsed(frame_of(type="session_update", session_id="s1", session={}))
    assert (frame.kind, frame.version) == (Kind.UPDATE, None)


@pytest.mark.parametrize(
    "text",
    [
        HEARTBEAT,
        '{"type": "token", "session_id": "s1", "version": "not one"}',
        '{"type": "session_deleted", "session_id": "s1"}',
        '{"type": 5, "version": -1}',
        '{"no": "type"}',
    ],
)
def test_other_types_pass_as_other_with_their_session_but_no_version(text: str) -> None:
    frame = parsed(text)
    assert frame.kind is Kind.OTHER
    assert frame.version is None
    # The session an app's own event names is read, so a hub can refuse one for another session.
    assert frame.session_id == ("s1" if '"session_id": "s1"' in text else None)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", "not JSON"),
        ("", "not JSON"),
        ('{"type": "session_update"} trailing', "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('"session_update"', "not a JSON object"),
        ("7", "not a JSON object"),
        (
            '{"type": "session_patch", "session_id": "s1", "version": 8, "patch": []}',
            "a patch without a base_version and a version",
        ),
        (
            '{"type": "session_patch", "session_id": "s1", "base_version": 7, "patch": []}',
            "a patch without a base_version and a version",
        ),
        (
            '{"type": "session_patch", "base_version": "7", "version": 8, "patch": []}',
            "a patch without a base_version and a version",
        ),
        (
            '{"type": "session_patch", "base_version": 8, "version": 8, "patch": []}',
            "a patch whose version is not greater than its base_version",
        ),
        (
            '{"type": "session_patch", "base_version": 7, "version": 8, "patch": {}}',
            "a patch whose operations are not a list",
        ),
        (
            '{"type": "session_patch", "base_version": 7, "version": 8}',
            "a patch whose operations are not a list",
        ),
        ('{"type": "session_synced", "session_id": "s1"}', "a session_synced without a version"),
        # RFC 8259 has no NaN or Infinity, and the browser's JSON.parse throws on them: a frame
        # holding one, anywhere, would be counted as sent and never read.
        ('{"type": "session_update", "session_id": "s1", "session": {"x": NaN}}', "not JSON"),
        ('{"type": "session_update", "session_id": "s1", "version": Infinity}', "not JSON"),
        (
            '{"type": "session_patch", "base_version": 1, "version": 2, '
            '"patch": [{"op": "add", "path": "/x", "value": -Infinity}]}',
            "not JSON",
        ),
        ('{"type": "token", "session_id": "s1", "score": NaN}', "not JSON"),
    ],
)
def test_frames_that_are_not_valid_say_why(text: str, reason: str) -> None:
    assert parse_frame(text) == reason


@pytest.mark.parametrize(
    "version",
    ['"7"', "true", "-1", "7.5", "9007199254740992", "18446744073709551616", "1e400", "[7]"],
)
@pytest.mark.parametrize("event_type", ["session_update", "session_synced", "session_patch"])
def test_a_bad_version_makes_a_session_event_invalid(event_type: str, version: str) -> None:
    text = (
        f'{{"type": "{event_type}", "session_id": "s1", "base_version": 0, '
        f'"version": {version}, "patch": []}}'
    )
    assert isinstance(parse_frame(text), str)


@pytest.mark.parametrize(("version", "expected"), [("7.0", 7), ("7e0", 7), ("0", 0)])
def test_a_whole_number_in_any_json_spelling_is_the_version(version: str, expected: int) -> None:
    text = f'{{"type": "session_update", "session_id": "s1", "version": {version}}}'
    assert parsed(text).version == expected


def test_max_version_is_read_exactly() -> None:
    text = frame_of(type="session_update", session_id="s1", version=MAX_VERSION)
    assert parsed(text).version == MAX_VERSION


@pytest.mark.parametrize(("reset", "expected"), [(True, True), (False, False), ("yes", False)])
def test_reset_is_read_only_when_true(reset: object, expected: bool) -> None:
    text = frame_of(type="session_update", session_id="s1", version=1, session={}, reset=reset)
    assert parsed(text).reset is expected
    assert parsed(frame_of(type="session_update", session_id="s1", version=1)).reset is False


def test_a_resync_snapshot_reads_back_as_a_reset() -> None:
    text = SessionUpdate(session_id="s1", version=4, session={}, reset=True).to_json().decode()
    frame = parsed(text)
    assert (frame.kind, frame.version, frame.reset) == (Kind.UPDATE, 4, True)


def test_session_id_and_owner_that_are_not_strings_are_none() -> None:
    frame = parsed(frame_of(type="session_update", session_id=5, owner=["x"], version=1))
    assert (frame.session_id, frame.owner) == (None, None)


@pytest.mark.parametrize(
    "session",
    [{"t": "plain"}, {"t": "é"}, {"t": "日本語"}, {"t": "🙂"}, {"t": "\u2028"}],
    ids=["ascii", "2-byte", "3-byte", "4-byte", "line separator"],
)
@pytest.mark.parametrize("event_type", ["session_update", "heartbeat"])
def test_size_is_bytes_of_utf_8(session: Any, event_type: str) -> None:
    text = frame_of(type=event_type, session_id="s1", version=1, session=session)
    assert parsed(text).size == len(text.encode("utf-8"))


def test_a_size_given_by_the_caller_is_kept() -> None:
    text = frame_of(type="session_update", session_id="s1", version=1)
    frame = parse_frame(text, size=999)
    assert isinstance(frame, Frame)
    assert frame.size == 999


def test_every_event_model_reads_back_as_its_kind() -> None:
    events: list[tuple[Any, Kind]] = [
        (SessionUpdate(session_id="s1", version=1, session={"a": "é"}), Kind.UPDATE),
        (SessionSynced(session_id="s1", version=1), Kind.SYNCED),
        (
            SessionPatch(
                session_id="s1",
                base_version=1,
                version=2,
                patch=[{"op": "add", "path": "/a", "value": "é"}],
            ),
            Kind.PATCH,
        ),
    ]
    for event, kind in events:
        data = event.to_json()
        frame = parse_frame(data.decode(), size=len(data))
        assert isinstance(frame, Frame)
        assert (frame.kind, frame.session_id, frame.version) == (kind, "s1", event.version)


@pytest.mark.parametrize(
    ("text", "data"),
    [
        ('{"type":"session_patch","version":8}', ['{"type":"session_patch","version":8}']),
        # A raw line break comes only from text that is not JSON as encoders write it: each
        # of the three (CRLF, CR, LF) starts a data line; U+2028 does not.
        ('{"a":\r\n1,\r"b":\n2,"c":"\u2028"}', ['{"a":', "1,", '"b":', '2,"c":"\u2028"}']),
    ],
)
def test_an_event_has_a_data_line_per_line_of_its_text(text: str, data: list[str]) -> None:
    event = sse_event(Frame(text, Kind.OTHER)).decode()
    assert event == "".join(f"data: {line}\n" for line in data) + "\n"
