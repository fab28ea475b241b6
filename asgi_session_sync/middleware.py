"""SessionSyncMiddleware: the current state as the first frame of every WebSocket it serves."""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Hashable, Iterable, Mapping
from typing import Any, NamedTuple, TypeVar

import anyio
from asgiref.compatibility import guarantee_single_callable
from pydantic import BaseModel

from ._flights import SingleFlight
from ._paths import (
    DEFAULT_SESSION_ID_PATTERN,
    NoSessionId,
    PathMatcher,
    SessionIdValidator,
    clip_for_log,
    query_values,
)
from ._types import AnyASGIApp, ASGIApp, Message, Receive, Scope, Send
from .events import SessionSynced, SessionUpdate, Version
from .fence import VersionFence
from .snapshot import SessionContext, SessionLoader, Snapshot, VersionLoader, user_identity
from .stats import MetricHook, SessionSyncStats
from .versions import parse_version, same_version

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

T = TypeVar("T")

Authenticate = Callable[[Any], Awaitable[Any]]
"""``async def authenticate(scope) -> user``: who is connecting (cookie, header, token)."""

ErrorHook = Callable[[SessionContext, Exception], object]
"""``def on_error(ctx, exc)``: called when a load failed or timed out."""

FlightKey = Callable[[SessionContext], Hashable]
"""``def flight_key(ctx)``: connections with equal keys may share one load and its result."""

Resync = Callable[[], Awaitable[str | None]]
"""Loads the connection's session afresh; returns the snapshot frame's JSON text or ``None``."""

SCOPE_KEY = "asgi_session_sync"
"""Scope key where the middleware leaves a served connection's state, for :func:`get_resync`."""

# Client messages read while the loader runs are kept for the app. Past this many the middleware
# stops reading (the server then applies backpressure), so a flooding client cannot grow memory.
_MAX_BUFFERED_MESSAGES = 64


class _Frame(NamedTuple):
    data: bytes
    version: Version | None


def default_flight_key(ctx: SessionContext) -> Hashable:
    """Share loads between connections of the same session AND the same user.

    A loader may check ownership, so one user's result is never handed to another. Users the
    middleware cannot name (see :func:`~asgi_session_sync.snapshot.user_identity`) share
    nothing unless anonymous (``user`` is ``None``).
    """
    if ctx.user is None:
        return (ctx.session_id, None)
    identity = user_identity(ctx.user)
    return (ctx.session_id, identity if identity is not None else object())


class SessionSyncMiddleware:
    """ASGI middleware that sends a session's current state as the first WebSocket frame.

    For a WebSocket on one of ``paths``, when the app sends ``websocket.accept`` the middleware
    forwards it unchanged, calls ``loader`` and sends the result as one ``session_update`` text
    frame before the app's ``send(accept)`` returns, so the snapshot always precedes anything
    the app sends. Everything else (HTTP, lifespan, other paths) passes through untouched.

    A snapshot is never worth a broken connection: when the loader raises, times out, returns
    ``None`` or something too large, nothing is sent, the reason is logged on the
    ``asgi_session_sync`` logger, and the app goes on. When the client disconnects during the
    load, the connection stops waiting for it and the app still receives the
    ``websocket.disconnect``.

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
            segment, such as ``"/ws/sessions/{session_id}"``. Matched against ``scope["path"]``.
        session_id_param: Query parameter holding the id on exact paths.
        session_id_pattern: Regular expression a session id must fully match before it reaches
            the loader. Whatever it allows, ids with ``.``, ``*``, ``>``, whitespace or control
            characters, and ids over 256 characters, are always refused.
        timeout: Seconds a connection waits for its snapshot (queueing, loading, sharing).
            ``authenticate`` and ``version_loader`` each have a budget of the same length, so
            a resuming connection waits at most three times this.
        max_bytes: Largest snapshot frame sent, in bytes of JSON; larger ones are logged and
            dropped. ``None`` for no limit.
        event_type: The ``type`` field of the snapshot event.
        authenticate: Optional ``async def authenticate(scope)`` returning the connecting user,
            for stacks whose authentication runs inside the framework (FastAPI dependencies,
            Litestar guards) where no middleware sets ``scope["user"]``.
        on_error: Optional ``def on_error(ctx, exc)`` called when the loader raised (with its
            exception) or a connection's wait timed out (with a ``TimeoutError``).
        fence_event_types: Event types fenced besides ``event_type``: the delta or patch events
            an app streams after a full-state baseline.
        fence_max_frames: App frames inspected after the snapshot at most; 0 turns the fence off.
        fence_max_seconds: Seconds after the snapshot during which frames are inspected.
        since_param: Query parameter in which a resuming client passes its last version.
        version_loader: Optional ``async def version(ctx) -> version | None``, a cheap query
            asked before the full load when the client passes ``since``.
        send_synced: Send a ``session_synced`` event when resume skips the snapshot.
        single_flight: Share concurrent loads with equal ``flight_key``.
        flight_key: Which connections may share a load; :func:`default_flight_key` by default.
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
        self.loader = loader
        self.version_loader = version_loader
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.event_type = event_type
        self.authenticate = authenticate
        self.on_error = on_error
        self.since_param = since_param
        self.send_synced = send_synced
        self.fence_event_types = frozenset({event_type, *fence_event_types})
        self.fence_max_frames = fence_max_frames
        self.fence_max_seconds = fence_max_seconds
        self.stats = SessionSyncStats(on_metric=on_metric)
        """Counters since the middleware was created: see :class:`SessionSyncStats`."""
        self._flight_key: FlightKey = flight_key if single_flight else _unshared
        limiter = anyio.Semaphore(max_concurrent_loads, fast_acquire=True)
        self._snapshots: SingleFlight[_Frame] = SingleFlight(limiter=limiter, ttl=cache_ttl)
        self._versions: SingleFlight[Version] = SingleFlight(limiter=limiter)
        self._paths = PathMatcher(paths, session_id_param=session_id_param)
        self._is_valid_id = SessionIdValidator(session_id_pattern)

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
        if not self._is_valid_id(session_id):
            self.stats.incr("invalid_ids")
            logger.warning(
                "no snapshot: invalid session id session_id=%r path=%r",
                clip_for_log(session_id),
                clip_for_log(scope["path"]),
            )
            await self.app(scope, receive, send)
            return
        self.stats.incr("connections")
        responder = SnapshotResponder(self, scope, receive, send, session_id)
        scope[SCOPE_KEY] = responder
        try:
            await self.app(scope, responder.receive_buffered, responder.send_with_snapshot)
        finally:
            # The responder refers to the scope: without this cycle a closed connection is
            # freed at once, not at the garbage collector's next pass.
            scope.pop(SCOPE_KEY, None)

    async def authenticated(self, ctx: SessionContext) -> SessionContext:
        """Return ``ctx`` with ``user`` from ``authenticate`` when the middleware has one."""
        if self.authenticate is None:
            return ctx
        user = await self.authenticate(ctx.scope)
        return SessionContext(ctx.session_id, ctx.scope, user, ctx.since)

    async def fetch_snapshot(self, ctx: SessionContext, *, fresh: bool = False) -> _Frame | None:
        """Return the snapshot frame for ``ctx``, sharing loads, within the timeout.

        ``fresh`` skips the TTL cache (but still joins a load in flight). Returns ``None``,
        having logged why, when there is nothing to send. Never raises ``Exception``.
        """
        return await self._fetch(
            ctx, self._snapshots, lambda: self._load_snapshot(ctx), use_cache=not fresh
        )

    async def fetch_version(self, ctx: SessionContext) -> Version | None:
        """Return the session's current version from ``version_loader``, or ``None``."""
        if self.version_loader is None:
            return None
        return await self._fetch(
            ctx, self._versions, lambda: self._load_version(ctx), what="version load"
        )

    async def _fetch(
        self,
        ctx: SessionContext,
        flights: SingleFlight[T],
        load: Callable[[], Awaitable[T | None]],
        *,
        use_cache: bool = True,
        what: str = "snapshot load",
    ) -> T | None:
        with anyio.move_on_after(self.timeout) as deadline:
            result, how = await flights.run(self._flight_key(ctx), load, use_cache=use_cache)
            if how == "coalesced":
                self.stats.incr("coalesced")
            elif how == "cached":
                self.stats.incr("cache_hits")
            return result
        if deadline.cancelled_caught:
            self.stats.incr("timeouts")
            logger.warning(
                "%s timed out after %ss session_id=%s path=%r",
                what,
                self.timeout,
                ctx.session_id,
                clip_for_log(ctx.scope["path"]),
            )
            self._report(ctx, TimeoutError(f"{what} timed out after {self.timeout}s"))
        return None

    async def _load_snapshot(self, ctx: SessionContext) -> _Frame | None:
        started = anyio.current_time()
        self.stats.incr("loads")
        try:
            result = await self.loader(ctx)
        except Exception as exc:
            self.stats.incr("errors")
            logger.exception(
                "no snapshot: loader raised session_id=%s path=%r",
                ctx.session_id,
                clip_for_log(ctx.scope["path"]),
            )
            self._report(ctx, exc)
            return None
        finally:
            self.stats.observe_load(anyio.current_time() - started)
        return self._encode(ctx, result)

    async def _load_version(self, ctx: SessionContext) -> Version | None:
        assert self.version_loader is not None
        self.stats.incr("version_loads")
        try:
            return await self.version_loader(ctx)
        except Exception as exc:
            self.stats.incr("errors")
            logger.exception("version_loader raised session_id=%s", ctx.session_id)
            self._report(ctx, exc)
            return None

    def _encode(self, ctx: SessionContext, result: object) -> _Frame | None:
        if result is None:
            logger.debug("no snapshot: loader returned None session_id=%s", ctx.session_id)
            return None
        if isinstance(result, Snapshot):
            session, owner, version = result.session, result.owner, result.version
        elif isinstance(result, (Mapping, BaseModel)):
            session, owner, version = result, None, None
        else:
            self.stats.incr("errors")
            logger.error(
                "no snapshot: loader returned %s, expected a mapping, a pydantic model, "
                "a Snapshot or None session_id=%s",
                type(result).__name__,
                ctx.session_id,
            )
            return None
        try:
            event = SessionUpdate(
                type=self.event_type,
                session_id=ctx.session_id,
                owner=owner,
                session=session,
                version=version,
            )
            data = event.to_json()
        except Exception as exc:
            self.stats.incr("errors")
            logger.exception(
                "no snapshot: cannot serialise the session session_id=%s", ctx.session_id
            )
            self._report(ctx, exc)
            return None
        if self.max_bytes is not None and len(data) > self.max_bytes:
            self.stats.incr("oversize")
            logger.warning(
                "no snapshot: frame of %d bytes exceeds max_bytes=%d session_id=%s",
                len(data),
                self.max_bytes,
                ctx.session_id,
            )
            return None
        return _Frame(data, event.version)

    def _report(self, ctx: SessionContext, exc: Exception) -> None:
        if self.on_error is None:
            return
        try:
            self.on_error(ctx, exc)
        except Exception:
            logger.exception("on_error hook raised session_id=%s", ctx.session_id)


class SnapshotResponder:
    """One served WebSocket: wraps the app's ``send`` to put the snapshot right after accept."""

    __slots__ = (
        "_accepted",
        "_accepting",
        "_buffered",
        "_ctx",
        "_done",
        "_failure",
        "_fence",
        "_gone",
        "_reading",
        "_receive",
        "_send",
        "_wakeup",
        "middleware",
        "scope",
        "session_id",
        "version",
    )

    def __init__(
        self,
        middleware: SessionSyncMiddleware,
        scope: Scope,
        receive: Receive,
        send: Send,
        session_id: str,
    ) -> None:
        self.middleware = middleware
        self.scope = scope
        self.session_id = session_id
        self._receive = receive
        self._send = send
        self._done = False
        self._gone = False
        self._accepting = False
        self._accepted: anyio.Event | None = None  # made only if an app task must wait
        self._buffered: deque[Message] | None = None  # made on the first buffered message
        self._failure: BaseException | None = None
        # While the middleware reads receive() during the load, the app's own receive() calls
        # (frameworks like Quart read in a task of their own) wait on the buffer instead, so
        # there is one reader and no message is overtaken.
        self._reading = False
        self._wakeup: anyio.Event | None = None
        self._ctx: SessionContext | None = None
        self._fence: VersionFence | None = None
        # The version of the state the client was given first: the snapshot's, or its own
        # ``since`` when resume skipped the snapshot. None when unknown or nothing was sent.
        self.version: Version | None = None

    async def resync(self) -> str | None:
        """Load the session afresh for this connection and return the snapshot frame's text.

        For code that must resend the current state on a live connection (the NATS bridge after
        a broker restart): same loader, user, timeout, limits and single-flight as the first
        snapshot, but never the TTL cache. Returns ``None`` when there is nothing to send; the
        reason is logged.
        """
        ctx = await self._context()
        if ctx is None:
            return None
        frame = await self.middleware.fetch_snapshot(ctx, fresh=True)
        return None if frame is None else frame.data.decode()

    def receive_buffered(self) -> Awaitable[Message]:
        """The app's ``receive``: what the middleware read during the load, then the server's."""
        if self._done and not self._buffered and self._failure is None:
            return self._receive()  # settled: the server's receive itself, no extra coroutine
        return self._receive_during_snapshot()

    async def _receive_during_snapshot(self) -> Message:
        while True:
            if self._buffered:
                return self._buffered.popleft()
            if self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure
            if not self._reading:
                message = await self._receive()
                if not self._done and message["type"] == "websocket.disconnect":
                    self._gone = True  # the app accepts a connection already over: no snapshot
                return message
            if self._wakeup is None:  # made only when an app task waits, which is rare
                self._wakeup = anyio.Event()
            await self._wakeup.wait()

    def send_with_snapshot(self, message: Message) -> Awaitable[None]:
        """The app's ``send``: sends the snapshot after ``websocket.accept``, then fences."""
        if self._done and self._fence is None:
            return self._send(message)  # settled: the server's send itself, no extra coroutine
        return self._send_during_snapshot(message)

    async def _send_during_snapshot(self, message: Message) -> None:
        if self._done:
            if self._fence is not None and message["type"] == "websocket.send":
                text = message.get("text")
                if text is not None and not self._admit(text):
                    return
            await self._send(message)
            return
        if self._accepting:
            # Another of the app's tasks is in send(accept): nothing may overtake the snapshot.
            if self._accepted is None:
                self._accepted = anyio.Event()
            await self._accepted.wait()
            await self.send_with_snapshot(message)
            return
        message_type = message["type"]
        if message_type == "websocket.accept":
            self._accepting = True
            try:
                await self._send(message)
                if not self._gone:
                    await self._send_snapshot()
            finally:
                self._done = True
                if self._accepted is not None:
                    self._accepted.set()
            return
        if message_type in ("websocket.close", "websocket.http.response.start"):
            # Rejected before accepting: there is no one to send a snapshot to.
            self._done = True
        await self._send(message)

    def _admit(self, text: str) -> bool:
        assert self._fence is not None
        verdict = self._fence.admit(text)
        if verdict is None:
            self._fence = None  # caught up or out of the window: stop reading frames
            return True
        if not verdict:
            self.middleware.stats.incr("fenced_frames")
        return verdict

    async def _send_snapshot(self) -> None:
        disconnected = False
        load_over = False
        fatal: BaseException | None = None
        async with anyio.create_task_group() as tg:
            # The app is blocked in send(accept) here, so nobody reads receive: we must, or a
            # client that leaves during a slow load would go unnoticed until the timeout.
            async def watch_disconnect() -> None:
                nonlocal disconnected
                if load_over:  # the load never waited: nothing to watch
                    return
                disconnected = await self._read_until_disconnect()
                if disconnected:
                    tg.cancel_scope.cancel()

            tg.start_soon(watch_disconnect)
            try:
                frame = await self._first_frame()
                # Sent before the watcher is stopped: stopping it takes an event-loop turn,
                # which under a reconnect storm is a long wait the snapshot need not pay.
                if frame is not None:
                    await self._send_frame(frame)
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException as exc:
                # Not an Exception (those are logged and absorbed below us): SystemExit,
                # KeyboardInterrupt, a library's own BaseException. Re-raised as it is, outside
                # the task group, so the server sees it and not an ExceptionGroup around it.
                fatal = exc
            if self._reading:
                tg.cancel_scope.cancel()
            else:
                # The watcher has not started (or is done): cancelling it would cost a cancel
                # scope's delivery and leave garbage cycles for nothing.
                load_over = True
        if fatal is not None:
            logger.error(
                "loader raised %s, re-raised session_id=%s", type(fatal).__name__, self.session_id
            )
            raise fatal
        if disconnected:
            self.middleware.stats.incr("disconnects_during_load")
            logger.debug(
                "no snapshot: client disconnected during load session_id=%s", self.session_id
            )

    async def _send_frame(self, frame: bytes) -> None:
        try:
            await self._send({"type": "websocket.send", "text": frame.decode()})
        except OSError:
            # The client left between the load and the send; the app learns it from receive().
            logger.debug("no snapshot: client gone before send session_id=%s", self.session_id)
            return
        self.middleware.stats.incr("snapshots_sent")

    async def _first_frame(self) -> bytes | None:
        """Load what to send first, and arm the fence at the version the client will have."""
        ctx = await self._context()
        if ctx is None:
            return None
        middleware = self.middleware
        if ctx.since is not None and middleware.version_loader is not None:
            current = await middleware.fetch_version(ctx)
            if current is not None and same_version(current, ctx.since):
                return self._resumed(ctx.since)
        loaded = await middleware.fetch_snapshot(ctx)
        if loaded is None:
            return None
        if ctx.since is not None and same_version(loaded.version, ctx.since):
            return self._resumed(ctx.since)
        self._arm_fence(loaded.version)
        return loaded.data

    def _resumed(self, version: Version) -> bytes | None:
        self.middleware.stats.incr("skipped_by_resume")
        logger.debug("snapshot skipped: client is current session_id=%s", self.session_id)
        self._arm_fence(version)
        if not self.middleware.send_synced:
            return None
        return SessionSynced(session_id=self.session_id, version=version).to_json()

    def _arm_fence(self, version: Version | None) -> None:
        self.version = version
        middleware = self.middleware
        if version is None or middleware.fence_max_frames == 0:
            return
        self._fence = VersionFence(
            self.session_id,
            version,
            event_types=middleware.fence_event_types,
            max_frames=middleware.fence_max_frames,
            max_seconds=middleware.fence_max_seconds,
        )

    async def _context(self) -> SessionContext | None:
        """The loader's context, authenticated once per connection; ``None`` if that failed."""
        if self._ctx is None:
            ctx = SessionContext(self.session_id, self.scope, self.scope.get("user"), self._since())
            if self.middleware.authenticate is None:
                self._ctx = ctx
                return ctx
            try:
                with anyio.fail_after(self.middleware.timeout):
                    self._ctx = await self.middleware.authenticated(ctx)
            except Exception as exc:
                self.middleware.stats.incr("errors")
                self.middleware._report(ctx, exc)
                logger.exception(
                    "no snapshot: authenticate failed session_id=%s path=%r",
                    self.session_id,
                    clip_for_log(self.scope["path"]),
                )
                return None
        return self._ctx

    def _since(self) -> Version | None:
        values = query_values(self.scope, self.middleware.since_param)
        if len(values) != 1:
            return None
        since = parse_version(values[0])
        if since is None:
            logger.debug("ignored since: not a version session_id=%s", self.session_id)
        return since

    async def _read_until_disconnect(self) -> bool:
        """Buffer client messages for the app; return True on ``websocket.disconnect``."""
        self._reading = True
        try:
            buffered = self._buffered = self._buffered or deque()
            while len(buffered) < _MAX_BUFFERED_MESSAGES:
                try:
                    message = await self._receive()
                except Exception as exc:
                    # Hand the server's error to the app's next receive(), as if it had read it.
                    self._failure = exc
                    return False
                buffered.append(message)
                self._wake_readers()
                if message["type"] == "websocket.disconnect":
                    return True
            return False
        finally:
            self._reading = False
            self._wake_readers()

    def _wake_readers(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None


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


def _unshared(ctx: SessionContext) -> Hashable:
    return object()
