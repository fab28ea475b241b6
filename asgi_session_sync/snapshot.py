"""What a loader is given and what it returns."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel

from ._types import Scope
from .protocol import Version

__all__ = [
    "Authenticate",
    "ErrorHook",
    "FlightKey",
    "LoaderResult",
    "SessionContext",
    "SessionLoader",
    "Snapshot",
    "VersionLoader",
    "user_identity",
]


@dataclass(frozen=True)
class Snapshot:
    """A session's current state, with what the loader knows about it.

    Return one from a loader when you know the session's owner or version; a loader may also
    return the bare session (a mapping or a pydantic model) or ``None``.

    Attributes:
        session: The state sent to the client, serialised as JSON.
        owner: Who owns the session, sent as ``owner`` in the event.
        version: The session's version, a whole number from 0 to ``2**53 - 1`` (see
            :mod:`asgi_session_sync.protocol`), sent as ``version`` in the event and used to
            order the snapshot against live events.
    """

    session: Mapping[str, Any] | BaseModel
    owner: str | None = None
    version: Version | None = None


LoaderResult = Mapping[str, Any] | BaseModel | Snapshot | None
"""What a loader may return; ``None`` means there is nothing to send (no such session)."""


@dataclass(frozen=True)
class SessionContext:
    """What a loader knows about the connection it loads for.

    Attributes:
        session_id: The validated session id from the path or the query string.
        scope: The connection's ASGI scope, as the app saw it when it accepted.
        user: Who is connecting: what ``authenticate(scope)`` returned when the middleware was
            given one, else ``scope.get("user")`` (set by an auth middleware), else ``None``.
        since: The version the client says it already has (the ``since`` query parameter),
            or ``None`` when it gave none or something that is not a version.
    """

    session_id: str
    scope: Scope
    user: Any = None
    since: Version | None = None


def user_identity(user: object) -> str | None:
    """Return the id of the connecting user: what ownership checks and load sharing compare.

    ``user`` is ``ctx.user``, whatever ``authenticate`` or an auth middleware produced. In order:

    - ``None``, a ``bool``, or an object whose ``is_authenticated`` is ``False`` (Starlette's
      ``UnauthenticatedUser``): no user, ``None``;
    - a ``str`` or an ``int``: itself, as a string;
    - a mapping: its ``"id"`` item;
    - any other object: its ``id`` attribute, else its ``identity`` attribute (Starlette's
      ``BaseUser``).

    An empty or missing id is ``None``. Deliberately narrow: falling back to a username could
    make one user's name equal another user's id.
    """
    if user is None or isinstance(user, bool):
        return None
    value: object
    if isinstance(user, (str, int)):
        value = user
    elif isinstance(user, Mapping):
        value = user.get("id")
    else:
        if _attribute(user, "is_authenticated") is False:
            return None
        value = _attribute(user, "id")
        if value is None:
            value = _attribute(user, "identity")
    if value is None or isinstance(value, bool):
        return None
    return str(value) or None


def _attribute(user: object, name: str) -> object:
    try:
        return getattr(user, name, None)
    except NotImplementedError:  # Starlette's BaseUser members, when a subclass has none
        return None


class SessionLoader(Protocol):
    """The shape of a snapshot loader: ``async def load_session(ctx) -> LoaderResult``."""

    async def __call__(self, ctx: SessionContext, /) -> LoaderResult:
        """Load the current state of ``ctx.session_id``, or return ``None`` when there is none."""
        ...


class VersionLoader(Protocol):
    """A cheap loader of a session's current version only (``SELECT updated_at ...``).

    Asked before the full load when a client resumes with ``since``: when it returns the same
    version, the full load and the snapshot are skipped. ``None`` means "unknown": load in full.
    A version is information: check ownership exactly as the loader does, and return ``None``
    for a user who may not see the session (with ``send_synced=True`` a client could otherwise
    learn another user's version by trying ``since`` values).
    """

    async def __call__(self, ctx: SessionContext, /) -> Version | None:
        """Return the current version of ``ctx.session_id``, or ``None``."""
        ...


Authenticate = Callable[[Any], Awaitable[Any]]
"""``async def authenticate(scope) -> user``: who is connecting (cookie, header, token)."""

ErrorHook = Callable[[SessionContext, Exception], object]
"""``def on_error(ctx, exc)``: called when a connection gets no snapshot because something failed:
the loader, ``version_loader`` or ``authenticate`` raised, a wait timed out (a ``TimeoutError``),
``flight_key`` raised, or the server's ``send`` refused the snapshot frame."""

FlightKey = Callable[[SessionContext], Hashable | None]
"""``def flight_key(ctx)``: connections with equal keys may share one load and its result.

The key must be hashable. ``None`` means the load is this connection's alone: never shared,
never cached. A key function that raises, or returns an unhashable key, is a failed load
(counted, logged, passed to ``on_error``)."""
