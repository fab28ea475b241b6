"""Server-Sent Events through SessionSyncMiddleware, in process, on asyncio and trio.

The middleware's one line over an event-stream route in every framework's SSE idiom
(sse-starlette's ``EventSourceResponse`` under FastAPI and Starlette, Litestar's
``ServerSentEvent``, Quart's streaming response, a raw ASGI app): the snapshot is the stream's
first event, ``Last-Event-ID`` (or ``?since=``) is the resume version, the app's events after it
are fenced, and everything that is not a 200 event stream on a served GET passes untouched with
no load. Compression and content lengths, and the bad input of issue 22.

The client here is :class:`ResponseClient`: an in-process HTTP "server" that checks the ASGI
messages it is sent as uvicorn does, with the event-stream grammar of the HTML standard
(:class:`EventParser`). ``tests/test_sse_property.py`` and the real-server tests reuse both.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from conftest import SESSION, RecordingLoader, greeting_app
from fastapi import FastAPI
from litestar import Litestar, get
from litestar.middleware import DefineMiddleware
from litestar.response import ServerSentEvent as LitestarServerSentEvent
from quart import Quart, make_response
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_session_sync import SessionContext, SessionSync, SessionSyncMiddleware, Snapshot
from asgi_session_sync._types import ASGIApp, Message, Receive, Scope, Send
from asgi_session_sync.hub import Hub
from asgi_session_sync.stats import BridgeStats
from asgi_session_sync.testing import ClientDisconnected, connect_websocket

pytestmark = pytest.mark.anyio

_LINE_END = re.compile(rb"\r\n|\r|\n")

WAIT = 5.0
"""Seconds any wait of these tests may take, at most."""

VERSION = 7
OWNER = "alice"
PATHS = ["/sse/sessions/{session_id}", "/ws/sessions/{session_id}"]

# --------------------------------------------------------------------------------------------
# The client: HTML's event-stream grammar, and an in-process HTTP response
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One dispatched Server-Sent Event, as the browser's ``EventSource`` hands it over.

    Attributes:
        type: The ``event:`` field, ``"message"`` when the event has none.
        data: The ``data:`` lines, joined by line feeds.
        id: The stream's last event id when the event was dispatched (what a reconnect sends
            as ``Last-Event-ID``).
    """

    type: str
    data: str
    id: str

    def json(self) -> Any:
        return json.loads(self.data)


class EventParser:
    """The event-stream interpretation of the HTML standard (9.2.6), fed bytes as they come.

    Lines end in CRLF, LF or CR, as a browser reads them: a CR ends its line at once, and an LF
    right after it, even in the next chunk, is part of it. Comments (lines starting with ``:``)
    are kept in :attr:`comments`.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._after_cr = False
        self._data: list[str] = []
        self._type = ""
        self.last_event_id = ""
        self.comments: list[str] = []
        self.retry: int | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        """The events that ``chunk`` completes."""
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF split between chunks
        buffer = self._buffer + chunk
        events: list[Event] = []
        start = 0
        for end in _LINE_END.finditer(buffer):
            event = self._line(buffer[start : end.start()].decode("utf-8", "replace"))
            if event is not None:
                events.append(event)
            start = end.end()
        self._buffer = buffer[start:]
        self._after_cr = start > 0 and buffer[start - 1 : start] == b"\r"
        return events

    def _line(self, line: str) -> Event | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments.append(line[1:].removeprefix(" "))
            return None
        name, colon, value = line.partition(":")
        value = value.removeprefix(" ") if colon else ""
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_event_id = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> Event | None:
        data, event_type = self._data, self._type
        self._data, self._type = [], ""
        if not data:
            return None
        return Event(event_type or "message", "\n".join(data), self.last_event_id)


def parse_events(body: bytes) -> list[Event]:
    """Every event of a whole event-stream body."""
    return EventParser().feed(body)


class ResponseClient:
    """The client of one in-process HTTP request, and a server as strict as uvicorn's.

    The app receives ``http.request`` (no body), then ``http.disconnect`` once the client
    leaves. A message out of order (a body before the start, anything after the last body)
    raises ``RuntimeError`` into the app as uvicorn does, and is kept in
    :attr:`protocol_errors`; a send after the client left raises :class:`ClientDisconnected`
    (an ``OSError``, as ASGI 2.4 servers raise).

    Attributes:
        scope: The scope the app was called with.
        start: The ``http.response.start`` message, once sent.
        body: Every body byte the app sent.
        chunks: Each ``http.response.body`` message's bytes, in order (empty ones too).
        complete: Whether the app sent its last body (``more_body`` false).
        app_error: What the app raised, if it did.
    """

    def __init__(self, scope: Scope, timeout: float) -> None:
        self.scope = scope
        self.timeout = timeout
        self.start: Message | None = None
        self.body = bytearray()
        self.chunks: list[bytes] = []
        self.complete = False
        self.protocol_errors: list[str] = []
        self.app_error: BaseException | None = None
        self.app_done = anyio.Event()
        self.parser = EventParser()
        self._events: list[Event] = []
        self._started = anyio.Event()
        self._disconnected = anyio.Event()
        self._requested = False
        self._wakeup = anyio.Event()

    # The server's side.

    async def receive(self) -> Message:
        if not self._requested:
            self._requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        await anyio.lowlevel.checkpoint()  # a server's send is a checkpoint
        if self._disconnected.is_set():
            raise ClientDisconnected("the client disconnected")
        kind = message["type"]
        if self.start is None:
            if kind != "http.response.start":
                self._refuse(f"expected http.response.start, got {kind}")
            self.start = dict(message)
            self._started.set()
            return
        if kind != "http.response.body" or self.complete:
            self._refuse(f"unexpected {kind} (complete={self.complete})")
        chunk = bytes(message.get("body", b""))
        self.chunks.append(chunk)
        self.body += chunk
        self.complete = not message.get("more_body", False)
        self._events.extend(self.parser.feed(chunk))
        self._wakeup.set()

    def _refuse(self, problem: str) -> None:
        self.protocol_errors.append(problem)
        raise RuntimeError(problem)

    # The client's side.

    @property
    def status(self) -> int:
        assert self.start is not None, "no response start"
        return int(self.start["status"])

    def header(self, name: str) -> str | None:
        """A response header's value (the first of that name), or ``None``."""
        assert self.start is not None, "no response start"
        for key, value in self.start.get("headers", ()):
            if bytes(key).lower() == name.encode():
                return bytes(value).decode("latin-1")
        return None

    async def started(self) -> Message:
        """The response start, once the app sent it (bounded by ``timeout``)."""
        with anyio.fail_after(self.timeout):
            await self._started.wait()
        assert self.start is not None
        return self.start

    async def next_event(self) -> Event:
        """The next dispatched event (comments are skipped), bounded by ``timeout``."""
        with anyio.fail_after(self.timeout):
            while not self._events:
                if self.complete or self.app_done.is_set():
                    raise AssertionError(f"the stream ended; body: {bytes(self.body)!r}")
                self._wakeup = anyio.Event()
                await self._wakeup.wait()
        return self._events.pop(0)

    async def events(self, count: int) -> list[Event]:
        return [await self.next_event() for _ in range(count)]

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds after some message, bounded by ``timeout``."""
        with anyio.fail_after(self.timeout):
            while not condition():
                self._wakeup = anyio.Event()
                await self._wakeup.wait()

    async def read_to_end(self) -> bytes:
        """The whole body, once the app returned (bounded by ``timeout``)."""
        with anyio.fail_after(self.timeout):
            await self.app_done.wait()
        return bytes(self.body)

    def disconnect(self) -> None:
        """The client leaves: the app's ``receive`` returns ``http.disconnect``."""
        self._disconnected.set()
        self._wakeup.set()

    async def wait_app_done(self) -> None:
        with anyio.fail_after(self.timeout):
            await self.app_done.wait()


def http_scope(
    path: str, *, method: str = "GET", headers: Iterable[tuple[str, str]] = (), query: str = ""
) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "headers": [(b"host", b"testserver"), *((k.encode(), v.encode()) for k, v in headers)],
        "state": {},
    }


@asynccontextmanager
async def open_response(
    app: Any,
    path: str,
    *,
    method: str = "GET",
    headers: Iterable[tuple[str, str]] = (),
    query: str = "",
    timeout: float = WAIT,  # noqa: ASYNC109 (each wait's bound, kept by the client)
) -> AsyncIterator[ResponseClient]:
    """Call ``app`` with a GET (or ``method``) on ``path``; the client leaves when the block
    ends, and the app must then return within ``timeout`` seconds."""
    client = ResponseClient(http_scope(path, method=method, headers=headers, query=query), timeout)

    async def run() -> None:
        try:
            await app(client.scope, client.receive, client.send)
        except Exception as exc:
            client.app_error = exc
        finally:
            client.app_done.set()
            client._wakeup.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            yield client
        finally:
            client.disconnect()
            with anyio.move_on_after(timeout) as waited:
                await client.app_done.wait()
            if waited.cancelled_caught:
                tg.cancel_scope.cancel()
                raise AssertionError(f"the app did not return {timeout}s after the client left")


async def whole_response(app: Any, path: str, **request: Any) -> ResponseClient:
    """Run a request whose response ends by itself; the client once the app returned."""
    async with open_response(app, path, **request) as client:
        await client.read_to_end()
    return client


# --------------------------------------------------------------------------------------------
# The loaders and apps the tests share
# --------------------------------------------------------------------------------------------


class VersionedLoader(RecordingLoader):
    """Returns ``SESSION`` owned by alice at ``version``; records every context."""

    def __init__(self, version: int = VERSION) -> None:
        super().__init__()
        self.version = version

    def result(self, ctx: SessionContext) -> Snapshot:
        return Snapshot(SESSION, owner=OWNER, version=self.version)


def snapshot_json(session_id: str, version: int = VERSION) -> dict[str, Any]:
    return {
        "type": "session_update",
        "session_id": session_id,
        "owner": OWNER,
        "session": SESSION,
        "version": version,
    }


def assert_snapshot_event(event: Event, session_id: str, version: int = VERSION) -> None:
    assert (event.type, event.id) == ("session_update", str(version)), event
    assert event.json() == snapshot_json(session_id, version)


HELLO = b"event: greeting\r\ndata: hello\r\n\r\n"


def raw_sse_app(
    chunks: Sequence[bytes] = (HELLO,),
    *,
    status: int = 200,
    content_type: bytes = b"text/event-stream; charset=utf-8",
    headers: Iterable[tuple[bytes, bytes]] = (),
    end: bool = False,
) -> ASGIApp:
    """A raw ASGI event stream: ``chunks`` as body messages, then waits for the client to
    leave (or, with ``end``, ends the body)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "http.request"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type), *headers],
            }
        )
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if end:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        while (await receive())["type"] != "http.disconnect":
            pass

    return app


async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
    """WebSockets on ``/ws/...`` get ``greeting_app``; HTTP gets ``raw_sse_app()``."""
    if scope["type"] == "websocket":
        await greeting_app(scope, receive, send)
    else:
        await raw_sse_app()(scope, receive, send)


def wrap(app: Any, loader: Any = None, **options: Any) -> SessionSyncMiddleware:
    return SessionSyncMiddleware(app, loader=loader or VersionedLoader(), paths=PATHS, **options)


async def greeting_events() -> AsyncIterator[dict[str, str]]:
    """The frameworks' event source: one greeting, then quiet until the client leaves."""
    yield {"event": "greeting", "data": "hello"}
    await anyio.sleep_forever()


# sse-starlette under FastAPI and Starlette


def fastapi_app(loader: VersionedLoader) -> FastAPI:
    api = FastAPI()

    @api.get("/sse/sessions/{session_id}")
    async def events(session_id: str) -> EventSourceResponse:
        return EventSourceResponse(greeting_events())

    api.add_middleware(SessionSyncMiddleware, loader=loader, paths=PATHS)
    return api


def starlette_app(loader: VersionedLoader) -> Starlette:
    async def events(request: Request) -> EventSourceResponse:
        return EventSourceResponse(greeting_events())

    return Starlette(
        routes=[Route("/sse/sessions/{session_id}", events)],
        middleware=[Middleware(SessionSyncMiddleware, loader=loader, paths=PATHS)],
    )


def litestar_app(loader: VersionedLoader) -> Litestar:
    async def greetings() -> AsyncIterator[dict[str, str]]:
        # Litestar's messages take the same keys: event, data, id, retry, comment.
        async for event in greeting_events():
            yield {"event": event["event"], "data": event["data"]}

    # No session_id argument: declaring one without FromPath is deprecated in Litestar 2.25.
    @get("/sse/sessions/{session_id:str}")
    async def events() -> LitestarServerSentEvent:
        return LitestarServerSentEvent(greetings())

    return Litestar(
        route_handlers=[events],
        logging_config=None,  # Litestar's default installs a handler on the root logger
        middleware=[DefineMiddleware(SessionSyncMiddleware, loader=loader, paths=PATHS)],
    )


def quart_app(loader: VersionedLoader) -> Any:
    quart = Quart(__name__)

    @quart.get("/sse/sessions/<session_id>")
    async def events(session_id: str) -> Any:
        async def body() -> AsyncIterator[bytes]:
            yield HELLO
            await anyio.sleep_forever()

        response = await make_response(
            body(), 200, {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        response.timeout = None  # type: ignore[union-attr]  # an event stream never ends
        return response

    quart.asgi_app = SessionSyncMiddleware(  # type: ignore[method-assign]
        quart.asgi_app, loader=loader, paths=PATHS
    )
    return quart


def raw_framework_app(loader: VersionedLoader) -> SessionSyncMiddleware:
    return wrap(raw_app, loader)


FRAMEWORKS: dict[str, Callable[[VersionedLoader], Any]] = {
    "fastapi-sse-starlette": fastapi_app,
    "starlette-sse-starlette": starlette_app,
    "litestar": litestar_app,
    "quart": quart_app,
    "raw-asgi": raw_framework_app,
}


@pytest.fixture(params=list(FRAMEWORKS))
def framework(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    if name == "quart" and request.getfixturevalue("anyio_backend") == "trio":
        pytest.skip("Quart runs on asyncio only")
    return name


# --------------------------------------------------------------------------------------------
# 1. The same one line: the snapshot is the first event
# --------------------------------------------------------------------------------------------


async def test_snapshot_is_the_first_event_then_the_apps_events_in_every_framework(
    framework: str,
) -> None:
    loader = VersionedLoader()
    app = FRAMEWORKS[framework](loader)
    async with open_response(app, "/sse/sessions/s1") as client:
        first, second = await client.events(2)
        assert client.status == 200
        assert (client.header("content-type") or "").startswith("text/event-stream")
        assert_snapshot_event(first, "s1")
        assert (second.type, second.data) == ("greeting", "hello")
        # The greeting has no id: the stream's last event id stays the snapshot's version.
        assert second.id == str(VERSION)
    assert [ctx.session_id for ctx in loader.calls] == ["s1"]
    assert client.app_error is None, client.app_error
    assert client.protocol_errors == []


async def test_the_first_events_data_is_the_websocket_frame_byte_for_byte() -> None:
    app = wrap(raw_app)
    async with connect_websocket(app, "/ws/sessions/s1") as ws:
        frame = await ws.receive_text()
    async with open_response(app, "/sse/sessions/s1") as client:
        event = await client.next_event()
    assert event.data == frame
    # The event's lines, as protocol.sse_event writes them: type, id, data, blank line.
    assert bytes(client.body).startswith(
        f"event: session_update\nid: {VERSION}\ndata: {frame}\n\n".encode()
    )


async def test_the_apps_headers_and_status_line_reach_the_client_unchanged() -> None:
    headers = [(b"cache-control", b"no-store"), (b"x-custom", b"1"), (b"set-cookie", b"a=b")]
    bare = raw_sse_app(headers=headers)
    async with open_response(bare, "/sse/sessions/s1") as unwrapped:
        await unwrapped.next_event()
    async with open_response(wrap(bare), "/sse/sessions/s1") as wrapped:
        await wrapped.events(2)
    assert wrapped.start == unwrapped.start


async def test_a_load_that_fails_still_starts_the_stream_with_the_apps_events(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def failing(ctx: SessionContext) -> Snapshot:
        raise RuntimeError("database down")

    async with open_response(wrap(raw_sse_app(), failing), "/sse/sessions/s1") as client:
        event = await client.next_event()
    assert (event.type, event.data) == ("greeting", "hello")
    assert "no snapshot: loader raised" in caplog.text


async def test_no_session_starts_the_stream_without_a_snapshot() -> None:
    class Nothing(RecordingLoader):
        def result(self, ctx: SessionContext) -> None:
            return None

    loader = Nothing()
    async with open_response(wrap(raw_sse_app(), loader), "/sse/sessions/s1") as client:
        event = await client.next_event()
    assert event.type == "greeting"
    assert len(loader.calls) == 1


# --------------------------------------------------------------------------------------------
# Resume: Last-Event-ID, then ?since=
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_options",
    [{"headers": [("last-event-id", str(VERSION))]}, {"query": f"since={VERSION}"}],
    ids=["last-event-id", "since"],
)
async def test_a_current_client_gets_session_synced_with_send_synced(
    request_options: dict[str, Any],
) -> None:
    loader = VersionedLoader()
    app = wrap(raw_sse_app(), loader, send_synced=True)
    async with open_response(app, "/sse/sessions/s1", **request_options) as client:
        synced, greeting = await client.events(2)
    assert (synced.type, synced.id) == ("session_synced", str(VERSION))
    assert synced.json() == {"type": "session_synced", "session_id": "s1", "version": VERSION}
    assert greeting.type == "greeting"
    assert loader.calls[0].since == VERSION
    assert app.stats.skipped_by_resume == 1


async def test_a_current_client_gets_no_snapshot_without_send_synced() -> None:
    app = wrap(raw_sse_app())
    headers = [("last-event-id", str(VERSION))]
    async with open_response(app, "/sse/sessions/s1", headers=headers) as client:
        event = await client.next_event()
    assert event.type == "greeting"
    assert b"session_" not in client.body


async def test_a_client_behind_gets_the_full_snapshot() -> None:
    loader = VersionedLoader()
    headers = [("last-event-id", str(VERSION - 2))]
    async with open_response(wrap(raw_sse_app(), loader), "/sse/sessions/s1", headers=headers) as c:
        assert_snapshot_event(await c.next_event(), "s1")
    assert loader.calls[0].since == VERSION - 2


async def test_last_event_id_wins_over_the_since_of_the_first_connect() -> None:
    # EventSource reconnects to the same URL, ?since= of its first connect included, and sends
    # the id of the last event it saw: that is where the client is.
    loader = VersionedLoader()
    app = wrap(raw_sse_app(), loader, send_synced=True)
    headers = [("last-event-id", str(VERSION))]
    query = f"since={VERSION - 3}"
    async with open_response(app, "/sse/sessions/s1", headers=headers, query=query) as client:
        assert (await client.next_event()).type == "session_synced"
    assert loader.calls[0].since == VERSION


async def test_the_version_loader_answers_a_resume_without_the_full_load() -> None:
    loader = VersionedLoader()

    async def version_of(ctx: SessionContext) -> int:
        return VERSION

    app = wrap(raw_sse_app(), loader, version_loader=version_of, send_synced=True)
    headers = [("last-event-id", str(VERSION))]
    async with open_response(app, "/sse/sessions/s1", headers=headers) as client:
        assert (await client.next_event()).type == "session_synced"
    assert loader.calls == []


# --------------------------------------------------------------------------------------------
# The fence: the app's events after the snapshot
# --------------------------------------------------------------------------------------------


def update_event(version: int, *, with_id: bool = True, sep: str = "\n", text: str = "") -> bytes:
    data = json.dumps(
        {"type": "session_update", "session_id": "s1", "version": version, "session": {"t": text}}
    )
    lines = ["event: session_update", *([f"id: {version}"] if with_id else []), f"data: {data}"]
    return (sep.join(lines) + sep + sep).encode()


def patch_event(base: int, version: int, value: str = "x") -> bytes:
    data = json.dumps(
        {
            "type": "session_patch",
            "session_id": "s1",
            "base_version": base,
            "version": version,
            "patch": [{"op": "replace", "path": "/title", "value": value}],
        }
    )
    return f"event: session_patch\nid: {version}\ndata: {data}\n\n".encode()


def id_only_event(event_id: str, data: str) -> bytes:
    return f"id: {event_id}\ndata: {data}\n\n".encode()


def seen(events: Sequence[Event]) -> list[tuple[str, str]]:
    return [(event.type, event.id) for event in events]


@pytest.mark.parametrize("sep", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
async def test_stale_events_are_dropped_and_the_first_newer_one_passes(sep: str) -> None:
    chunks = [
        update_event(VERSION - 1, sep=sep),
        update_event(VERSION, sep=sep),
        update_event(VERSION + 1, sep=sep),
        update_event(VERSION - 2, sep=sep),  # after the first newer one: the fence is down
    ]
    app = wrap(raw_sse_app(chunks))
    async with open_response(app, "/sse/sessions/s1") as client:
        events = await client.events(3)
    assert seen(events) == [
        ("session_update", str(VERSION)),
        ("session_update", str(VERSION + 1)),
        ("session_update", str(VERSION - 2)),
    ]
    assert app.stats.fenced_frames == 2


async def test_stale_events_in_one_body_message_with_the_newer_one_are_judged_one_by_one() -> None:
    body = update_event(VERSION - 1) + HELLO + update_event(VERSION) + update_event(VERSION + 1)
    app = wrap(raw_sse_app([body]))
    async with open_response(app, "/sse/sessions/s1") as client:
        events = await client.events(3)
    assert seen(events) == [
        ("session_update", str(VERSION)),
        ("greeting", str(VERSION)),
        ("session_update", str(VERSION + 1)),
    ]


async def test_an_event_split_across_body_messages_is_judged_whole() -> None:
    stale, newer = update_event(VERSION - 1), update_event(VERSION + 1)
    chunks = [stale[:10], stale[10:-1], stale[-1:] + newer[:5], newer[5:]]
    app = wrap(raw_sse_app(chunks))
    async with open_response(app, "/sse/sessions/s1") as client:
        events = await client.events(2)
    assert seen(events) == [("session_update", str(VERSION)), ("session_update", str(VERSION + 1))]
    assert app.stats.fenced_frames == 1


async def test_events_with_their_own_ids_pass_unfenced_and_the_app_is_warned_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An app's own event numbering (sse-starlette's {"id": i, "data": token}) is not a session
    # version: fencing by it would drop the app's tokens. The ids still come back as
    # Last-Event-ID, which is read as a version: the app is told, once per stream.
    chunks = [id_only_event(str(VERSION), "old"), id_only_event(str(VERSION + 1), "new")]
    caplog.set_level(logging.WARNING, "asgi_session_sync")
    async with open_response(wrap(raw_sse_app(chunks)), "/sse/sessions/s1") as client:
        events = await client.events(3)
    assert [(event.data, event.id) for event in events[1:]] == [
        ("old", str(VERSION)),
        ("new", str(VERSION + 1)),
    ]
    warnings = [r.getMessage() for r in caplog.records if "Last-Event-ID" in r.getMessage()]
    assert len(warnings) == 1, warnings


async def test_a_patch_that_chains_from_the_snapshot_passes_and_a_stale_one_is_dropped() -> None:
    chunks = [patch_event(VERSION - 1, VERSION), patch_event(VERSION, VERSION + 1)]
    async with open_response(wrap(raw_sse_app(chunks)), "/sse/sessions/s1") as client:
        events = await client.events(2)
    assert seen(events) == [("session_update", str(VERSION)), ("session_patch", str(VERSION + 1))]


async def test_a_patch_ahead_of_the_snapshot_gets_a_fresh_snapshot_first() -> None:
    loader = VersionedLoader()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        # Version 8 was committed after the snapshot's load, and its patch lost: 8 -> 9 comes.
        loader.version = VERSION + 1
        chunk = patch_event(VERSION + 1, VERSION + 2)
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass

    app_wrapped = wrap(app, loader)
    async with open_response(app_wrapped, "/sse/sessions/s1") as client:
        first, repair, patch = await client.events(3)
    assert_snapshot_event(first, "s1", VERSION)
    assert (repair.type, repair.id) == ("session_update", str(VERSION + 1))
    assert repair.json()["reset"] is True
    assert (patch.type, patch.id) == ("session_patch", str(VERSION + 2))
    assert len(loader.calls) == 2


async def test_another_sessions_events_and_the_apps_own_events_pass_the_fence() -> None:
    other = json.dumps({"type": "session_update", "session_id": "s2", "version": 1, "session": {}})
    chunks = [f"data: {other}\n\n".encode(), b"data: not json\n\n", b": a comment\n\n"]
    chunks.append(update_event(VERSION + 1))
    async with open_response(wrap(raw_sse_app(chunks)), "/sse/sessions/s1") as client:
        events = await client.events(4)
    assert [event.data for event in events[1:3]] == [other, "not json"]
    assert "a comment" in client.parser.comments


async def test_the_fence_is_down_after_fence_max_frames_events() -> None:
    chunks = [HELLO, HELLO, update_event(VERSION - 1)]
    app = wrap(raw_sse_app(chunks), fence_max_frames=2)
    async with open_response(app, "/sse/sessions/s1") as client:
        events = await client.events(4)
    assert events[-1].id == str(VERSION - 1)


async def test_with_fence_max_frames_0_nothing_is_fenced() -> None:
    app = wrap(raw_sse_app([update_event(VERSION - 1)]), fence_max_frames=0)
    async with open_response(app, "/sse/sessions/s1") as client:
        events = await client.events(2)
    assert events[-1].id == str(VERSION - 1)


# --------------------------------------------------------------------------------------------
# Untouched: not an event stream, an error, another method, another path
# --------------------------------------------------------------------------------------------


async def text_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A plain-text response streamed in two parts."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": b"one\n\n", "more_body": True})
    await send({"type": "http.response.body", "body": b"two\n", "more_body": False})


UNTOUCHED = {
    "text/plain streamed": (text_app, "/sse/sessions/s1", {}),
    "json response": (
        PlainTextResponse('{"a":1}', media_type="application/json"),
        "/sse/sessions/s1",
        {},
    ),
    "error status event stream": (
        raw_sse_app([HELLO], status=503, end=True),
        "/sse/sessions/s1",
        {},
    ),
    "not found": (PlainTextResponse("no", status_code=404), "/sse/sessions/s1", {}),
    "post": (raw_sse_app([HELLO], end=True), "/sse/sessions/s1", {"method": "POST"}),
    "head": (raw_sse_app([], end=True), "/sse/sessions/s1", {"method": "HEAD"}),
    "another path": (raw_sse_app([HELLO], end=True), "/sse/other/s1", {}),
    "invalid session id": (raw_sse_app([HELLO], end=True), "/sse/sessions/a.b", {}),
    "content-length event stream": (
        Response(HELLO, media_type="text/event-stream"),
        "/sse/sessions/s1",
        {},
    ),
}


@pytest.mark.parametrize("case", list(UNTOUCHED))
async def test_anything_but_a_served_event_stream_passes_untouched_with_no_load(case: str) -> None:
    app, path, request_options = UNTOUCHED[case]
    bare = await whole_response(app, path, **request_options)
    loader = VersionedLoader()
    wrapped = await whole_response(wrap(app, loader), path, **request_options)
    assert loader.calls == []
    assert (wrapped.start, wrapped.chunks) == (bare.start, bare.chunks)
    assert wrapped.protocol_errors == bare.protocol_errors == []


async def test_an_event_stream_with_a_content_length_is_untouched_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loader = VersionedLoader()
    app = wrap(Response(HELLO, media_type="text/event-stream"), loader)
    with caplog.at_level(logging.WARNING, logger="asgi_session_sync"):
        client = await whole_response(app, "/sse/sessions/s1")
    assert bytes(client.body) == HELLO
    assert loader.calls == []
    assert "the event stream has a content-length session_id=s1" in caplog.text


# --------------------------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------------------------


ACCEPT_GZIP = [("accept-encoding", "gzip")]


async def test_gzip_outside_compresses_the_snapshot_with_the_stream_and_each_event_flushes() -> (
    None
):
    chunks = [HELLO, update_event(VERSION + 1)]
    app = GZipMiddleware(wrap(raw_sse_app(chunks)), minimum_size=0, exclude_content_types=())
    async with open_response(app, "/sse/sessions/s1", headers=ACCEPT_GZIP) as client:
        await client.wait_for(lambda: len(client.chunks) >= 3)
        assert client.header("content-encoding") == "gzip"
        # Each compressed body message is flushed: what came so far decompresses whole.
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        plain = b"".join(decompressor.decompress(chunk) for chunk in client.chunks)
    events = parse_events(plain)
    assert_snapshot_event(events[0], "s1")
    assert seen(events[1:]) == [("greeting", str(VERSION)), ("session_update", str(VERSION + 1))]


async def test_gzip_outside_with_its_defaults_leaves_the_event_stream_uncompressed() -> None:
    app = GZipMiddleware(wrap(raw_sse_app()), minimum_size=0)
    async with open_response(app, "/sse/sessions/s1", headers=ACCEPT_GZIP) as client:
        first, second = await client.events(2)
    assert client.header("content-encoding") is None
    assert_snapshot_event(first, "s1")
    assert second.type == "greeting"


async def test_gzip_inside_leaves_the_stream_untouched_with_no_load_and_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loader = VersionedLoader()
    inner = GZipMiddleware(raw_sse_app([HELLO], end=True), minimum_size=0, exclude_content_types=())
    with caplog.at_level(logging.WARNING, logger="asgi_session_sync"):
        client = await whole_response(wrap(inner, loader), "/sse/sessions/s1", headers=ACCEPT_GZIP)
    assert client.header("content-encoding") == "gzip"
    assert gzip.decompress(bytes(client.body)) == HELLO
    assert loader.calls == []
    assert "the event stream is compressed by the app" in caplog.text


# --------------------------------------------------------------------------------------------
# The same service: single-flight, the TTL cache, authenticate, counters; accept_sse
# --------------------------------------------------------------------------------------------


async def test_concurrent_streams_of_a_session_share_one_load_and_are_counted() -> None:
    release = anyio.Event()
    loading = anyio.Event()

    class HeldLoader(VersionedLoader):
        async def __call__(self, ctx: SessionContext) -> Any:
            loading.set()
            await release.wait()
            return await super().__call__(ctx)

    loader = HeldLoader()
    app = wrap(raw_sse_app(), loader)
    async with (
        open_response(app, "/sse/sessions/s1") as first,
        open_response(app, "/sse/sessions/s1") as second,
    ):
        with anyio.fail_after(WAIT):
            await loading.wait()
        release.set()
        for client in (first, second):
            assert_snapshot_event(await client.next_event(), "s1")
    assert len(loader.calls) == 1
    assert (app.stats.connections, app.stats.snapshots_sent, app.stats.coalesced) == (2, 2, 1)


async def test_the_ttl_cache_serves_a_later_stream() -> None:
    loader = VersionedLoader()
    app = wrap(raw_sse_app(), loader, cache_ttl=60)
    for _ in range(2):
        async with open_response(app, "/sse/sessions/s1") as client:
            assert_snapshot_event(await client.next_event(), "s1")
    assert (len(loader.calls), app.stats.cache_hits) == (1, 1)


async def test_authenticate_names_the_user_the_loader_sees() -> None:
    async def authenticate(scope: Scope) -> str | None:
        return dict(scope["headers"]).get(b"authorization", b"").decode() or None

    loader = VersionedLoader()
    app = wrap(raw_sse_app(), loader, authenticate=authenticate)
    async with open_response(app, "/sse/sessions/s1", headers=[("authorization", "bob")]) as c:
        assert_snapshot_event(await c.next_event(), "s1")
    assert [ctx.user for ctx in loader.calls] == ["bob"]


async def test_accept_sse_refuses_an_invalid_session_id_before_sending_anything() -> None:
    sync = SessionSync(VersionedLoader())
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    with pytest.raises(ValueError, match="invalid session id"):
        await sync.accept_sse(http_scope("/sse/a.b"), send, "a.b")
    assert sent == []


class MemoryBroker:
    """The hub's backend in memory: one subscriber per session, publishing delivers at once."""

    def __init__(self) -> None:
        self.subscribers: dict[str, Callable[[bytes], None]] = {}

    async def subscribe_subject(
        self, session_id: str, deliver: Callable[[bytes], None]
    ) -> Callable[[], Awaitable[None]]:
        self.subscribers[session_id] = deliver

        async def unsubscribe() -> None:
            del self.subscribers[session_id]

        return unsubscribe

    async def catch_up(self, session_id: str, version: int) -> bytes | None:
        return None


def memory_hub() -> tuple[Hub, MemoryBroker]:
    broker = MemoryBroker()
    hub = Hub(
        broker,
        stats=BridgeStats(),
        max_socket_bytes=1 << 20,
        max_process_bytes=1 << 24,
        max_concurrent_resyncs=4,
    )
    return hub, broker


def bridged_app(sync: SessionSync, hub: Hub, **forward: Any) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        session_id = scope["path"].rsplit("/", 1)[-1]
        async with hub.subscribe(session_id) as updates:
            stream = await sync.accept_sse(scope, send, session_id)
            await updates.forward(stream, receive, **forward)

    return app


async def test_a_bridged_stream_sends_each_update_with_its_version_as_id() -> None:
    hub, broker = memory_hub()
    sync = SessionSync(VersionedLoader())
    async with open_response(bridged_app(sync, hub), "/sse/bridged/s1") as client:
        assert_snapshot_event(await client.next_event(), "s1")
        assert client.header("content-type") == "text/event-stream; charset=utf-8"
        assert client.header("cache-control") == "no-cache"
        assert client.header("x-accel-buffering") == "no"
        # A multi-line JSON text is one event of several data: lines.
        text = json.dumps(
            {"type": "session_update", "session_id": "s1", "version": 8, "session": {"a": 1}},
            indent=1,
        )
        broker.subscribers["s1"](text.encode())
        event = await client.next_event()
    assert (event.type, event.id, event.json()["version"]) == ("session_update", "8", 8)
    assert bytes(client.body).count(b"\ndata: ") > 2
    assert hub.sessions == 0


async def test_a_bridged_stream_that_ends_on_the_server_ends_the_response() -> None:
    hub, _ = memory_hub()
    sync = SessionSync(VersionedLoader())
    async with open_response(bridged_app(sync, hub), "/sse/bridged/s1") as client:
        assert_snapshot_event(await client.next_event(), "s1")
        hub.end_all()  # what the bridge does when it closes
        await client.wait_app_done()
    assert client.complete, "the response was not ended: EventSource would not reconnect"
    assert client.app_error is None


async def test_a_resumed_bridged_stream_opens_with_a_comment() -> None:
    hub, _ = memory_hub()
    sync = SessionSync(VersionedLoader())
    headers = [("last-event-id", str(VERSION))]
    async with open_response(bridged_app(sync, hub), "/sse/bridged/s1", headers=headers) as c:
        await c.wait_for(lambda: bool(c.parser.comments))
    assert c.parser.comments == ["open"]
    assert b"session_" not in c.body


async def test_a_quiet_bridged_stream_gets_comment_heartbeats() -> None:
    hub, _ = memory_hub()
    sync = SessionSync(VersionedLoader())
    app = bridged_app(sync, hub, heartbeat=0.05)
    async with open_response(app, "/sse/bridged/s1") as client:
        await client.next_event()
        await client.wait_for(lambda: len(client.parser.comments) >= 2)
    assert set(client.parser.comments) == {"heartbeat"}
    assert hub.stats.heartbeats >= 2


# --------------------------------------------------------------------------------------------
# 5. Bad input
# --------------------------------------------------------------------------------------------


HOSTILE_IDS = {
    "huge": "9" * 100_000,
    "control characters": "7\x00\x1b[2J\x7f",
    "not a version": "msg-12",
    "negative": "-7",
    "past 2**53": str(2**53),
    "spaces": " 7 ",
    "empty": "",
}


@pytest.mark.parametrize("value", list(HOSTILE_IDS))
async def test_a_hostile_last_event_id_is_ignored_with_a_debug_line_and_a_full_snapshot(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    loader = VersionedLoader()
    headers = [("last-event-id", HOSTILE_IDS[value])]
    with caplog.at_level(logging.DEBUG, logger="asgi_session_sync"):
        async with open_response(
            wrap(raw_sse_app(), loader), "/sse/sessions/s1", headers=headers
        ) as c:
            assert_snapshot_event(await c.next_event(), "s1")
    assert loader.calls[0].since is None
    lines = [r for r in caplog.records if "ignored Last-Event-ID" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.DEBUG]
    assert len(lines[0].getMessage()) < 300, "the value is clipped in the log"


async def test_a_client_that_leaves_during_the_load_ends_the_app_with_no_snapshot() -> None:
    release = anyio.Event()
    loads_started = anyio.Event()

    class SlowLoader(VersionedLoader):
        async def __call__(self, ctx: SessionContext) -> Any:
            loads_started.set()
            await release.wait()
            return await super().__call__(ctx)

    loader = SlowLoader()
    app = fastapi_app(loader)
    async with open_response(app, "/sse/sessions/s1") as client:
        with anyio.fail_after(WAIT):
            await loads_started.wait()
        client.disconnect()
        await client.wait_app_done()
    assert client.start is None
    assert client.app_error is None, client.app_error
    assert client.protocol_errors == []


async def test_an_app_that_sends_a_body_before_its_start_is_logged_and_fails_as_without_us(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.body", "body": HELLO, "more_body": True})

    loader = VersionedLoader()
    bare = await whole_response(broken, "/sse/sessions/s1")
    with caplog.at_level(logging.WARNING, logger="asgi_session_sync"):
        wrapped = await whole_response(wrap(broken, loader), "/sse/sessions/s1")
    assert loader.calls == []
    assert wrapped.protocol_errors == bare.protocol_errors != []
    assert type(wrapped.app_error) is type(bare.app_error) is RuntimeError
    assert "before http.response.start" in caplog.text


async def test_a_text_plain_body_on_a_served_path_passes_untouched_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loader = VersionedLoader()
    with caplog.at_level(logging.DEBUG, logger="asgi_session_sync"):
        client = await whole_response(wrap(text_app, loader), "/sse/sessions/s1")
    assert bytes(client.body) == b"one\n\ntwo\n"
    assert loader.calls == []
    # Issue 22, point 5: a non-SSE body on an SSE path gets a defined outcome and a log line.
    logged = [record.getMessage() for record in caplog.records]
    assert any("session_id=s1" in line for line in logged), logged


async def test_an_event_stream_whose_body_is_not_events_reaches_the_client_after_the_window() -> (
    None
):
    # text/event-stream, but no blank line ever ends an event (NDJSON, plain lines): the fence
    # has nothing to judge, and fence_max_seconds bounds how long it may hold the bytes.
    async def ndjson(scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": 200}
        await send({**start, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b'{"token": "a"}\n', "more_body": True})
        await anyio.sleep(0.3)  # a deliberate timing: the next line comes after the window
        await send({"type": "http.response.body", "body": b'{"token": "b"}\n', "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass

    async with open_response(wrap(ndjson, fence_max_seconds=0.1), "/sse/sessions/s1") as client:
        assert_snapshot_event(await client.next_event(), "s1")
        with anyio.move_on_after(1.0):
            await client.wait_for(lambda: client.body.endswith(b'{"token": "b"}\n'))
    assert client.body.endswith(b'{"token": "a"}\n{"token": "b"}\n'), bytes(client.body)


async def test_a_ping_sent_while_the_start_is_held_follows_the_start_and_the_snapshot() -> None:
    # sse-starlette pings from a task of its own, every `ping` seconds from the response's
    # start: with a ping shorter than the load, one is sent while the middleware holds the start.
    loading, release = anyio.Event(), anyio.Event()

    class SlowLoader(VersionedLoader):
        async def __call__(self, ctx: SessionContext) -> Any:
            loading.set()
            await release.wait()
            return await super().__call__(ctx)

    async def events(request: Request) -> EventSourceResponse:
        return EventSourceResponse(greeting_events(), ping=0.01)

    app = Starlette(
        routes=[Route("/sse/sessions/{session_id}", events)],
        middleware=[Middleware(SessionSyncMiddleware, loader=SlowLoader(), paths=PATHS)],
    )
    async with open_response(app, "/sse/sessions/s1") as client:
        with anyio.fail_after(WAIT):
            await loading.wait()
        with anyio.move_on_after(0.2):  # twenty ping periods while the start is held
            await client.wait_for(lambda: bool(client.chunks or client.protocol_errors))
        assert client.protocol_errors == [], "a ping went to the server before the start"
        release.set()
        snapshot, greeting = await client.events(2)
        await client.wait_for(lambda: bool(client.parser.comments))  # the pings, after them
    assert client.app_error is None, client.app_error
    assert_snapshot_event(snapshot, "s1")
    assert greeting.type == "greeting"


async def test_a_bridged_stream_of_a_refused_session_is_answered_404_with_no_stream() -> None:
    # A stream's status cannot change once started: the load comes first, and a session that
    # is not this user's (the loader's None) gets a status, not an empty 200 stream.
    async def not_yours(ctx: SessionContext) -> None:
        return None

    hub, _ = memory_hub()
    client = await whole_response(bridged_app(SessionSync(not_yours), hub), "/sse/bridged/s1")
    assert client.status == 404
    assert client.header("content-type") == "text/plain; charset=utf-8"
    assert client.complete
    assert b"event:" not in client.body
    assert hub.sessions == 0
