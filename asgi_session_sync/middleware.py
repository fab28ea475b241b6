"""SessionSyncMiddleware: the current state as the first frame of every WebSocket it serves."""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import anyio
from asgiref.compatibility import guarantee_single_callable
from pydantic import BaseModel

from ._paths import DEFAULT_SESSION_ID_PATTERN, NoSessionId, PathMatcher, SessionIdValidator
from ._types import ASGIApp, Message, Receive, Scope, Send
from .events import SessionUpdate
from .snapshot import SessionContext, SessionLoader, Snapshot

__all__ = [
    "SCOPE_KEY",
    "Authenticate",
    "ErrorHook",
    "Resync",
    "SessionSyncMiddleware",
    "get_resync",
]

logger = logging.getLogger("asgi_session_sync")

Authenticate = Callable[[Scope], Awaitable[Any]]
"""``async def authenticate(scope) -> user``: who is connecting (cookie, header, token)."""

ErrorHook = Callable[[SessionContext, Exception], object]
"""``def on_error(ctx, exc)``: called when a load failed or timed out."""

Resync = Callable[[], Awaitable[str | None]]
"""Loads the connection's session afresh; returns the snapshot frame's JSON text or ``None``."""

SCOPE_KEY = "asgi_session_sync"
"""Scope key where the middleware leaves a served connection's state, for :func:`get_resync`."""

# Client messages read while the loader runs are kept for the app. Past this many the middleware
# stops reading (the server then applies backpressure), so a flooding client cannot grow memory.
_MAX_BUFFERED_MESSAGES = 64
_LOG_ID_CHARS = 64


class SessionSyncMiddleware:
    """ASGI middleware that sends a session's current state as the first WebSocket frame.

    For a WebSocket on one of ``paths``, when the app sends ``websocket.accept`` the middleware
    forwards it unchanged, calls ``loader`` and sends the result as one ``session_update`` text
    frame before the app's ``send(accept)`` returns, so the snapshot always precedes anything
    the app sends. Everything else (HTTP, lifespan, other paths, every later message) passes
    through untouched.

    A snapshot is never worth a broken connection: when the loader raises, times out, returns
    ``None`` or something too large, nothing is sent, the reason is logged on the
    ``asgi_session_sync`` logger, and the app goes on. When the client disconnects during the
    load, the loader is cancelled and the app still receives the ``websocket.disconnect``.

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
        timeout: Seconds ``authenticate`` and the loader together may take.
        max_bytes: Largest snapshot frame sent, in bytes of JSON; larger ones are logged and
            dropped. ``None`` for no limit.
        event_type: The ``type`` field of the snapshot event.
        authenticate: Optional ``async def authenticate(scope)`` returning the connecting user,
            for stacks whose authentication runs inside the framework (FastAPI dependencies,
            Litestar guards) where no middleware sets ``scope["user"]``.
        on_error: Optional ``def on_error(ctx, exc)`` called when the loader raised (with its
            exception) or timed out (with a ``TimeoutError``). Its own errors are logged.

    Raises:
        ValueError: A path, the pattern or a limit is invalid.
    """

    def __init__(
        self,
        app: ASGIApp,
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
    ) -> None:
        if not callable(loader):
            raise TypeError(f"loader must be an async callable: got {loader!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds: got {timeout!r}")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive or None: got {max_bytes!r}")
        if not event_type:
            raise ValueError("event_type must be a non-empty string")
        self.app: ASGIApp = guarantee_single_callable(app)  # type: ignore[no-untyped-call]
        self.loader = loader
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.event_type = event_type
        self.authenticate = authenticate
        self.on_error = on_error
        self._paths = PathMatcher(paths, session_id_param=session_id_param)
        self._is_valid_id = SessionIdValidator(session_id_pattern)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection."""
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        session_id = self._paths.match(scope)
        if session_id is None:
            await self.app(scope, receive, send)
            return
        if isinstance(session_id, NoSessionId):
            logger.info(
                "no snapshot: session id %s path=%r", session_id.reason, _clip(scope["path"])
            )
            await self.app(scope, receive, send)
            return
        if not self._is_valid_id(session_id):
            logger.warning(
                "no snapshot: invalid session id session_id=%r path=%r",
                _clip(session_id),
                _clip(scope["path"]),
            )
            await self.app(scope, receive, send)
            return
        responder = SnapshotResponder(self, scope, receive, send, session_id)
        scope[SCOPE_KEY] = responder
        await self.app(scope, responder.receive_buffered, responder.send_with_snapshot)

    async def authenticated(self, ctx: SessionContext) -> SessionContext:
        """Return ``ctx`` with ``user`` from ``authenticate`` when the middleware has one."""
        if self.authenticate is None:
            return ctx
        return SessionContext(ctx.session_id, ctx.scope, await self.authenticate(ctx.scope))

    async def load_frame(self, ctx: SessionContext) -> bytes | None:
        """Run the loader for ``ctx`` and return the snapshot frame as JSON bytes.

        Returns ``None``, having logged why, when there is nothing to send. Never raises
        ``Exception``; cancellation propagates.
        """
        try:
            with anyio.fail_after(self.timeout):
                result = await self.loader(ctx)
        except TimeoutError as exc:
            logger.warning(
                "no snapshot: loader timed out after %ss session_id=%s path=%r",
                self.timeout,
                ctx.session_id,
                _clip(ctx.scope["path"]),
            )
            self._report(ctx, exc)
            return None
        except Exception as exc:
            logger.exception(
                "no snapshot: loader raised session_id=%s path=%r",
                ctx.session_id,
                _clip(ctx.scope["path"]),
            )
            self._report(ctx, exc)
            return None
        return self._encode(ctx, result)

    def _encode(self, ctx: SessionContext, result: object) -> bytes | None:
        if result is None:
            logger.debug("no snapshot: loader returned None session_id=%s", ctx.session_id)
            return None
        if isinstance(result, Snapshot):
            session, owner, version = result.session, result.owner, result.version
        elif isinstance(result, (Mapping, BaseModel)):
            session, owner, version = result, None, None
        else:
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
            frame = event.to_json()
        except Exception as exc:
            logger.exception(
                "no snapshot: cannot serialise the session session_id=%s", ctx.session_id
            )
            self._report(ctx, exc)
            return None
        if self.max_bytes is not None and len(frame) > self.max_bytes:
            logger.warning(
                "no snapshot: frame of %d bytes exceeds max_bytes=%d session_id=%s",
                len(frame),
                self.max_bytes,
                ctx.session_id,
            )
            return None
        return frame

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
        "_buffered",
        "_ctx",
        "_done",
        "_failure",
        "_receive",
        "_send",
        "middleware",
        "scope",
        "session_id",
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
        self._buffered: deque[Message] = deque()
        self._failure: BaseException | None = None
        self._ctx: SessionContext | None = None

    async def resync(self) -> str | None:
        """Load the session afresh for this connection and return the snapshot frame's text.

        For code that must resend the current state on a live connection (the NATS bridge after
        a broker restart): same loader, user, timeout and limits as the first snapshot. Returns
        ``None`` when there is nothing to send; the reason is logged.
        """
        ctx = await self._context()
        if ctx is None:
            return None
        frame = await self.middleware.load_frame(ctx)
        return None if frame is None else frame.decode()

    async def _context(self) -> SessionContext | None:
        """The loader's context, authenticated once per connection; ``None`` if that failed."""
        if self._ctx is None:
            ctx = SessionContext(self.session_id, self.scope, self.scope.get("user"))
            try:
                with anyio.fail_after(self.middleware.timeout):
                    self._ctx = await self.middleware.authenticated(ctx)
            except Exception:
                logger.exception(
                    "no snapshot: authenticate failed session_id=%s path=%r",
                    self.session_id,
                    _clip(self.scope["path"]),
                )
                return None
        return self._ctx

    async def receive_buffered(self) -> Message:
        """The app's ``receive``: what the middleware read during the load, then the server's."""
        if self._buffered:
            return self._buffered.popleft()
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        return await self._receive()

    async def send_with_snapshot(self, message: Message) -> None:
        """The app's ``send``: after forwarding ``websocket.accept``, sends the snapshot."""
        if self._done:
            await self._send(message)
            return
        message_type = message["type"]
        if message_type == "websocket.accept":
            self._done = True
            await self._send(message)
            await self._send_snapshot()
            return
        if message_type in ("websocket.close", "websocket.http.response.start"):
            # Rejected before accepting: there is no one to send a snapshot to.
            self._done = True
        await self._send(message)

    async def _send_snapshot(self) -> None:
        frame: bytes | None = None
        disconnected = False
        async with anyio.create_task_group() as tg:
            # The app is blocked in send(accept) here, so nobody reads receive: we must, or a
            # client that leaves during a slow load would go unnoticed until the timeout.
            async def watch_disconnect() -> None:
                nonlocal disconnected
                disconnected = await self._read_until_disconnect()
                if disconnected:
                    tg.cancel_scope.cancel()

            tg.start_soon(watch_disconnect)
            ctx = await self._context()
            if ctx is not None:
                frame = await self.middleware.load_frame(ctx)
            tg.cancel_scope.cancel()
        if disconnected:
            logger.debug(
                "no snapshot: client disconnected during load session_id=%s", self.session_id
            )
            return
        if frame is None:
            return
        try:
            await self._send({"type": "websocket.send", "text": frame.decode()})
        except OSError:
            # The client left between the load and the send; the app learns it from receive().
            logger.debug("no snapshot: client gone before send session_id=%s", self.session_id)

    async def _read_until_disconnect(self) -> bool:
        """Buffer client messages for the app; return True on ``websocket.disconnect``."""
        while len(self._buffered) < _MAX_BUFFERED_MESSAGES:
            try:
                message = await self._receive()
            except Exception as exc:
                # Hand the server's error to the app on its next receive(), as if it had read it.
                self._failure = exc
                return False
            self._buffered.append(message)
            if message["type"] == "websocket.disconnect":
                return True
        return False


def _clip(value: str) -> str:
    """Shorten an attacker-controlled value for a log line."""
    return value if len(value) <= _LOG_ID_CHARS else value[:_LOG_ID_CHARS] + "..."


def get_resync(scope: Scope) -> Resync | None:
    """Return the resync function of a connection served by :class:`SessionSyncMiddleware`.

    ``None`` when the middleware does not serve this connection (another path, an invalid id).
    Pass it to code that must resend the current state without the client reconnecting, such
    as the NATS bridge's ``subscribe``.
    """
    responder = scope.get(SCOPE_KEY)
    return responder.resync if isinstance(responder, SnapshotResponder) else None
