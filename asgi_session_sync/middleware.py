"""SessionSyncMiddleware: the current state as the first frame of every WebSocket it serves."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

from asgiref.compatibility import guarantee_single_callable

from ._paths import NoSessionId, PathMatcher, clip_for_log
from ._responder import ConnectionSettings, SnapshotResponder
from ._session_ids import DEFAULT_SESSION_ID_PATTERN
from ._types import AnyASGIApp, ASGIApp
from .snapshot import Authenticate, ErrorHook, FlightKey, SessionLoader, VersionLoader
from .stats import MetricHook, SessionSyncStats
from .sync import SessionSync, default_flight_key

__all__ = ["SessionSyncMiddleware"]

logger = logging.getLogger("asgi_session_sync")


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

    - **Version fence.** When the snapshot has a version, the app's following session events
      (``session_update``, ``session_patch``) for this session are judged by the ordering
      cursor (:mod:`asgi_session_sync.cursor`): stale ones are dropped, and one the client
      cannot apply is preceded by a fresh snapshot; until the first that moves the client
      forward or the end of a bounded window (``fence_max_frames``, ``fence_max_seconds``).
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
        authenticate: Optional ``async def authenticate(scope)`` returning the connecting user,
            for stacks whose authentication runs inside the framework (FastAPI dependencies,
            Litestar guards) where no middleware sets ``scope["user"]``.
        on_error: Optional ``def on_error(ctx, exc)`` called with the exception whenever a
            connection gets no snapshot because something failed: the loader,
            ``version_loader``, ``authenticate`` or ``flight_key`` raised, a wait timed out (a
            ``TimeoutError``), or the server's ``send`` refused the snapshot frame.
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
        sync: A :class:`~asgi_session_sync.SessionSync` to use instead of ``loader`` and the
            loading options, for an app that also accepts sockets with
            :meth:`~asgi_session_sync.SessionSync.accept`: one service, one set of counters.

    Raises:
        ValueError: A path, the pattern or a limit is invalid.
        TypeError: ``loader`` is not callable, or both or neither of ``loader`` and ``sync``
            are given.
    """

    def __init__(
        self,
        app: AnyASGIApp,
        *,
        loader: SessionLoader | None = None,
        paths: Iterable[str],
        session_id_param: str = "session_id",
        session_id_pattern: str | re.Pattern[str] = DEFAULT_SESSION_ID_PATTERN,
        timeout: float = 5.0,
        max_bytes: int | None = 4 * 1024 * 1024,
        authenticate: Authenticate | None = None,
        on_error: ErrorHook | None = None,
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
        sync: SessionSync | None = None,
    ) -> None:
        if fence_max_frames < 0 or not fence_max_seconds >= 0:
            raise ValueError("fence_max_frames and fence_max_seconds must not be negative")
        if sync is None:
            if loader is None:
                raise TypeError("loader is required: an async def load_session(ctx)")
            sync = SessionSync(
                loader,
                version_loader=version_loader,
                authenticate=authenticate,
                on_error=on_error,
                timeout=timeout,
                max_bytes=max_bytes,
                send_synced=send_synced,
                single_flight=single_flight,
                flight_key=flight_key,
                max_concurrent_loads=max_concurrent_loads,
                cache_ttl=cache_ttl,
                since_param=since_param,
                session_id_pattern=session_id_pattern,
                on_metric=on_metric,
            )
        elif loader is not None:
            raise TypeError("pass either loader (and its options) or sync, not both")
        self.app: ASGIApp = guarantee_single_callable(app)  # type: ignore[no-untyped-call]
        self.sync = sync
        """The snapshot service: loads, shares, encodes and reports every connection's snapshot."""
        self.stats: SessionSyncStats = sync.stats
        """Counters since the service was created: see :class:`SessionSyncStats`."""
        self._connections = ConnectionSettings(
            sync=sync,
            fence_max_frames=fence_max_frames,
            fence_max_seconds=fence_max_seconds,
            max_held_bytes=sync.fetcher.max_bytes or 4 * 1024 * 1024,
        )
        self._paths = PathMatcher(paths, session_id_param=session_id_param)
        self._session_ids = sync.session_ids

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
        try:
            # receive is the server's own: the middleware never reads it.
            await self.app(scope, receive, responder.send_with_snapshot)
        finally:
            responder.close()
