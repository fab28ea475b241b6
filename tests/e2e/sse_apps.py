"""The app the real-server SSE tests serve: each server imports ``tests.e2e.sse_apps:app``.

Event streams, every one behind :class:`SessionSyncMiddleware` unless said otherwise:

- ``GET /sse/sessions/{session_id}``: sse-starlette's ``EventSourceResponse`` in a Starlette
  app: a ``greeting`` event, then quiet (sse-starlette reads ``receive`` for the disconnect).
  The same greeting from sse-starlette in FastAPI on ``/sse/fastapi/{session_id}``, Litestar's
  ``ServerSentEvent`` on ``/sse/litestar/{session_id}`` and Quart's streaming response on
  ``/sse/quart/{session_id}``.
- ``GET /sse/raw/{session_id}``: a raw ASGI app. ``?mode=events`` (the default) streams a
  greeting, then one ``session_update`` event per ``?versions=`` (comma-separated), each in a
  body message of its own, then waits for the client to leave (``?mode=quiet``: sends nothing
  after its start, and waits). ``?mode=text`` streams a
  ``text/plain`` body and ends it; ``?mode=body-first`` sends a body before its start.
- ``GET /sse/bare/{session_id}``: the same raw app without the middleware, to compare with.
- ``GET /sse/bridged/{session_id}``: the documented bridged stream,
  ``SessionSync.accept_sse`` then ``bridge.subscribe(...).forward(...)``, with
  ``?heartbeat=`` seconds (none by default). Needs ``NATS_URL`` in the environment; the bridge
  is opened by the lifespan.
- ``POST /sessions/{session_id}/append?text=...``: commits ``text`` to the session's ``/text``
  and publishes the ``append`` patch through the bridge (``&publish=0`` commits only: a patch
  lost on the way); answers the new version.
- ``GET /stats``: loads per session, how each stream's handler ended, the streams open, the
  bridge's sessions and counters (``?idle=true`` waits, 5 s at most, until no stream is open).

Every load counts, and waits ``?load_ms=`` milliseconds first, so a test can make it slow.
"""

from __future__ import annotations

import os
from collections import Counter
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import parse_qs

import anyio
from fastapi import FastAPI
from litestar import Litestar, get
from litestar.response import ServerSentEvent
from quart import Quart, make_response
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_session_sync import SessionContext, SessionSync, SessionSyncMiddleware, Snapshot
from asgi_session_sync._types import ASGIApp, Receive, Scope, Send
from asgi_session_sync.protocol import utf16_length

OWNER = "alice"
TITLE = "demo"
LOAD_TIMEOUT = 5.0
NATS_URL = os.environ.get("NATS_URL")
GREETING = b"event: greeting\r\ndata: hello\r\n\r\n"

loads: Counter[str] = Counter()
"""Loader calls per session id since the process started."""

outcomes: dict[str, str] = {}
"""How each event stream's handler ended, by session id: ``returned`` or the exception's type."""

database: dict[str, tuple[int, str]] = {}
"""Each session's committed version and ``/text``; a session starts at version 1, ``""``."""


def query(scope: Scope, name: str, default: str = "") -> str:
    values = parse_qs(scope["query_string"].decode("latin-1")).get(name)
    return values[0] if values else default


def committed(session_id: str) -> tuple[int, str]:
    return database.get(session_id, (1, ""))


async def load_session(ctx: SessionContext) -> Snapshot:
    """Counts the call, waits ``?load_ms=`` milliseconds, returns the committed state."""
    loads[ctx.session_id] += 1
    await anyio.sleep(int(query(ctx.scope, "load_ms", "0")) / 1000)
    version, text = committed(ctx.session_id)
    return Snapshot({"title": TITLE, "text": text}, owner=OWNER, version=version)


sync = SessionSync(load_session, timeout=LOAD_TIMEOUT)


# sse-starlette


async def greetings() -> Any:
    yield {"event": "greeting", "data": "hello"}
    await anyio.sleep_forever()


async def sse_starlette_stream(request: Request) -> EventSourceResponse:
    return EventSourceResponse(greetings())


fastapi = FastAPI()


@fastapi.get("/sse/fastapi/{session_id}")
async def fastapi_stream(session_id: str) -> EventSourceResponse:
    return EventSourceResponse(greetings())


# No session_id argument: declaring one without FromPath is deprecated in Litestar 2.25.
@get("/sse/litestar/{session_id:str}")
async def litestar_stream() -> ServerSentEvent:
    return ServerSentEvent(greetings())


litestar = Litestar(route_handlers=[litestar_stream], logging_config=None)
quart = Quart(__name__)


@quart.get("/sse/quart/<session_id>")
async def quart_stream(session_id: str) -> Any:
    async def body() -> Any:
        yield GREETING
        await anyio.sleep_forever()

    response = await make_response(body(), 200, {"Content-Type": "text/event-stream"})
    response.timeout = None  # type: ignore[union-attr]  # an event stream never ends
    return response


FRAMEWORKS: dict[str, Any] = {
    "/sse/fastapi/": fastapi,
    "/sse/litestar/": litestar,
    "/sse/quart/": quart,
}


# Raw ASGI


def update_event(session_id: str, version: int) -> bytes:
    data = (
        f'{{"type":"session_update","session_id":"{session_id}","version":{version},'
        f'"session":{{"title":"from the app"}}}}'
    )
    return f"event: session_update\nid: {version}\ndata: {data}\n\n".encode()


async def raw_stream(scope: Scope, receive: Receive, send: Send) -> None:
    """The raw app of ``/sse/raw/`` and ``/sse/bare/`` (see the module's docstring)."""
    session_id = scope["path"].rsplit("/", 1)[-1]
    mode = query(scope, "mode", "events")
    if mode == "body-first":
        await send({"type": "http.response.body", "body": GREETING, "more_body": True})
        return
    if mode == "text":
        start = {"type": "http.response.start", "status": 200}
        await send({**start, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"one\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"two\n", "more_body": False})
        return
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    if mode != "quiet":
        await send({"type": "http.response.body", "body": GREETING, "more_body": True})
    for version in filter(None, query(scope, "versions").split(",")):
        chunk = update_event(session_id, int(version))
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    while (await receive())["type"] != "http.disconnect":
        pass


# Bridged


class Bridge:
    """The process's NatsBridge, opened by the lifespan when ``NATS_URL`` is set."""

    bridge: Any = None


async def bridged_stream(scope: Scope, receive: Receive, send: Send) -> None:
    """The documented bridged event stream: subscribe, then ``accept_sse``, then forward."""
    session_id = scope["path"].rsplit("/", 1)[-1]
    heartbeat = float(query(scope, "heartbeat", "0")) or None
    async with Bridge.bridge.subscribe(session_id) as updates:
        stream = await sync.accept_sse(scope, send, session_id, user=OWNER)
        await updates.forward(stream, receive, heartbeat=heartbeat)


async def append(request: Request) -> JSONResponse:
    session_id = request.path_params["session_id"]
    text = request.query_params["text"]
    version, before = committed(session_id)
    database[session_id] = (version + 1, before + text)
    if request.query_params.get("publish", "1") == "1":
        operation = {"op": "append", "path": "/text", "offset": utf16_length(before), "value": text}
        await Bridge.bridge.publish_patch(
            session_id, [operation], base_version=version, version=version + 1, owner=OWNER
        )
    return JSONResponse({"version": version + 1})


async def stats(request: Request) -> JSONResponse:
    if request.query_params.get("idle") == "true":
        with anyio.move_on_after(5):
            await streams.wait_idle()
    bridge = Bridge.bridge
    return JSONResponse(
        {
            "loads": loads,
            "outcomes": outcomes,
            "open": streams.open,
            "hub_sessions": None if bridge is None else bridge.hub.sessions,
            "bridge": None if bridge is None else bridge.stats.as_dict(),
        }
    )


api = Starlette(
    routes=[
        Route("/sse/sessions/{session_id}", sse_starlette_stream),
        Route("/sessions/{session_id}/append", append, methods=["POST"]),
        Route("/stats", stats),
    ]
)


async def route(scope: Scope, receive: Receive, send: Send) -> None:
    path = scope.get("path", "")
    if path.startswith(("/sse/raw/", "/sse/bare/")):
        await raw_stream(scope, receive, send)
    elif path.startswith("/sse/bridged/"):
        await bridged_stream(scope, receive, send)
    elif path.startswith(tuple(FRAMEWORKS)):
        await FRAMEWORKS[path[: path.index("/", 5) + 1]](scope, receive, send)
    else:
        await api(scope, receive, send)


class OpenStreams:
    """Counts the requests on ``/sse/`` inside ``app`` and records how each ended."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.open = 0
        self._idle: anyio.Event | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/sse/"):
            await self.app(scope, receive, send)
            return
        session_id = scope["path"].rsplit("/", 1)[-1]
        self.open += 1
        try:
            await self.app(scope, receive, send)
        except BaseException as exc:  # recorded and re-raised, cancellation included
            outcomes[session_id] = f"{type(exc).__module__}.{type(exc).__name__}"
            raise
        else:
            outcomes[session_id] = "returned"
        finally:
            self.open -= 1
            if self.open == 0 and self._idle is not None:
                self._idle.set()
                self._idle = None

    async def wait_idle(self) -> None:
        while self.open:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()


streams = OpenStreams(
    SessionSyncMiddleware(
        route,
        sync=sync,
        paths=[
            f"/sse/{name}/{{session_id}}"
            for name in ("sessions", "raw", "fastapi", "litestar", "quart")
        ],
    )
)


async def lifespan(receive: Receive, send: Send) -> None:
    """Open the bridge (when ``NATS_URL`` is set) for as long as the server runs."""
    assert (await receive())["type"] == "lifespan.startup"
    async with AsyncExitStack() as stack:
        if NATS_URL:
            from asgi_session_sync.nats import NatsBridge

            try:
                Bridge.bridge = await stack.enter_async_context(NatsBridge(NATS_URL))
            except Exception as exc:
                await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                return
        await send({"type": "lifespan.startup.complete"})
        assert (await receive())["type"] == "lifespan.shutdown"
    Bridge.bridge = None
    await send({"type": "lifespan.shutdown.complete"})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
    else:
        await streams(scope, receive, send)
