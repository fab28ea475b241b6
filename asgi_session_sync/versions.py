"""Ordering session versions: ints by value, timestamps by the instant they name.

A version is an ``int`` (a counter, a row version) or a timestamp: a ``datetime`` or an
ISO-8601 string ``YYYY-MM-DDTHH:MM:SS[.fraction][Z|+HH:MM|+HHMM]`` such as
``"2026-11-25T13:01:43.123456+00:00"`` (the same grammar on every Python version and in the
browser client; a fraction is kept to the microsecond). Timestamps compare as instants,
so ``"2026-01-01T01:00:00+01:00"`` equals ``"2026-01-01T00:00:00Z"``; a timestamp without an
offset is taken as UTC. An int and a timestamp never compare: such a pair is "unknown", and
code that orders events lets the frame through rather than guess. ``bool`` is not a version.

**Large ints.** A string of decimal digits, ``-?[0-9]+``, is an *int* version and compares as
one: ``"9007199254740993"`` is newer than ``9007199254740992``. That is how ints beyond
JavaScript's exact range, ±(2**53 - 1), travel in JSON. At most 64 characters: longer input is not a
version.

**Patches.** :func:`classify_patch` says where a delta stands against the version a client
has; the NATS bridge and the middleware's fence both decide by it.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime, timedelta, timezone

__all__ = [
    "MAX_VERSION_CHARS",
    "PatchFit",
    "Version",
    "classify_patch",
    "is_newer",
    "parse_version",
    "same_version",
    "version_key",
]

Version = int | datetime | str
"""A session version: an int (a counter) or a timestamp (a ``datetime`` or an ISO-8601 string).

A string of decimal digits is an int: events read it as one, and write ints beyond
``±(2**53 - 1)`` as such strings, so browsers read them exactly.
"""

VersionKey = tuple[int, int]
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)

MAX_VERSION_CHARS = 64
"""Longest version on the wire, in characters: a longer string is not a version (and costs no
parsing), nor is an int whose decimal form is longer, since it would travel as such a string."""

# Ints strictly between these have a decimal form of at most MAX_VERSION_CHARS characters.
_INT_ABOVE = -(10 ** (MAX_VERSION_CHARS - 1))
_INT_BELOW = 10**MAX_VERSION_CHARS

_INT = re.compile(r"-?[0-9]+")


def version_key(version: object) -> VersionKey | None:
    """Return a sort key for ``version``, or ``None`` when it is not a version.

    Keys of ints and of timestamps have different first items, so callers compare the key's
    kind before its value (see :func:`is_newer`).
    """
    if isinstance(version, bool):
        return None
    if isinstance(version, int):
        return (0, version) if _INT_ABOVE < version < _INT_BELOW else None
    if isinstance(version, str):
        if len(version) > MAX_VERSION_CHARS:
            return None
        if _INT.fullmatch(version) is not None:
            return (0, int(version))
        version = _parse_timestamp(version)
        if version is None:
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

    ``-?[0-9]+`` gives an int of any size (``since=18446744073709551616`` is exact), a
    timestamp stays a string. Returns ``None`` for anything that is not a version, and for
    input over :data:`MAX_VERSION_CHARS` characters.
    """
    if len(text) > MAX_VERSION_CHARS:
        return None
    if _INT.fullmatch(text) is not None:
        return int(text)
    return text if version_key(text) is not None else None


class PatchFit(enum.Enum):
    """Where a patch (``base_version`` to ``version``) stands against the version a client has."""

    CHAINS = "chains"
    """``base_version`` is the client's version: apply it."""
    STALE = "stale"
    """``version`` is not newer than the client's: already applied, or superseded."""
    AHEAD = "ahead"
    """``base_version`` is newer than the client's: a patch in between is missing."""
    OVERLAPS = "overlaps"
    """``base_version`` is older and ``version`` newer than the client's: it starts from a
    state the client has moved past and cannot be applied to what it has."""
    UNORDERED = "unordered"
    """The versions do not compare (missing, of another kind, or not versions), or the patch
    itself is malformed: its ``version`` is not newer than its ``base_version``."""


def classify_patch(base_version: object, version: object, current: object) -> PatchFit:
    """Where a patch from ``base_version`` to ``version`` stands against ``current``.

    Only :attr:`PatchFit.CHAINS` may be applied to the state at ``current``. A patch whose
    ``version`` is not newer than its own ``base_version`` is malformed, whatever ``current``
    is: unordered. Otherwise the checks run in this order: chains, stale, ahead, overlaps;
    anything that does not compare is unordered.
    """
    if is_newer(version, base_version) is not True:
        return PatchFit.UNORDERED
    if same_version(base_version, current):
        return PatchFit.CHAINS
    newer = is_newer(version, current)
    if newer is False:
        return PatchFit.STALE
    base_newer = is_newer(base_version, current)
    if newer is None or base_newer is None:
        return PatchFit.UNORDERED
    return PatchFit.AHEAD if base_newer else PatchFit.OVERLAPS


# One grammar on every Python version and in the browser client (session-sync.js): date, "T",
# time to the second, an optional fraction (kept to the microsecond), an optional offset.
_TIMESTAMP = re.compile(
    r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:?\d{2})?",
    re.IGNORECASE,
)


def _parse_timestamp(text: str) -> datetime | None:
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        return None
    base, fraction, offset = match.groups()
    try:
        when = datetime.fromisoformat(base)
    except ValueError:  # 2026-02-30T...
        return None
    when = when.replace(microsecond=int((fraction or "").ljust(6, "0")[:6]))
    if offset is None or offset.upper() == "Z":
        return when.replace(tzinfo=timezone.utc)
    sign = -1 if offset[0] == "-" else 1
    hours, minutes = int(offset[1:3]), int(offset[-2:])
    if hours > 23 or minutes > 59:
        return None
    return when.replace(tzinfo=timezone(sign * timedelta(hours=hours, minutes=minutes)))
