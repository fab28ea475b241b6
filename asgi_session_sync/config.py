"""How a :class:`~asgi_session_sync.SessionSync` loads, shares and sends snapshots.

One frozen dataclass, validated once when it is made: the service, its fetcher and the
middleware read it and forward nothing.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TypedDict

from ._session_ids import DEFAULT_SESSION_ID_PATTERN
from .snapshot import (
    Authenticate,
    ErrorHook,
    FlightKey,
    SessionContext,
    SessionLoader,
    VersionLoader,
    user_identity,
)

__all__ = ["SyncConfig", "SyncOptions", "default_flight_key"]


def default_flight_key(ctx: SessionContext) -> Hashable | None:
    """Share loads between connections of the same session AND the same user.

    A loader may check ownership, so one user's result is never handed to another. Anonymous
    connections (``user`` is ``None``) share with each other; users the middleware cannot name
    (see :func:`~asgi_session_sync.snapshot.user_identity`) share nothing: the key is ``None``.
    """
    if ctx.user is None:
        return (ctx.session_id, None)
    identity = user_identity(ctx.user)
    return None if identity is None else (ctx.session_id, identity)


def _unshared(ctx: SessionContext) -> None:
    return None


@dataclass(frozen=True)
class SyncConfig:
    """How snapshots are loaded, shared and sent; see :class:`~asgi_session_sync.SessionSync`.

    Attributes:
        loader: ``async def load_session(ctx: SessionContext)`` returning a mapping, a
            pydantic model, a :class:`~asgi_session_sync.Snapshot`, or ``None`` for "nothing
            to send".
        version_loader: Optional ``async def version(ctx) -> int | None``, a cheap query asked
            before the full load when the client resumes with ``since``.
        authenticate: Optional ``async def authenticate(scope)`` returning the connecting user,
            for connections whose user the app does not give and ``scope["user"]`` lacks.
        on_error: Optional ``def on_error(ctx, exc)`` called with the exception whenever a
            connection gets no snapshot because something failed: the loader,
            ``version_loader``, ``authenticate`` or ``flight_key`` raised, a wait timed out (a
            ``TimeoutError``), or the server's ``send`` refused the snapshot frame.
        timeout: Seconds a connection waits for its snapshot (queueing, loading, sharing).
            ``authenticate`` and ``version_loader`` each have a budget of the same length, so
            a resuming connection waits at most three times this, and the middleware holds its
            handshake as long. The bound cancels the loader: a loader that cannot be cancelled
            (a thread not abandoned on cancel) holds the connection until it returns.
        max_bytes: Largest snapshot frame sent, in bytes of JSON; larger ones are logged and
            dropped. ``None`` for no limit.
        send_synced: Send a ``session_synced`` event when resume skips the snapshot.
        single_flight: Share concurrent loads with equal ``flight_key``.
        flight_key: Which connections may share a load: a hashable key, or ``None`` for a load
            never shared; :func:`default_flight_key` by default.
        max_concurrent_loads: Loader calls running at once, at most.
        cache_ttl: Opt-in: seconds a successful load is reused for new connections (failed
            and empty loads are not). ``None`` caches nothing. A cached snapshot can miss an
            update published before the new connection subscribed: keep it short.
        since_param: Query parameter in which a resuming client passes its last version.
        session_id_pattern: Regular expression a session id must fully match. Whatever it
            allows, ids with ``.``, ``*``, ``>``, whitespace, control, format or invisible
            characters, and ids over 256 characters, are always refused.

    Raises:
        TypeError: ``loader`` or ``version_loader`` is not callable.
        ValueError: A limit is invalid (the message names it).
    """

    loader: SessionLoader
    version_loader: VersionLoader | None = None
    authenticate: Authenticate | None = None
    on_error: ErrorHook | None = None
    timeout: float = 5.0
    max_bytes: int | None = 4 * 1024 * 1024
    send_synced: bool = False
    single_flight: bool = True
    flight_key: FlightKey = default_flight_key
    max_concurrent_loads: int = 64
    cache_ttl: float | None = None
    since_param: str = "since"
    session_id_pattern: str | re.Pattern[str] = DEFAULT_SESSION_ID_PATTERN

    def __post_init__(self) -> None:
        if not callable(self.loader):
            raise TypeError(f"loader must be an async callable: got {self.loader!r}")
        if self.version_loader is not None and not callable(self.version_loader):
            raise TypeError(
                f"version_loader must be an async callable: got {self.version_loader!r}"
            )
        if not self.timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds: got {self.timeout!r}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive or None: got {self.max_bytes!r}")
        if not self.since_param:
            raise ValueError("since_param must be a non-empty query parameter name")
        if self.max_concurrent_loads < 1:
            raise ValueError(
                f"max_concurrent_loads must be at least 1: got {self.max_concurrent_loads}"
            )
        if self.cache_ttl is not None and not self.cache_ttl > 0:
            raise ValueError(f"cache_ttl must be positive or None: got {self.cache_ttl!r}")

    @property
    def shared_key(self) -> FlightKey:
        """The key loads are shared by: ``flight_key``, or none at all without single-flight."""
        return self.flight_key if self.single_flight else _unshared


class SyncOptions(TypedDict, total=False):
    """The keyword arguments of :class:`~asgi_session_sync.SessionSync` and of the middleware
    that make its :class:`SyncConfig` (every field but ``loader``; see there)."""

    version_loader: VersionLoader | None
    authenticate: Authenticate | None
    on_error: ErrorHook | None
    timeout: float
    max_bytes: int | None
    send_synced: bool
    single_flight: bool
    flight_key: FlightKey
    max_concurrent_loads: int
    cache_ttl: float | None
    since_param: str
    session_id_pattern: str | re.Pattern[str]
