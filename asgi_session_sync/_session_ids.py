"""What a valid session id is: one home for the rule, used by the middleware and the NATS bridge.

A session id comes from a URL, so an attacker chooses it. It becomes a loader argument, a log
field and a NATS subject token, so whatever pattern a user configures, some characters never
pass: the NATS subject separator and wildcards (``.``, ``*``, ``>``), whitespace, every
control, format, surrogate, private-use or unassigned code point (Unicode categories ``Cc``,
``Cf``, ``Cs``, ``Co``, ``Cn``: C0 and C1 controls, bidi controls such as U+202E, zero-width
characters such as U+200B and U+FEFF), every other default-ignorable code point (Unicode's
``Default_Ignorable_Code_Point``: variation selectors, Hangul fillers, the combining grapheme
joiner), and U+FFFD, which stands for undecodable bytes. These could forge log lines, hide what
an id says, or make two different URLs name one session.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["DEFAULT_SESSION_ID_PATTERN", "MAX_SESSION_ID_LENGTH", "SessionIdRules"]

DEFAULT_SESSION_ID_PATTERN = r"[A-Za-z0-9_-]{1,128}"
"""The default pattern: ASCII letters, digits, ``_`` and ``-``, 1 to 128 characters."""

MAX_SESSION_ID_LENGTH = 256
"""Longest session id accepted whatever the pattern, in characters."""

_ASCII_NEVER = re.compile(r"[.*>\s\x00-\x1f\x7f]")
# Said as what they are in a path or a query first: the rule is the middleware's too, in apps
# that have no NATS at all.
_SUBJECT_CHARS = {
    ".": "the separator of pub/sub subjects",
    "*": "a pub/sub wildcard",
    ">": "a pub/sub wildcard",
}
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})
# Unicode 15.1 DerivedCoreProperties.txt, Default_Ignorable_Code_Point, less what the
# categories above already refuse; and U+FFFD, the replacement for undecodable bytes.
_INVISIBLE = re.compile(
    "[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u3164\ufe00-\ufe0f\uffa0\ufffd"
    "\U000e0100-\U000e01ef]"
)


class SessionIdRules:
    """Decides whether a session id may reach a loader, a log line or a NATS subject.

    Args:
        pattern: Regular expression a session id must fully match, on top of the fixed rules
            in this module's docstring and :data:`MAX_SESSION_ID_LENGTH`.
    """

    __slots__ = ("_pattern",)

    def __init__(self, pattern: str | re.Pattern[str] = DEFAULT_SESSION_ID_PATTERN) -> None:
        self._pattern = re.compile(pattern) if isinstance(pattern, str) else pattern

    def __call__(self, session_id: str) -> bool:
        """Return whether ``session_id`` is valid: the fast check, with no reason."""
        if not 0 < len(session_id) <= MAX_SESSION_ID_LENGTH:
            return False
        if _ASCII_NEVER.search(session_id) is not None:
            return False
        if not session_id.isascii() and _refused_char(session_id) is not None:
            return False
        return self._pattern.fullmatch(session_id) is not None

    def problem(self, session_id: str) -> str | None:
        """Return why ``session_id`` is refused, as a phrase for an error or a log, else ``None``.

        The phrase never contains the id itself: callers add it, clipped, with ``%r``.
        """
        if not session_id:
            return "it is empty"
        if len(session_id) > MAX_SESSION_ID_LENGTH:
            return f"it has {len(session_id)} characters, at most {MAX_SESSION_ID_LENGTH} allowed"
        for char, what in _SUBJECT_CHARS.items():
            if char in session_id:
                return f"{char!r} is never allowed, whatever the pattern ({what})"
        refused = _refused_char(session_id)
        if refused is not None:
            return (
                f"it contains U+{ord(refused):04X}, a whitespace, control, format or "
                "invisible character"
            )
        if self._pattern.fullmatch(session_id) is None:
            return f"it does not match the session id pattern {self._pattern.pattern!r}"
        return None


def _refused_char(session_id: str) -> str | None:
    for char in session_id:
        if char.isspace() or unicodedata.category(char) in _REFUSED_CATEGORIES:
            return char
    invisible = _INVISIBLE.search(session_id)
    return None if invisible is None else invisible.group()
