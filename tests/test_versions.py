from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from asgi_session_sync import user_identity
from asgi_session_sync.versions import (
    PatchFit,
    classify_patch,
    is_newer,
    parse_version,
    same_version,
)

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
    assert not same_version(7, "2026-01-01T00:00:00Z")


# Ints beyond JavaScript's exact range travel as decimal strings and order as ints.
SAFE = 2**53 - 1


@pytest.mark.parametrize(
    ("candidate", "baseline", "expected"),
    [
        (SAFE + 2, SAFE + 1, True),  # equal as floats: 9007199254740992.0 both
        (str(SAFE + 2), SAFE + 1, True),
        (str(SAFE + 2), str(SAFE + 1), True),
        (str(SAFE + 1), str(SAFE + 2), False),
        (str(2**64), 2**64, False),
        ("-" + str(2**64), -(2**64) + 1, False),
        ("10", "9", True),  # as ints, not as text
        ("7", 7, False),
        ("1" * 65, 1, None),  # too long to be a version
    ],
)
def test_decimal_strings_order_as_ints(
    candidate: object, baseline: object, expected: bool | None
) -> None:
    assert is_newer(candidate, baseline) is expected


def test_a_decimal_string_is_the_same_version_as_its_int() -> None:
    assert same_version(7, "7")
    assert same_version(str(2**63 + 1), 2**63 + 1)
    assert not same_version(str(2**63 + 1), 2**63)


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
        ("-3", -3),
        (str(2**64 + 1), 2**64 + 1),
        ("9" * 64, int("9" * 64)),
        ("+3", None),
        (" 3", None),
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


@pytest.mark.parametrize(
    ("base", "version", "current", "fit"),
    [
        (7, 8, 7, PatchFit.CHAINS),
        ("7", "8", 7, PatchFit.CHAINS),
        (6, 7, 7, PatchFit.STALE),
        (3, 5, 7, PatchFit.STALE),
        (8, 9, 7, PatchFit.AHEAD),
        (6, 8, 7, PatchFit.OVERLAPS),
        (7, 8, None, PatchFit.UNORDERED),
        (7, 8, "2026-01-01T00:00:00Z", PatchFit.UNORDERED),
        (None, 8, 7, PatchFit.UNORDERED),
        (str(SAFE + 1), str(SAFE + 2), SAFE + 1, PatchFit.CHAINS),
        (str(SAFE + 2), str(SAFE + 3), SAFE + 1, PatchFit.AHEAD),
        (SAFE, SAFE + 1, str(SAFE + 1), PatchFit.STALE),
        (
            "2026-01-01T00:00:00Z",
            "2026-01-01T00:00:01Z",
            "2026-01-01T01:00:00+01:00",
            PatchFit.CHAINS,
        ),
    ],
)
def test_classify_patch(base: object, version: object, current: object, fit: PatchFit) -> None:
    assert classify_patch(base, version, current) is fit


@pytest.mark.parametrize(
    ("base_version", "version"), [(5, 5), (5, 3), (5, "2026-01-01T00:00:00Z"), (None, 6)]
)
def test_a_patch_whose_version_is_not_newer_than_its_base_is_unordered(
    base_version: object, version: object
) -> None:
    from asgi_session_sync.versions import PatchFit, classify_patch

    assert classify_patch(base_version, version, 5) is PatchFit.UNORDERED


def test_an_int_is_a_version_only_if_its_wire_form_fits() -> None:
    # Ints beyond 2**53 travel as decimal strings, and a string over 64 characters is not a
    # version: an int that would need one is not a version either, on any side.
    from asgi_session_sync.versions import MAX_VERSION_CHARS, version_key

    assert MAX_VERSION_CHARS == 64
    for fits in (10**64 - 1, -(10**63) + 1):
        assert version_key(fits) is not None
        assert version_key(str(fits)) is not None
    for too_long in (10**64, -(10**63)):
        assert version_key(too_long) is None
        assert version_key(str(too_long)) is None
