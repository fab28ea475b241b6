"""Which WebSocket paths the middleware serves, and where their session id comes from."""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl

from ._types import Scope

__all__ = ["NoSessionId", "PathMatcher", "clip_for_log", "query_values", "route_path"]

_PLACEHOLDER = "{session_id}"
_ANY_PLACEHOLDER = re.compile(r"\{[^}]*\}")
_LOG_CHARS = 64


class NoSessionId:
    """A served path whose session id cannot be read; ``reason`` says why, for the log."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"NoSessionId({self.reason!r})"


_MISSING = NoSessionId("missing")
_REPEATED = NoSessionId("repeated query parameter")


class PathMatcher:
    """Matches a WebSocket scope against the configured paths and extracts the raw session id.

    Exact paths are one dict lookup; patterns with a ``{session_id}`` segment are compiled once.
    """

    def __init__(self, paths: Iterable[str], *, session_id_param: str) -> None:
        if isinstance(paths, str):
            raise TypeError(f"paths must be a list of paths, not a string: use paths=[{paths!r}]")
        self._exact: set[str] = set()
        self._patterns: list[re.Pattern[str]] = []
        for path in paths:
            self._add(path)
        if not self._exact and not self._patterns:
            raise ValueError("paths must name at least one WebSocket path")
        if not isinstance(session_id_param, str) or not session_id_param:
            raise ValueError(
                f"session_id_param must be a non-empty query parameter name: got "
                f"{session_id_param!r}"
            )
        self._param = session_id_param

    def _add(self, path: str) -> None:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"paths must start with '/': got {path!r}")
        placeholders = _ANY_PLACEHOLDER.findall(path)
        if not placeholders:
            self._exact.add(path)
            return
        if len(placeholders) == 1 and placeholders[0].startswith("{session_id:"):
            raise ValueError(
                f"drop the converter from {placeholders[0]!r}: the middleware takes the id as "
                f"text and checks it with session_id_pattern; write '{{session_id}}': got {path!r}"
            )
        if placeholders != [_PLACEHOLDER]:
            raise ValueError(
                f"a path pattern may hold exactly one '{{session_id}}' placeholder: got {path!r}"
            )
        before, after = path.split(_PLACEHOLDER)
        if not before.endswith("/") or not (after == "" or after.startswith("/")):
            raise ValueError(f"'{{session_id}}' must be a whole path segment: got {path!r}")
        regex = f"{re.escape(before)}(?P<session_id>[^/]+){re.escape(after)}"
        self._patterns.append(re.compile(regex))

    def match(self, scope: Scope) -> str | NoSessionId | None:
        """Return the raw session id, why there is none, or ``None`` when the path is not served.

        The configured paths are route paths: they are matched against :func:`route_path`, so
        they hold under ``uvicorn --root-path`` and in mounted sub-applications alike.
        """
        path = route_path(scope)
        if path in self._exact:
            return self._query_param(scope)
        for pattern in self._patterns:
            found = pattern.fullmatch(path)
            if found is not None:
                return found["session_id"]
        return None

    def _query_param(self, scope: Scope) -> str | NoSessionId:
        values = query_values(scope, self._param)
        if not values:
            return _MISSING
        if len(values) > 1:
            # Two ids in one URL are ambiguous; different layers could pick different ones.
            return _REPEATED
        return values[0]


def route_path(scope: Scope) -> str:
    """Return the scope's path relative to the application's mount point, as Starlette routes.

    ASGI servers and frameworks disagree on ``root_path``: the ASGI spec (HTTP connection scope)
    says ``path`` includes it, and uvicorn ``--root-path`` and Starlette's ``Mount`` (0.33 and
    later) follow that, while older servers give a ``path`` without it. So ``root_path`` is
    removed when ``path`` starts with it (at a segment boundary), and the full path is used
    otherwise.
    """
    path: str = scope.get("path", "")
    root_path: str = scope.get("root_path", "")
    if not root_path or not path.startswith(root_path):
        return path
    rest = path[len(root_path) :]
    return rest if not rest or rest.startswith("/") else path


def query_values(scope: Scope, name: str) -> list[str]:
    """Return every value of the query parameter ``name`` in the scope's query string."""
    raw = scope.get("query_string", b"")
    if not raw:
        return []
    # errors="replace": undecodable bytes become U+FFFD, which no valid id or version contains.
    pairs = parse_qsl(
        raw.decode("latin-1"), keep_blank_values=True, encoding="utf-8", errors="replace"
    )
    return [str(value) for key, value in pairs if key == name]


def clip_for_log(value: str) -> str:
    """Shorten an attacker-controlled value (a path, an id) for a log line."""
    return value if len(value) <= _LOG_CHARS else value[:_LOG_CHARS] + "..."
