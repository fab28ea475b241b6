"""ASGI type aliases, as Starlette spells them: precise for mypy, loose for every server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

AnyASGIApp = Callable[[Any, Any, Any], Awaitable[None]]
"""Any ASGI app, whatever its framework calls its scope type (Litestar and Quart use TypedDicts,
which mypy does not accept as a ``MutableMapping``); used in public signatures."""
