"""SessionSyncMiddleware: the current state as the first frame of every WebSocket it serves."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from asgiref.compatibility import guarantee_single_callable

from ._paths import NoSessionId, PathMatcher, clip_for_log
from ._responder import ConnectionSettings, SnapshotResponder
from ._sse_responder import SseResponder
from ._types import AnyASGIApp, ASGIApp
from .config import SyncOptions, check_options
from .snapshot import SessionLoader
from .stats import MetricHook, SessionSyncStats
from .sync import SessionSync

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

__all__ = ["SessionSyncMiddleware"]

logger = logging.getLogger("asgi_session_sync")

_OWN_KEYWORDS = (
    "loader",
    "paths",
    "session_id_param",
    "fence_max_frames",
    "fence_max_seconds",
    "on_metric",
    "sync",
)


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
    the load is not noticed until the load ends (``queue_timeout`` then ``timeout`` at most); the
    server then tells the app as it would without the middleware. A server's handshake timeout
    must allow the load.

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
      calls run at once, queued fairly (``queue_timeout``), each call bounded by ``timeout``.
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
        fence_max_frames: App frames inspected after the snapshot at most; 0 turns the fence off.
        fence_max_seconds: Seconds after the snapshot during which frames are inspected.
        on_metric: Optional ``def on_metric(name, value)`` called for each counter increment.
        sync: A :class:`~asgi_session_sync.SessionSync` to use instead of ``loader`` and its
            options, for an app that also accepts sockets with
            :meth:`~asgi_session_sync.SessionSync.accept`: one service, one set of counters.
        **options: How snapshots are loaded, shared and sent (``timeout``, ``queue_timeout``,
            ``max_bytes``,
            ``authenticate``, ``on_error``, ``version_loader``, ``since_param``,
            ``send_synced``, ``single_flight``, ``flight_key``, ``max_concurrent_loads``,
            ``cache_ttl``, ``session_id_pattern``): the fields of
            :class:`~asgi_session_sync.config.SyncConfig`, where each is described.

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
        fence_max_frames: int = 256,
        fence_max_seconds: float = 10.0,
        on_metric: MetricHook | None = None,
        sync: SessionSync | None = None,
        **options: Unpack[SyncOptions],
    ) -> None:
        # Frameworks build middleware lazily (Starlette on the first event), where a raised
        # error can vanish: uvicorn's --lifespan auto takes it for "lifespan unsupported" and
        # every request then fails. Logged at ERROR first, so it is in the server's log.
        try:
            check_options("SessionSyncMiddleware", options, also=_OWN_KEYWORDS)
            if isinstance(fence_max_frames, bool) or not isinstance(fence_max_frames, int):
                raise TypeError(f"fence_max_frames must be an int: got {fence_max_frames!r}")
            if isinstance(fence_max_seconds, bool) or not isinstance(
                fence_max_seconds, (int, float)
            ):
                raise TypeError(
                    f"fence_max_seconds must be a number of seconds: got {fence_max_seconds!r}"
                )
            if fence_max_frames < 0 or not fence_max_seconds >= 0:
                raise ValueError("fence_max_frames and fence_max_seconds must not be negative")
            if sync is None:
                if loader is None:
                    raise TypeError("loader is required: an async def load_session(ctx)")
                sync = SessionSync(loader, on_metric=on_metric, **options)
            elif loader is not None or options or on_metric is not None:
                raise TypeError(
                    "pass either loader and its options, or sync (configured already), not both: "
                    f"got sync and {sorted([*options, *(['loader'] if loader else [])])}"
                )
            self.app: ASGIApp = guarantee_single_callable(app)  # type: ignore[no-untyped-call]
            self.sync = sync
            """The snapshot service: loads, shares, encodes and reports each snapshot."""
            self.stats: SessionSyncStats = sync.stats
            """Counters since the service was created: see :class:`SessionSyncStats`."""
            self._connections = ConnectionSettings(
                sync=sync,
                fence_max_frames=fence_max_frames,
                fence_max_seconds=fence_max_seconds,
                max_held_bytes=sync.config.max_bytes or 4 * 1024 * 1024,
            )
            self._paths = PathMatcher(paths, session_id_param=session_id_param)
            self._session_ids = sync.session_ids
        except (TypeError, ValueError) as exc:
            logger.error("SessionSyncMiddleware is misconfigured: %s", exc)
            raise

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Serve one ASGI connection (typed loosely so every framework's app type accepts it)."""
        kind = scope["type"]
        if kind != "websocket" and (kind != "http" or scope.get("method") != "GET"):
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
        if kind == "http":
            # An event stream, if the app's response says so: counted and loaded only then.
            stream = SseResponder(self._connections, scope, send, session_id)
            await self.app(scope, receive, stream.send_with_snapshot)
            return
        self.stats.incr("connections")
        responder = SnapshotResponder(self._connections, scope, send, session_id)
        try:
            # receive is the server's own: the middleware never reads it.
            await self.app(scope, receive, responder.send_with_snapshot)
        finally:
            responder.close()
