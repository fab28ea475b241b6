"""The apps the real-server matrix serves: each server imports ``tests.e2e.server_apps:<name>``.

``app`` (served by every server in ``test_servers.py``) is :class:`SessionSyncMiddleware` around:

- ``/ws/sessions/{session_id}``: a plain ASGI echo app. It accepts with the subprotocol ``v2``
  when offered and the header ``x-served-by: echo``, sends ``hello``, then answers every text
  message ``m`` with ``echo:m``. ``?do=close`` makes it close before accepting; ``?do=deny``
  makes it send a denial response (401) where the server offers the extension, else close.
  ``?accept_delay_ms=`` makes it wait before accepting. How it ended is kept in
  :data:`outcomes`.
- ``/ws/bare/{session_id}``: the same echo app without the middleware, to compare with.
- ``/ws/rooms/{room}`` and ``POST /rooms/{room}/broadcast?text=...``: FastAPI with the
  ``ConnectionManager`` of FastAPI's WebSockets docs, which registers a socket for broadcasts
  right after ``accept()``. The broadcast answers ``{"recipients": n}``.
- ``GET /stats``: what the process holds (see :func:`stats`), as JSON.

``quart_app`` is the middleware around a Quart echo app on ``/ws/sessions/<session_id>``:
Quart reads ``receive()`` in a task of its own, from before the app accepts.

Every load counts in :data:`loads`, and waits ``?load_ms=`` milliseconds first (0 by default),
so a test can make the load slow and ask the process afterwards whether it ever ran.
"""

from __future__ import annotations

import gc
import os
from collections import Counter, defaultdict
from typing import Any
from urllib.parse import parse_qs

import anyio
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from quart import Quart, websocket

from asgi_session_sync import SessionContext, SessionSyncMiddleware, Snapshot
from asgi_session_sync._types import ASGIApp, Receive, Scope, Send

SESSION = {"title": "demo"}
OWNER = "alice"
VERSION = 3
LOAD_TIMEOUT = 5.0
"""The middleware's ``timeout`` in seconds: a server's handshake timeout must allow it."""

SUBPROTOCOL = "v2"
ACCEPT_HEADER = ("x-served-by", "echo")
DENIAL_STATUS = 401
DENIAL_HEADER = ("x-denied-by", "echo")
DENIAL_BODY = b"no entry"
DENIAL_EXTENSION = "websocket.http.response"

loads: Counter[str] = Counter()
"""Loader calls per session id since the process started."""

outcomes: dict[str, str] = {}
"""How the echo app ended, by session id: ``websocket.disconnect`` or the exception's type."""

extensions: dict[str, list[str]] = {}
"""The scope's ``extensions`` keys of each ``?do=deny`` connection, by session id."""


def query(scope: Scope, name: str) -> str | None:
    values = parse_qs(scope["query_string"].decode("latin-1")).get(name)
    return values[0] if values else None


async def load_session(ctx: SessionContext) -> Snapshot:
    """Counts the call, waits ``?load_ms=`` milliseconds, returns the same state for any id."""
    loads[ctx.session_id] += 1
    await anyio.sleep(int(query(ctx.scope, "load_ms") or 0) / 1000)
    return Snapshot(SESSION, owner=OWNER, version=VERSION)


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    """The plain ASGI app on ``/ws/sessions/`` and ``/ws/bare/`` (see the module docstring)."""
    assert (await receive())["type"] == "websocket.connect"
    session_id = scope["path"].rsplit("/", 1)[-1]
    do = query(scope, "do")
    if do == "close":
        await send({"type": "websocket.close", "code": 1008})
        return
    if do == "deny":
        extensions[session_id] = sorted(scope.get("extensions") or {})
        await deny(scope, send)
        return
    try:
        await anyio.sleep(int(query(scope, "accept_delay_ms") or 0) / 1000)
        await accept_and_echo(scope, receive, send)
    except BaseException as exc:  # recorded and re-raised, cancellation included
        outcomes[session_id] = f"{type(exc).__module__}.{type(exc).__name__}"
        raise
    outcomes[session_id] = "websocket.disconnect"


async def deny(scope: Scope, send: Send) -> None:
    """Refuse the handshake with a denial response, or a close where the server has none."""
    if DENIAL_EXTENSION not in (scope.get("extensions") or {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    await send(
        {
            "type": "websocket.http.response.start",
            "status": DENIAL_STATUS,
            "headers": [
                (DENIAL_HEADER[0].encode(), DENIAL_HEADER[1].encode()),
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(DENIAL_BODY)).encode()),
            ],
        }
    )
    await send({"type": "websocket.http.response.body", "body": DENIAL_BODY})


async def accept_and_echo(scope: Scope, receive: Receive, send: Send) -> None:
    await send(
        {
            "type": "websocket.accept",
            "subprotocol": SUBPROTOCOL if SUBPROTOCOL in scope["subprotocols"] else None,
            "headers": [(ACCEPT_HEADER[0].encode(), ACCEPT_HEADER[1].encode())],
        }
    )
    await send({"type": "websocket.send", "text": "hello"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        await send({"type": "websocket.send", "text": "echo:" + (message.get("text") or "")})


class ConnectionManager:
    """FastAPI's docs' broadcast manager: a socket joins its room right after ``accept()``."""

    def __init__(self) -> None:
        self.rooms: defaultdict[str, list[WebSocket]] = defaultdict(list)

    async def connect(self, room: str, websocket: WebSocket) -> None:
        await websocket.accept()
        self.rooms[room].append(websocket)

    def disconnect(self, room: str, websocket: WebSocket) -> None:
        self.rooms[room].remove(websocket)
        if not self.rooms[room]:
            del self.rooms[room]

    async def broadcast(self, room: str, text: str) -> int:
        sockets = list(self.rooms.get(room, ()))
        for socket in sockets:
            await socket.send_text(text)
        return len(sockets)


manager = ConnectionManager()
api = FastAPI()


@api.websocket("/ws/rooms/{room}")
async def room_socket(websocket: WebSocket, room: str) -> None:
    await manager.connect(room, websocket)
    try:
        while True:
            await websocket.receive_text()
    except WebSocketDisconnect:
        manager.disconnect(room, websocket)


@api.post("/rooms/{room}/broadcast")
async def broadcast(room: str, text: str) -> dict[str, int]:
    return {"recipients": await manager.broadcast(room, text)}


@api.get("/stats")
async def stats(idle: bool = False) -> dict[str, Any]:
    """What the process holds now; with ``?idle=true``, once no WebSocket is open (5 s at most).

    ``objects`` counts the live instances of the library's classes after a full collection
    (per-connection objects that outlive their connection show up here), ``scopes`` the live
    WebSocket scopes (a connection kept alive by anything), ``tasks`` the running
    tasks of the event loop, ``rss_kib`` the resident set size in KiB (Linux only, else
    ``None``).
    """
    if idle:
        with anyio.move_on_after(5):
            await app.wait_idle()
    gc.collect()
    live = gc.get_objects()
    return {
        "loads": loads,
        "extensions": extensions,
        "outcomes": outcomes,
        "open_websockets": app.open,
        "objects": sum(map(is_library_object, live)),
        "scopes": sum(map(is_websocket_scope, live)),
        "tasks": len(anyio.get_running_tasks()),
        "rss_kib": resident_kib(),
    }


def resident_kib() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except OSError:
        return None


def is_library_object(obj: object) -> bool:
    # Not every type's __module__ is a string: some of Twisted's (under daphne) are properties.
    module = type(obj).__module__
    return isinstance(module, str) and module.startswith("asgi_session_sync")


def is_websocket_scope(obj: object) -> bool:
    return isinstance(obj, dict) and obj.get("type") == "websocket" and "subprotocols" in obj


async def route(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "websocket" and scope["path"].startswith(("/ws/sessions/", "/ws/bare/")):
        await echo(scope, receive, send)
    else:
        await api(scope, receive, send)


class OpenWebSockets:
    """Counts the WebSocket connections inside ``app``, so ``/stats`` can wait until none is."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.open = 0
        self._idle: anyio.Event | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        self.open += 1
        try:
            await self.app(scope, receive, send)
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


app = OpenWebSockets(
    SessionSyncMiddleware(
        route,
        loader=load_session,
        paths=["/ws/sessions/{session_id}", "/ws/rooms/{session_id}"],
        timeout=LOAD_TIMEOUT,
    )
)

quart = Quart(__name__)


@quart.websocket("/ws/sessions/<session_id>")
async def quart_echo(session_id: str) -> None:
    await websocket.accept()
    while True:
        await websocket.send("echo:" + str(await websocket.receive()))


quart_app = SessionSyncMiddleware(
    quart, loader=load_session, paths=["/ws/sessions/{session_id}"], timeout=LOAD_TIMEOUT
)
