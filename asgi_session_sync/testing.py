"""An in-process WebSocket transport for tests: drive any ASGI app without a server.

```python
from asgi_session_sync.testing import connect_websocket

async def test_snapshot_first(app):
    async with connect_websocket(app, "/ws/sessions/abc") as ws:
        event = await ws.receive_json()
        assert event["type"] == "session_update"
```

It behaves like a server where tests need it to: the app receives ``websocket.connect`` first,
a ``send`` after the client disconnected raises an ``OSError`` (:class:`ClientDisconnected`),
``receive`` after the disconnect keeps returning ``websocket.disconnect``, and every wait is
bounded by ``timeout``. Runs on asyncio and trio.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from asgiref.compatibility import guarantee_single_callable

from ._types import ASGIApp, Message, Scope

__all__ = [
    "ClientDisconnected",
    "WebSocketClient",
    "WebSocketClosed",
    "WebSocketRejected",
    "connect_websocket",
]


class ClientDisconnected(OSError):
    """Raised into the app when it sends after the client disconnected, as servers do."""


class WebSocketClosed(Exception):
    """The app closed the WebSocket (or returned) while the test was waiting for a frame."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"websocket closed by the app: code={code} reason={reason!r}")
        self.code = code
        self.reason = reason


class WebSocketRejected(Exception):
    """The app closed or answered with HTTP before accepting the WebSocket."""

    def __init__(self, code: int, reason: str = "", *, status: int | None = None) -> None:
        super().__init__(f"websocket rejected: code={code} status={status} reason={reason!r}")
        self.code = code
        self.reason = reason
        self.status = status


class WebSocketClient:
    """The client side of one in-process WebSocket; made by :func:`connect_websocket`.

    Attributes:
        scope: The scope the app was called with.
        subprotocol: The subprotocol the app accepted, if any.
        accept_headers: The headers the app sent with ``websocket.accept``.
        sent_after_close: Messages the app tried to send after the connection ended (a server
            would have raised); tests assert this stays empty.
    """

    def __init__(self, scope: Scope, timeout: float) -> None:
        self.scope = scope
        self.timeout = timeout
        self.subprotocol: str | None = None
        self.accept_headers: list[tuple[bytes, bytes]] = []
        self.sent_after_close: list[Message] = []
        self._to_app: MemoryObjectSendStream[Message]
        self._app_inbox: MemoryObjectReceiveStream[Message]
        self._to_app, self._app_inbox = anyio.create_memory_object_stream[Message](math.inf)
        self._from_app: MemoryObjectSendStream[Message]
        self._client_inbox: MemoryObjectReceiveStream[Message]
        self._from_app, self._client_inbox = anyio.create_memory_object_stream[Message](math.inf)
        self._disconnect: Message | None = None
        self._closed_by_app: Message | None = None
        self._app_error: BaseException | None = None
        self._app_done = anyio.Event()

    # The server side, as the app sees it.

    async def _asgi_receive(self) -> Message:
        if self._disconnect is not None and not self._app_inbox.statistics().current_buffer_used:
            return dict(self._disconnect)
        return await self._app_inbox.receive()

    async def _asgi_send(self, message: Message) -> None:
        if self._closed_by_app is not None or self._disconnect is not None:
            self.sent_after_close.append(message)
            if self._disconnect is not None:
                raise ClientDisconnected(f"client disconnected; cannot send {message['type']!r}")
            raise RuntimeError(f"cannot send {message['type']!r} after 'websocket.close'")
        if message["type"] == "websocket.close":
            self._closed_by_app = message
        await self._from_app.send(message)

    async def _run(self, app: ASGIApp) -> None:
        try:
            await app(self.scope, self._asgi_receive, self._asgi_send)
        except anyio.get_cancelled_exc_class():
            raise
        except ClientDisconnected:
            # The app sent after the client left, learning it that way: servers treat this as
            # the normal end of the connection, and so does this transport.
            pass
        except BaseException as exc:  # kept for the test, re-raised when the connection ends
            self._app_error = exc
        finally:
            self._app_done.set()
            self._from_app.close()

    async def _handshake(self) -> None:
        await self._to_app.send({"type": "websocket.connect"})
        message = await self._next_message()
        if message["type"] == "websocket.accept":
            self.subprotocol = message.get("subprotocol")
            self.accept_headers = list(message.get("headers", []))
            return
        if message["type"] == "websocket.close":
            raise WebSocketRejected(message.get("code", 1000), message.get("reason") or "")
        if message["type"] == "websocket.http.response.start":
            raise WebSocketRejected(1000, status=message["status"])
        raise RuntimeError(f"unexpected message before accept: {message['type']!r}")

    async def _next_message(self) -> Message:
        try:
            with anyio.fail_after(self.timeout):
                return await self._client_inbox.receive()
        except anyio.EndOfStream:
            if self._app_error is not None:
                raise self._app_error from None
            if self._closed_by_app is not None:
                code = self._closed_by_app.get("code", 1000)
                raise WebSocketClosed(code, self._closed_by_app.get("reason") or "") from None
            raise WebSocketClosed(1000, "the app returned") from None

    def _close_streams(self) -> None:
        for stream in (self._to_app, self._app_inbox, self._from_app, self._client_inbox):
            stream.close()

    # The client side, as tests use it.

    async def receive(self) -> Message:
        """Return the app's next message (``websocket.send`` or ``websocket.close``).

        Raises:
            TimeoutError: Nothing arrived within ``timeout``.
            WebSocketClosed: The app returned without sending more.
        """
        return await self._next_message()

    async def receive_text(self) -> str:
        """Return the next text frame.

        Raises:
            WebSocketClosed: The app closed the connection instead.
        """
        message = await self._next_message()
        if message["type"] == "websocket.close":
            raise WebSocketClosed(message.get("code", 1000), message.get("reason") or "")
        text = message.get("text")
        if text is None:
            raise TypeError(f"expected a text frame, got bytes: {message.get('bytes')!r}")
        return str(text)

    async def receive_json(self) -> Any:
        """Return the next text frame, decoded as JSON."""
        return json.loads(await self.receive_text())

    async def send_text(self, text: str) -> None:
        """Send a text frame to the app."""
        await self._to_app.send({"type": "websocket.receive", "text": text})

    async def send_bytes(self, data: bytes) -> None:
        """Send a binary frame to the app."""
        await self._to_app.send({"type": "websocket.receive", "bytes": data})

    async def send_json(self, data: Any) -> None:
        """Send ``data`` as a JSON text frame to the app."""
        await self.send_text(json.dumps(data))

    async def disconnect(self, code: int = 1000) -> None:
        """Disconnect as a client closing its socket; the app's next receive gets it."""
        if self._disconnect is None:
            self._disconnect = {"type": "websocket.disconnect", "code": code}
            await self._to_app.send(dict(self._disconnect))

    async def wait_app_done(self) -> None:
        """Wait until the app returns, re-raising its exception if it failed."""
        with anyio.fail_after(self.timeout):
            await self._app_done.wait()
        if self._app_error is not None:
            raise self._app_error


@asynccontextmanager
async def connect_websocket(
    app: ASGIApp,
    path: str,
    *,
    headers: Mapping[str, str] | Iterable[tuple[bytes, bytes]] = (),
    subprotocols: Iterable[str] = (),
    scope: Mapping[str, Any] | None = None,
    timeout: float = 5.0,  # noqa: ASYNC109 (bounds each wait, not the whole connection)
) -> AsyncIterator[WebSocketClient]:
    """Open a WebSocket to ``app`` in-process and yield its client side.

    On exit the client disconnects (if the app has not closed) and waits for the app to return,
    re-raising the app's exception if it failed. The app's lifespan is not run: enter it
    yourself (or open what it would open) when the app needs it.

    Args:
        app: Any ASGI 3 or ASGI 2 application.
        path: The request path, optionally with a query string (``"/ws?session_id=a"``);
            percent-escapes are decoded into ``scope["path"]`` as servers do.
        headers: Extra request headers.
        subprotocols: Subprotocols the client offers.
        scope: Extra scope keys (``{"user": ...}``, ``{"root_path": ...}``) merged last.
        timeout: Seconds any single wait may take before ``TimeoutError``. The handshake
            includes a wrapped app's snapshot load: make it longer than the middleware's
            ``timeout`` to test a load that times out.

    Raises:
        WebSocketRejected: The app closed or sent an HTTP response instead of accepting.
    """
    raw_path, _, query = path.partition("?")
    header_list = (
        [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        if isinstance(headers, Mapping)
        else list(headers)
    )
    full_scope: Scope = {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "ws",
        "server": ("testserver", 80),
        "client": ("testclient", 50000),
        "root_path": "",
        "path": unquote(raw_path),
        "raw_path": raw_path.encode("latin-1", "replace"),
        "query_string": query.encode("latin-1", "replace"),
        "headers": [(b"host", b"testserver"), *header_list],
        "subprotocols": list(subprotocols),
        "state": {},
        "extensions": {"websocket.http.response": {}},
        **(scope or {}),
    }
    client = WebSocketClient(full_scope, timeout)
    asgi_app: ASGIApp = guarantee_single_callable(app)  # type: ignore[no-untyped-call]
    error: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client._run, asgi_app)
            try:
                await client._handshake()
                yield client
                if client._closed_by_app is None:
                    await client.disconnect()
                await client.wait_app_done()
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException as exc:
                # Raised outside the task group, so callers see it as is, not in an
                # ExceptionGroup.
                error = exc
            finally:
                tg.cancel_scope.cancel()
    finally:
        client._close_streams()
    if error is not None:
        raise error
