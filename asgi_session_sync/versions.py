"""Ordering session versions: ints by value, timestamps by the instant they name.

A version is an ``int`` (a counter, a row version) or a timestamp: a ``datetime`` or an
ISO-8601 string such as ``"2026-11-25T13:01:43.123456+00:00"``. Timestamps compare as instants,
so ``"2026-01-01T01:00:00+01:00"`` equals ``"2026-01-01T00:00:00Z"``; a timestamp without an
offset is taken as UTC. An int and a timestamp never compare: such a pair is "unknown", and
code that orders events lets the frame through rather than guess. ``bool`` is not a version.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from .events import Version

__all__ = ["is_newer", "parse_version", "same_version", "version_key"]

VersionKey = tuple[int, int]
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


def version_key(version: object) -> VersionKey | None:
    """Return a sort key for ``version``, or ``None`` when it is not a version.

    Keys of ints and of timestamps have different first items, so callers compare the key's
    kind before its value (see :func:`is_newer`).
    """
    if isinstance(version, bool):
        return None
    if isinstance(version, int):
        return (0, version)
    if isinstance(version, str):
        try:
            version = datetime.fromisoformat(version.replace("Z", "+00:00", 1))
        except ValueError:
            return None
    if isinstance(version, datetime):
        if version.tzinfo is None:
            version = version.replace(tzinfo=timezone.utc)
        # Whole microseconds: a float timestamp cannot tell neighbouring microseconds apart.
        return (1, (version - _EPOCH) // _MICROSECOND)
    return None


def is_newer(candidate: Version | object, baseline: Version | object) -> bool | None:
    """Whether ``candidate`` is strictly newer than ``baseline``; ``None`` if they don't compare."""
    new, old = version_key(candidate), version_key(baseline)
    if new is None or old is None or new[0] != old[0]:
        return None
    return new[1] > old[1]


def same_version(a: object, b: object) -> bool:
    """Whether ``a`` and ``b`` are versions naming the same point (``1 == 1``, equal instants)."""
    key = version_key(a)
    return key is not None and key == version_key(b)


def parse_version(text: str) -> Version | None:
    """Parse a version from a query parameter: digits give an int, a timestamp stays a string.

    Returns ``None`` for anything that is not a version (and for over-long input).
    """
    if len(text) > 64:
        return None
    if text.isascii() and text.isdigit():
        return int(text)
    return text if version_key(text) is not None else None
