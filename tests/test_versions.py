from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from asgi_session_sync import user_identity
from asgi_session_sync.versions import is_newer, parse_version, same_version

UTC = timezone.utc


@pytest.mark.parametrize(
    ("candidate", "baseline", "expected"),
    [
        (2, 1, True),
        (1, 1, False),
        (0, 1, False),
        ("2026-01-01T01:00:00+01:00", "2026-01-01T00:00:00Z", False),  # same instant
        ("2026-01-01T00:00:00.000001Z", "2026-01-01T00:00:00Z", True),
        (datetime(2026, 1, 1, tzinfo=UTC), "2025-12-31T23:59:59Z", True),
        (datetime(2026, 1, 1), datetime(2026, 1, 1, tzinfo=UTC), False),  # naive is UTC
        (1, "2026-01-01T00:00:00Z", None),  # an int and a timestamp never compare
        (True, 0, None),
        ("tuesday", 1, None),
        (None, 1, None),
        (1.5, 1, None),
    ],
)
def test_is_newer(candidate: object, baseline: object, expected: bool | None) -> None:
    assert is_newer(candidate, baseline) is expected


def test_neighbouring_microseconds_are_told_apart_far_from_the_epoch() -> None:
    base = datetime(9999, 12, 31, 23, 59, 58, tzinfo=UTC)
    assert is_newer(base + timedelta(microseconds=1), base) is True


def test_same_version() -> None:
    assert same_version(7, 7)
    assert same_version("2026-01-01T01:00:00+01:00", datetime(2026, 1, 1, tzinfo=UTC))
    assert not same_version(None, None)
    assert not same_version(7, "7")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7", 7),
        ("007", 7),
        ("2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z"),
        ("x", None),
        ("", None),
        ("١٢", None),
        ("9" * 65, None),
    ],
)
def test_parse_version(text: str, expected: object) -> None:
    assert parse_version(text) == expected


class StarletteLikeUser:
    is_authenticated = True

    @property
    def identity(self) -> str:
        return "erin"


class Anonymous:
    is_authenticated = False


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        (None, None),
        ("alice", "alice"),
        (42, "42"),
        ({"id": "bob"}, "bob"),
        ({"sub": "bob"}, None),
        (SimpleNamespace(id=5), "5"),
        (SimpleNamespace(username="carol"), None),
        (StarletteLikeUser(), "erin"),
        (Anonymous(), None),
        (object(), None),
    ],
)
def test_user_identity(user: object, expected: str | None) -> None:
    assert user_identity(user) == expected


@pytest.mark.parametrize(
    "text",
    [
        "2026-01-01",
        "2026-01-01T00:00",
        "2026-01-01T00:00:00+01",
        "2026-02-30T00:00:00Z",
        "2026-01-01T00:00:00+25:00",
        "2026-01-01 00:00:00Z",
    ],
)
def test_timestamps_outside_the_shared_grammar_are_not_versions(text: str) -> None:
    # The browser client's grammar: no date-only, no minutes-only, no short offsets.
    assert parse_version(text) is None


def test_long_fractions_are_kept_to_the_microsecond() -> None:
    assert same_version("2026-01-01T00:00:00.123456789Z", "2026-01-01T00:00:00.123456Z")
    assert same_version("2026-01-01T01:00:00+0100", "2026-01-01T00:00:00Z")
