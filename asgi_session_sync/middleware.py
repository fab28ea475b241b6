"""SessionSyncMiddleware: the current state as the first frame of every WebSocket it serves."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Collection, Hashable, Iterable
from typing import Any

from asgiref.compatibility import guarantee_single_callable

from ._fetcher import SnapshotFetcher
from ._paths import NoSessionId, PathMatcher, clip_for_log
from ._responder import ConnectionSettings, SnapshotResponder
from ._session_ids import DEFAULT_SESSION_ID_PATTERN, SessionIdRules
from ._types import AnyASGIApp, ASGIApp
from .events import Version
from .snapshot import (
    Authenticate,
    ErrorHook,
    FlightKey,
    SessionContext,
    SessionLoader,
    VersionLoader,
    user_identity,
)
from .stats import MetricHook, SessionSyncStats

__all__ = [
    "SCOPE_KEY",
    "Authenticate",
    "ErrorHook",
    "FlightKey",
    "Resync",
    "SessionSyncMiddleware",
    "default_flight_key",
    "get_resync",
    "get_snapshot_version",
]

logger = logging.getLogger("asgi_session_sync")

Resync = Callable[[], Awaitable[str | None]]
"""Loads the connection's session afresh; returns the snapshot frame's JSON text or ``None``."""

SCOPE_KEY = "asgi_session_sync"
"""Scope key where the middleware leaves a served connection's state, for :func:`get_resync`."""


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


class SessionSyncMiddleware:
    """ASGI middleware that sends a session's current state as the first WebSocket frame.

    For a WebSocket on one of ``paths``, when the app sends ``websocket.accept`` the middleware
    holds it and calls ``loader``, then forwards the accept unchanged with the result right
    after it, as one ``session_update`` text frame, and only then returns from the app's
    ``send(accept)``: the snapshot precedes anything the app sends, and the client is connected
    when its state is ready. The middleware never calls ``receive()``; the app reads the
    server's own. Everything else (HTTP, lifespan, other paths) passes through untouched.

    A snapshot is never worth a broken connection: when the loader raises, times out, returns
    ``None`` or something too large, the accept goes out without a snapshot, the reason is
    logged on the ``asgi_session_sync`` logger, and the app goes on. A client that leaves during
    the load is not noticed until the load ends (``timeout`` at most); the server then tells the
    app as it would without the middleware. A server's handshake timeout must allow the load.

    Guarantees beyond the first frame:

    - **Version fence.** When the snapshot has a version, the app's following text frames of the
      fenced event types for this session are dropped unless newer, until the first newer one
      or the end of a bounded window (``fence_max_frames``, ``fence_max_seconds``).
    - **Resume.** A client passing ``since=<version>`` that is current gets no snapshot (or a
      ``session_synced`` event with ``send_synced=True``); ``version_loader`` makes that check
      without the full load.
    - **Single-flight and a bound.** Concurrent loads with the same ``flight_key`` (by default
      the session and the user) share one loader call; at most ``max_concurrent_loads`` loader
      calls run at once, queued fairly, each connection still bounded by ``timeout``.
    - **Counters** in :attr:`stats`, and every increment through ``on_metric``.

    Args:
        app: The ASGI 3 (or ASGI 2) application to wrap.
        loader: ``async def load_session(ctx: SessionContext)`` returning a mapping, a pydantic
            model, a :class:`~asgi_session_sync.Snapshot`, or ``None`` for "nothing to send".
        paths: WebSocket paths to serve: exact paths (the id then comes from the
            ``session_id_param`` query parameter) or patterns with one ``{session_id}``
            segment, such as ``"/ws/sessions/{session_id}"``. Matched against the route path:
            ``scope["path"]`` without ``scope["root_path"]`` when it starts with it, as
            Starlette routes, so they hold under ``uvicorn --root-path`` and in mounted apps.
        session_id_param: Query parameter holding the id on exact paths.
        session_id_pattern: Regular expression a session id must fully match before it reaches
            the loader. Whatever it allows, ids with ``.``, ``*``, ``>``, whitespace, control,
            format or invisible characters (C1, bidi, zero-width), and ids over 256
            characters, are always refused.
        timeout: Seconds a connection waits for its snapshot (queueing, loading, sharing).
            ``authenticate`` and ``version_loader`` each have a budget of the same length, so
            a resuming connection waits at most three times this, and so is its handshake
            held. The bound cancels the loader: a loader that cannot be cancelled (a thread
            not abandoned on cancel) holds the connection until it returns.
        max_bytes: Largest snapshot frame sent, in bytes of JSON; larger ones are logged and
            dropped. ``None`` for no limit.
        event_type: The ``type`` field of the snapshot event.
        authenticate: Optional ``async def authenticate(scope)`` returning the connecting user,
            for stacks whose authentication runs inside the framework (FastAPI dependencies,
            Litestar guards) where no middleware sets ``scope["user"]``.
        on_error: Optional ``def on_error(ctx, exc)`` called with the exception whenever a
            connection gets no snapshot because something failed: the loader,
            ``version_loader``, ``authenticate`` or ``flight_key`` raised, a wait timed out (a
            ``TimeoutError``), or the server's ``send`` refused the snapshot frame.
        fence_event_types: Event types fenced besides ``event_type`` and ``session_patch``:
            the delta events an app streams after a full-state baseline.
        fence_max_frames: App frames inspected after the snapshot at most; 0 turns the fence off.
        fence_max_seconds: Seconds after the snapshot during which frames are inspected.
        since_param: Query parameter in which a resuming client passes its last version.
        version_loader: Optional ``async def version(ctx) -> version | None``, a cheap query
            asked before the full load when the client passes ``since``.
        send_synced: Send a ``session_synced`` event when resume skips the snapshot.
        single_flight: Share concurrent loads with equal ``flight_key``.
        flight_key: Which connections may share a load; :func:`default_flight_key` by default.
            It must return a hashable key, or ``None`` for a load never shared.
        max_concurrent_loads: Loader calls running at once, at most.
        cache_ttl: Opt-in: seconds a successful load is reused for new connections (failed
            and empty loads are not). ``None`` (the default) caches nothing. A cached snapshot
            can miss an update published before the new connection subscribed, until the next
            update: keep it short, or use it only where updates repeat the whole state.
        on_metric: Optional ``def on_metric(name, value)`` called for each counter increment.

    Raises:
        ValueError: A path, the pattern or a limit is invalid.
    """

    def __init__(
        self,
        app: AnyASGIApp,
        *,
        loader: SessionLoader,
        paths: Iterable[str],
        session_id_param: str = "session_id",
        session_id_pattern: str | re.Pattern[str] = DEFAULT_SESSION_ID_PATTERN,
        timeout: float = 5.0,
        max_bytes: int | None = 4 * 1024 * 1024,
        event_type: str = "session_update",
        authenticate: Authenticate | None = None,
        on_error: ErrorHook | None = None,
        fence_event_types: Collection[str] = (),
        fence_max_frames: int = 256,
        fence_max_seconds: float = 10.0,
        since_param: str = "since",
        version_loader: VersionLoader | None = None,
        send_synced: bool = False,
        single_flight: bool = True,
        flight_key: FlightKey = default_flight_key,
        max_concurrent_loads: int = 64,
        cache_ttl: float | None = None,
        on_metric: MetricHook | None = None,
    ) -> None:
        if not callable(loader):
            raise TypeError(f"loader must be an async callable: got {loader!r}")
        if version_loader is not None and not callable(version_loader):
            raise TypeError(f"version_loader must be an async callable: got {version_loader!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds: got {timeout!r}")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive or None: got {max_bytes!r}")
        if not event_type:
            raise ValueError("event_type must be a non-empty string")
        if isinstance(fence_event_types, str):
            raise TypeError(f"fence_event_types must be a collection: use [{fence_event_types!r}]")
        if fence_max_frames < 0 or not fence_max_seconds >= 0:
            raise ValueError("fence_max_frames and fence_max_seconds must not be negative")
        if not since_param:
            raise ValueError("since_param must be a non-empty query parameter name")
        if max_concurrent_loads < 1:
            raise ValueError(f"max_concurrent_loads must be at least 1: got {max_concurrent_loads}")
        if cache_ttl is not None and not cache_ttl > 0:
            raise ValueError(f"cache_ttl must be positive or None: got {cache_ttl!r}")
        self.app: ASGIApp = guarantee_single_callable(app)  # type: ignore[no-untyped-call]
        self.stats = SessionSyncStats(on_metric=on_metric)
        """Counters since the middleware was created: see :class:`SessionSyncStats`."""
        self._fetcher = SnapshotFetcher(
            loader=loader,
            version_loader=version_loader,
            authenticate=authenticate,
            on_error=on_error,
            flight_key=flight_key if single_flight else _unshared,
            timeout=timeout,
            max_bytes=max_bytes,
            event_type=event_type,
            send_synced=send_synced,
            max_concurrent_loads=max_concurrent_loads,
            cache_ttl=cache_ttl,
            stats=self.stats,
        )
        """Loads, shares, encodes and reports snapshots for every connection."""
        self._connections = ConnectionSettings(
            fetcher=self._fetcher,
            since_param=since_param,
            fence_event_types=frozenset({event_type, "session_patch", *fence_event_types}),
            fence_max_frames=fence_max_frames,
            fence_max_seconds=fence_max_seconds,
        )
        self._paths = PathMatcher(paths, session_id_param=session_id_param)
        self._session_ids = SessionIdRules(session_id_pattern)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Serve one ASGI connection (typed loosely so every framework's app type accepts it)."""
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        session_id = self._paths.match(scope)
        if session_id is None:
            await self.app(scope, receive, send)
            return
        if isinstance(session_id, NoSessionId):
            self.stats.incr("invalid_ids")
            logger.info(
                "no snapshot: session id %s path=%r", session_id.reason, clip_for_log(scope["path"])
            )
            await self.app(scope, receive, send)
            return
        if not self._session_ids(session_id):
            self.stats.incr("invalid_ids")
            logger.warning(
                "no snapshot: invalid session id (%s) session_id=%r path=%r",
                self._session_ids.problem(session_id),
                clip_for_log(session_id),
                clip_for_log(scope["path"]),
            )
            await self.app(scope, receive, send)
            return
        self.stats.incr("connections")
        responder = SnapshotResponder(self._connections, scope, send, session_id)
        scope[SCOPE_KEY] = responder
        try:
            # receive is the server's own: the middleware never reads it.
            await self.app(scope, receive, responder.send_with_snapshot)
        finally:
            responder.close()
            # The responder refers to the scope: without this cycle a closed connection is
            # freed at once, not at the garbage collector's next pass.
            scope.pop(SCOPE_KEY, None)


def get_resync(scope: Any) -> Resync | None:
    """Return the resync function of a connection served by :class:`SessionSyncMiddleware`.

    ``None`` when the middleware does not serve this connection (another path, an invalid id).
    ``scope`` is typed loosely so every framework's scope type fits (Litestar's is a TypedDict).
    Pass it to code that must resend the current state without the client reconnecting, such
    as the NATS bridge's ``subscribe``.
    """
    responder = scope.get(SCOPE_KEY)
    return responder.resync if isinstance(responder, SnapshotResponder) else None


def get_snapshot_version(scope: Any) -> Version | None:
    """Return the version of the state the middleware gave this connection's client.

    That is the first snapshot's version, or the client's own ``since`` when resume found it
    current and skipped the snapshot. ``None`` before the app accepted, when nothing was sent,
    when the snapshot had no version, or when the middleware does not serve this connection.
    Code that streams deltas after the snapshot (the NATS bridge's patches) chains from it.
    """
    responder = scope.get(SCOPE_KEY)
    return responder.version if isinstance(responder, SnapshotResponder) else None


def _unshared(ctx: SessionContext) -> None:
    return None
