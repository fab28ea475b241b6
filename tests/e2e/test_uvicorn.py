"""SessionSyncMiddleware behind a real uvicorn, driven by a real ``websockets`` client."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import pytest
from websockets.asyncio.client import ClientConnection

from asgi_session_sync import SessionContext, SessionSyncMiddleware, Snapshot
from asgi_session_sync._types import ASGIApp, Receive, Scope, Send

from .conftest import WAIT, LiveServer
from .websocket_client import client, receive_text

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.anyio,
    # The websockets client runs on asyncio only; uvicorn runs its own loop in its own thread.
    pytest.mark.parametrize("anyio_backend", ["asyncio"]),
]

Serve = Callable[[ASGIApp], str]
PATHS = ["/ws/sessions/{session_id}"]
SESSION = {"title": "demo"}
SLOW_SESSION_ID = "slow"


async def greeting_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Accepts (with "v2" when the client offers it), greets at once, then echoes."""
    assert (await receive())["type"] == "websocket.connect"
    subprotocol = "v2" if "v2" in scope["subprotocols"] else None
    await send({"type": "websocket.accept", "subprotocol": subprotocol})
    await send({"type": "websocket.send", "text": "hello"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        await send({"type": "websocket.send", "text": "echo:" + message["text"]})


class Loader:
    """Loads any session at once, except ``slow``, which waits until cancelled.

    Runs on the server's thread, so it reports to the test through threading events.
    """

    def __init__(self) -> None:
        self.session_ids: list[str] = []
        self.slow_started = threading.Event()
        self.slow_cancelled = threading.Event()

    async def __call__(self, ctx: SessionContext) -> Snapshot:
        self.session_ids.append(ctx.session_id)
        if ctx.session_id == SLOW_SESSION_ID:
            self.slow_started.set()
            try:
                await anyio.sleep_forever()
            finally:
                # Only a cancellation ends sleep_forever; the timeout is far beyond the test's.
                self.slow_cancelled.set()
        return Snapshot(SESSION, owner="alice", version=3)


def wrap(loader: Loader) -> SessionSyncMiddleware:
    # A timeout far longer than any wait here: only a disconnect can cancel the slow loader.
    return SessionSyncMiddleware(greeting_app, loader=loader, paths=PATHS, timeout=60)


async def wait_for(event: threading.Event) -> None:
    """Wait for an event set on the server's thread, without blocking this event loop."""
    assert await anyio.to_thread.run_sync(event.wait, WAIT), f"not set within {WAIT}s"


async def assert_greets_and_echoes(ws: ClientConnection) -> None:
    assert await receive_text(ws) == "hello"
    await ws.send("ping")
    assert await receive_text(ws) == "echo:ping"


def snapshot_frame(session_id: str) -> dict[str, Any]:
    return {
        "type": "session_update",
        "session_id": session_id,
        "owner": "alice",
        "session": SESSION,
        "version": 3,
    }


async def test_snapshot_is_first_frame_then_app_frames(serve: Serve) -> None:
    loader = Loader()
    url = serve(wrap(loader))
    async with client(f"{url}/ws/sessions/s1") as ws:
        assert json.loads(await receive_text(ws)) == snapshot_frame("s1")
        await assert_greets_and_echoes(ws)
    assert loader.session_ids == ["s1"]


async def test_client_leaving_during_slow_load_cancels_loader(serve: Serve) -> None:
    loader = Loader()
    url = serve(wrap(loader))
    async with client(f"{url}/ws/sessions/{SLOW_SESSION_ID}"):
        await wait_for(loader.slow_started)
    # The client has closed; the middleware reads the disconnect while the app is still
    # blocked in send(accept), and cancels the load without waiting for its timeout.
    await wait_for(loader.slow_cancelled)
    async with client(f"{url}/ws/sessions/s2") as ws:
        assert json.loads(await receive_text(ws)) == snapshot_frame("s2")
        await assert_greets_and_echoes(ws)
    assert loader.session_ids == [SLOW_SESSION_ID, "s2"]


async def test_app_subprotocol_choice_reaches_client(serve: Serve) -> None:
    url = serve(wrap(Loader()))
    async with client(f"{url}/ws/sessions/s1", subprotocols=["v1", "v2"]) as ws:
        assert ws.subprotocol == "v2"
        assert json.loads(await receive_text(ws)) == snapshot_frame("s1")
        await assert_greets_and_echoes(ws)


@pytest.mark.parametrize(
    "session_id",
    ["a.b", "a%2Eb", "%3E", "a%20b", "a%00b", "x" * 300, "x" * 10_000],
    ids=["dot", "escaped-dot", "wildcard", "space", "nul", "300-chars", "10kB"],
)
async def test_hostile_session_id_gets_no_snapshot_but_app_works(
    serve: Serve, live_server: LiveServer, session_id: str
) -> None:
    if len(session_id) > 8000 and live_server.ws == "websockets-sansio":
        pytest.skip(
            "uvicorn's websockets-sansio implementation never answers a request line over "
            "8 kB (websockets.http11.MAX_LINE_LENGTH): the connection never reaches the app"
        )
    loader = Loader()
    url = serve(wrap(loader))
    async with client(f"{url}/ws/sessions/{session_id}") as ws:
        await assert_greets_and_echoes(ws)
    assert loader.session_ids == []
