"""The snapshot service, and the handle an app gets for one WebSocket it accepted through it.

:class:`SessionSync` loads, shares, encodes and reports snapshots. The middleware uses one
(it builds one from its keyword arguments, or takes yours); an app that streams live updates
itself calls :meth:`SessionSync.accept` in its WebSocket route and gets a
:class:`SessionSocket`: the snapshot's version, the user, and a resync, typed, with nothing
stored in or read from the ASGI scope.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

from ._fetcher import FAILED, FirstFrame, SnapshotFetcher
from ._paths import clip_for_log, query_values
from ._session_ids import SessionIdRules
from ._types import Scope, Send
from .config import SyncConfig, SyncOptions, check_options, default_flight_key
from .protocol import Frame, Kind, Version, parse_frame, sse_event, version_from_text
from .snapshot import SessionContext, SessionLoader
from .stats import MetricHook, SessionSyncStats

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

__all__ = ["SSE_HEADERS", "SessionSocket", "SessionSync", "SyncConfig", "default_flight_key"]

logger = logging.getLogger("asgi_session_sync")

_FROM_SCOPE: Any = object()

SSE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # nginx buffers responses by default, which would hold every event back.
    (b"x-accel-buffering", b"no"),
)
"""The response headers of an event stream that :meth:`SessionSync.accept_sse` starts."""


class SessionSync:
    """Loads a session's snapshot for each WebSocket, shares loads, and sends it first.

    The options are the fields of :class:`~asgi_session_sync.config.SyncConfig` (where each is
    described), checked once, here; :attr:`config` holds them.

    ```python
    sync = SessionSync(load_session, version_loader=load_version, timeout=2.0)
    ```

    Args:
        loader: ``async def load_session(ctx: SessionContext)`` returning a mapping, a pydantic
            model, a :class:`~asgi_session_sync.Snapshot`, or ``None`` for "nothing to send".
        on_metric: Optional ``def on_metric(name, value)`` called for each counter increment.
        **options: ``version_loader``, ``authenticate``, ``on_error``, ``timeout`` (seconds),
            ``queue_timeout`` (seconds), ``max_bytes``, ``send_synced``, ``single_flight``,
            ``flight_key``, ``max_concurrent_loads``, ``cache_ttl`` (seconds), ``since_param``,
            ``session_id_pattern``: see :class:`~asgi_session_sync.config.SyncConfig`.

    Raises:
        TypeError: ``loader`` or ``version_loader`` is not callable, or an option is unknown.
        ValueError: A limit is invalid (the message names it).
    """

    def __init__(
        self,
        loader: SessionLoader,
        *,
        on_metric: MetricHook | None = None,
        **options: Unpack[SyncOptions],
    ) -> None:
        check_options("SessionSync", options)
        self.config = SyncConfig(loader, **options)
        """What this service was configured with, validated once."""
        self.stats = SessionSyncStats(on_metric=on_metric)
        """Counters since the service was created: see :class:`SessionSyncStats`."""
        self.fetcher = SnapshotFetcher(self.config, self.stats)
        self.session_ids = SessionIdRules(self.config.session_id_pattern)

    def since(self, scope: Scope, session_id: str) -> Version | None:
        """The version a resuming client says it has.

        An event stream's ``Last-Event-ID`` request header (what the browser's ``EventSource``
        sends back when it reconnects), else the ``since`` query parameter. A value that is not
        a version is ignored (logged at DEBUG, clipped).
        """
        if scope.get("type") == "http":
            for name, value in scope.get("headers", ()):
                if name.lower() == b"last-event-id":
                    text = value.decode("latin-1")
                    since = version_from_text(text)
                    if since is not None:
                        return since
                    logger.debug(
                        "ignored Last-Event-ID: not a version value=%r session_id=%s",
                        clip_for_log(text),
                        session_id,
                    )
                    break
        values = query_values(scope, self.config.since_param)
        if len(values) != 1:
            return None
        since = version_from_text(values[0])
        if since is None:
            logger.debug(
                "ignored since: not a version since=%r session_id=%s",
                clip_for_log(values[0]),
                session_id,
            )
        return since

    async def context(self, scope: Scope, session_id: str, user: Any) -> SessionContext | None:
        """The loader's context; ``None`` (logged, reported) when ``authenticate`` failed.

        ``user`` is the connecting user when the app knows it; ``_FROM_SCOPE`` asks
        ``authenticate`` (when given) or ``scope["user"]``.
        """
        since = self.since(scope, session_id)
        if user is not _FROM_SCOPE:
            return SessionContext(session_id, scope, user, since)
        ctx = SessionContext(session_id, scope, scope.get("user"), since)
        if self.config.authenticate is None:
            return ctx  # no coroutine to await on every connection
        return await self.fetcher.context(ctx)

    def _check_id(self, session_id: object) -> None:
        if isinstance(session_id, str):
            problem = self.session_ids.problem(session_id)
        else:
            problem = f"not a str but {type(session_id).__name__}"
        if problem is not None:
            self.stats.incr("invalid_ids")
            raise ValueError(f"invalid session id {clip_for_log(str(session_id))!r}: {problem}")

    async def accept(
        self,
        scope: Any,
        send: Any,
        session_id: str,
        *,
        user: Any = _FROM_SCOPE,
        subprotocol: str | None = None,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> SessionSocket:
        """Accept a WebSocket with the session's snapshot as its first frame.

        Loads the snapshot, then sends ``websocket.accept`` (ASGI spec, WebSocket "Accept"
        message) and the snapshot right after it through ``send``, so the client is connected
        when its state is ready. Subscribe to live updates *before* calling this (the bridge's
        ``subscribe``), so that nothing published after the load is missed. As with the
        middleware, a snapshot is never worth a broken connection: when loading fails the
        socket is accepted without one (logged, counted, passed to ``on_error``).

        ```python
        async with bridge.subscribe(session_id) as updates:
            socket = await sync.accept(websocket.scope, websocket.send, session_id, user=user)
            await updates.forward(socket, websocket.receive, heartbeat=15)
        ```

        Args:
            scope: The connection's ASGI scope (``websocket.scope``); read for ``since``.
            send: A send that takes ASGI messages: ``websocket.send`` in Starlette and
                FastAPI, ``socket.send`` in Litestar, or the raw ASGI ``send``.
            session_id: The session, from the route; validated here.
            user: The connecting user, when the app authenticated it (a dependency, a guard):
                the loader sees it as ``ctx.user``. Left out, ``authenticate`` or
                ``scope["user"]`` says who connects.
            subprotocol: The WebSocket subprotocol to accept, if any.
            headers: Extra response headers for the accept, as ``(name, value)`` bytes.

        Raises:
            ValueError: ``session_id`` is not a valid session id (the message says why);
                nothing was sent. Validate ids in the route to answer with a close instead.
            Exception: Whatever ``send`` raises when the client left during the load (in
                Starlette, ``WebSocketDisconnect``), as from the app's own sends.
        """
        self._check_id(session_id)
        self.stats.incr("connections")
        ctx = await self.context(scope, session_id, user)
        first = FAILED if ctx is None else await self.fetcher.first_frame(ctx)
        accept: dict[str, Any] = {"type": "websocket.accept", "subprotocol": subprotocol}
        headers = list(headers)
        if headers:
            accept["headers"] = headers
        await send(accept)
        socket = SessionSocket(self, scope, send, session_id, ctx, first)
        if first.data is not None:
            # The app's own send: a client gone meanwhile raises what the app's sends raise
            # (Starlette's WebSocketDisconnect), for the route to handle as it always does.
            await send({"type": "websocket.send", "text": first.data.decode()})
            self.stats.incr("snapshots_sent")
        return socket

    async def accept_sse(
        self,
        scope: Any,
        send: Any,
        session_id: str,
        *,
        user: Any = _FROM_SCOPE,
        headers: Iterable[tuple[bytes, bytes]] = (),
        refused_status: int | None = 404,
    ) -> SessionSocket:
        """Start a Server-Sent Events response with the session's snapshot as its first event.

        The event-stream counterpart of :meth:`accept`, for a raw ASGI HTTP route (or a
        framework route that hands over ``send``): loads the snapshot, then sends
        ``http.response.start`` (200, ``content-type: text/event-stream``, ``cache-control:
        no-cache``, ``x-accel-buffering: no`` so nginx does not buffer it) and the snapshot as
        the first event (``event: session_update``, ``id:`` its version, ``data:`` the same
        JSON a WebSocket gets; see :func:`~asgi_session_sync.protocol.sse_event`). A client's
        ``Last-Event-ID`` header (or ``?since=``) is its resume version. Hand the returned
        socket to the bridge's ``forward``, which sends each live update as an event with its
        version as ``id:`` and returns when the client disconnects (``http.disconnect``).

        A stream's status cannot change once it has started, so the load comes first: when
        the loader says there is no such session for this user (it returned ``None``), the
        response is ``refused_status`` with no stream, and the socket's
        :attr:`~SessionSocket.refused` is true (``forward`` then returns at once). When the
        load failed, the stream starts with a comment and no snapshot (``failed``): end it,
        and the client retries.

        Args:
            scope: The request's ASGI scope.
            send: The raw ASGI send of the response.
            session_id: The session, from the route; validated here.
            user: The connecting user, when the app authenticated it.
            headers: Extra response headers, as ``(name, value)`` bytes.
            refused_status: The HTTP status answered to a refused session (404, so another
                user's session looks like a missing one); ``None`` starts the stream anyway.

        Raises:
            ValueError: ``session_id`` is not a valid session id; nothing was sent.
            Exception: Whatever ``send`` raises when the client left during the load (a
                server that follows ASGI 2.4 raises ``OSError``; Starlette's
                ``ClientDisconnect``), as from the app's own sends.
        """
        self._check_id(session_id)
        self.stats.incr("connections")
        ctx = await self.context(scope, session_id, user)
        first = FAILED if ctx is None else await self.fetcher.first_frame(ctx)
        socket = SessionSocket(self, scope, send, session_id, ctx, first, transport="sse")
        if refused_status is not None and socket.refused:
            await send(
                {
                    "type": "http.response.start",
                    "status": refused_status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                }
            )
            await send({"type": "http.response.body", "body": b"no such session\n"})
            return socket
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*SSE_HEADERS, *headers],
            }
        )
        if first.data is not None:
            await socket.send_snapshot(first.data)
        else:
            # Headers alone may sit in a proxy's buffer: a comment opens the stream now.
            await send({"type": "http.response.body", "body": b": open\n\n", "more_body": True})
        return socket


class SessionSocket:
    """One WebSocket accepted with its session's snapshot: what live updates chain from.

    Returned by :meth:`SessionSync.accept`; pass it to the bridge's ``forward``.

    Attributes:
        session_id: The session.
        user: Who connected (``ctx.user`` of the loader); ``None`` when unknown.
        version: The version of the state the snapshot gave the client, or the client's own
            ``since`` when resume found it current; ``None`` when nothing was sent or the
            snapshot had no version.
        owner: The owner the loader named, if any: live frames naming another are refused.
        known: Whether the client's state is known (a snapshot was sent, or resume said it is
            current). While unknown, a live patch waits for a resync.
        failed: Whether no snapshot was sent because something failed (the loader raised or
            timed out, ``authenticate`` raised; logged and counted), rather than because the
            loader said there is no such session for this user. A route that closes a socket
            without a snapshot can tell a refusal (close code 1008) from a failure worth a
            retry (1011).
    """

    __slots__ = (
        "_ctx",
        "_send",
        "_sync",
        "failed",
        "known",
        "owner",
        "scope",
        "session_id",
        "transport",
        "version",
    )

    def __init__(
        self,
        sync: SessionSync,
        scope: Scope,
        send: Send,
        session_id: str,
        ctx: SessionContext | None,
        first: FirstFrame,
        *,
        transport: Literal["websocket", "sse"] = "websocket",
    ) -> None:
        self._sync = sync
        self.transport = transport
        """``"websocket"``, or ``"sse"`` for an event stream (:meth:`SessionSync.accept_sse`)."""
        self._send = send
        self._ctx = ctx
        self.scope = scope
        self.session_id = session_id
        self.version: Version | None = first.version
        self.owner = first.owner
        self.known = first.known
        self.failed = first.failed

    @property
    def refused(self) -> bool:
        """Whether the loader said there is no such session for this user: nothing was sent,
        and nothing failed. A route closes the socket (WebSocket code 1008);
        :meth:`SessionSync.accept_sse` has answered with its ``refused_status`` already."""
        return not self.known and not self.failed and self.version is None

    @property
    def user(self) -> Any:
        """Who connected, as the loader saw it; ``None`` when unknown."""
        return None if self._ctx is None else self._ctx.user

    async def send_text(self, text: str) -> None:
        """Send one frame's JSON text: a ``websocket.send``, or on an event stream one event."""
        if self.transport == "sse":
            parsed = parse_frame(text)
            frame = Frame(text, Kind.OTHER) if isinstance(parsed, str) else parsed
            await self.send_frame(frame)
        else:
            await self._send({"type": "websocket.send", "text": text})

    async def send_frame(self, frame: Frame) -> None:
        """Send one parsed frame: its text on a WebSocket; on an event stream, an event
        whose ``id:`` is its version (:func:`~asgi_session_sync.protocol.sse_event`)."""
        if self.transport == "sse":
            body = sse_event(frame)
            await self._send({"type": "http.response.body", "body": body, "more_body": True})
        else:
            await self._send({"type": "websocket.send", "text": frame.text})

    async def end_stream(self) -> None:
        """End an event stream's response (the last ``http.response.body``); on a WebSocket,
        nothing. A client already gone is not an error."""
        if self.transport != "sse":
            return
        try:
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception as exc:  # the server's own type when the client left
            logger.debug("event stream already closed session_id=%s: %r", self.session_id, exc)

    async def send_snapshot(self, data: bytes) -> bool:
        """Send the snapshot frame for the middleware, which never lets a server's error
        reach the app: ``False`` (logged, counted) if the server refused it."""
        fetcher = self._sync.fetcher
        try:
            if self.transport == "sse":
                # The event's id is the version this socket already holds: no second parse.
                synced = data.startswith(b'{"type":"session_synced"')
                kind = Kind.SYNCED if synced else Kind.UPDATE
                frame = Frame(data.decode(), kind, self.session_id, self.owner, self.version)
                await self.send_frame(frame)
            else:
                await self._send({"type": "websocket.send", "text": data.decode()})
        except OSError:
            # The client left during the load; the app learns it from receive(), as usual.
            logger.debug("no snapshot: client gone before send session_id=%s", self.session_id)
            return False
        except Exception as exc:
            # Servers raise their own types too (hypercorn): a snapshot never breaks the app.
            ctx = self._ctx or SessionContext(self.session_id, self.scope)
            fetcher.stats.incr("errors")
            logger.error(
                "no snapshot: the server's send raised session_id=%s path=%r",
                self.session_id,
                clip_for_log(self.scope.get("path", "")),
                exc_info=exc,
            )
            fetcher.report(ctx, exc)
            return False
        fetcher.stats.incr("snapshots_sent")
        return True

    async def resync(self) -> Frame | None:
        """Load the session afresh for this socket: the snapshot frame, or ``None``.

        Same loader, user, timeout and limits as the first snapshot, never the TTL cache, and
        never a load that started before this call. ``None`` when there is nothing to send
        (the reason is logged).
        """
        if self._ctx is None:
            return None
        loaded = await self._sync.fetcher.snapshot(self._ctx, fresh=True)
        return None if loaded is None else loaded.snapshot_frame()
