"""SessionSyncMiddleware behind a real uvicorn, driven by a real ``websockets`` client."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import pytest
from conftest import greeting_app
from websockets.asyncio.client import ClientConnection

from asgi_session_sync import SessionContext, SessionSyncMiddleware, Snapshot
from asgi_session_sync._types import ASGIApp, Receive, Scope, Send

from .conftest import WAIT, LiveServer, uvicorn_in_thread
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


class Loader:
    """Loads any session at once, except ``slow``, which waits until its timeout cancels it.

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
                self.slow_cancelled.set()
        return Snapshot(SESSION, owner="alice", version=3)


def wrap(loader: Loader) -> SessionSyncMiddleware:
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


async def test_client_leaving_during_slow_load_is_told_to_the_app_after_it(serve: Serve) -> None:
    loader = Loader()
    app_returned = threading.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await greeting_app(scope, receive, send)
        finally:
            app_returned.set()

    middleware = SessionSyncMiddleware(app, loader=loader, paths=PATHS, timeout=1)
    url = serve(middleware)
    host, port = url.removeprefix("ws://").split(":")
    # A bare handshake request, so the client can leave while the accept is held.
    async with await anyio.connect_tcp(host, int(port)) as stream:
        await stream.send(
            f"GET /ws/sessions/{SLOW_SESSION_ID} HTTP/1.1\r\nHost: {host}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
        )
        await wait_for(loader.slow_started)
    # The middleware never reads receive(), so the load runs to its timeout (1 s here), then
    # the server tells the app that the client left, as it would without the middleware.
    await wait_for(loader.slow_cancelled)
    await wait_for(app_returned)
    assert middleware.stats.timeouts == 1
    async with client(f"{url}/ws/sessions/s2") as ws:
        assert json.loads(await receive_text(ws)) == snapshot_frame("s2")
        await assert_greets_and_echoes(ws)
    assert loader.session_ids == [SLOW_SESSION_ID, "s2"]


async def test_a_load_with_no_free_slot_gives_up_at_queue_timeout_and_the_app_goes_on(
    serve: Serve,
) -> None:
    # The slow session's load holds the only slot; another session's load waits for it for
    # queue_timeout, not for the slow call's timeout, and its client is accepted without a
    # snapshot, under a real server's handshake.
    loader = Loader()
    middleware = SessionSyncMiddleware(
        greeting_app,
        loader=loader,
        paths=PATHS,
        max_concurrent_loads=1,
        queue_timeout=0.3,
        timeout=WAIT / 2,
    )
    url = serve(middleware)

    async def slow_client() -> None:
        async with client(f"{url}/ws/sessions/{SLOW_SESSION_ID}") as ws:
            await assert_greets_and_echoes(ws)  # accepted once its call timed out

    async with anyio.create_task_group() as tg:
        tg.start_soon(slow_client)
        await wait_for(loader.slow_started)
        async with client(f"{url}/ws/sessions/s2") as ws:
            await assert_greets_and_echoes(ws)
            assert not loader.slow_cancelled.is_set(), "s2 waited for the slow call to end"
            assert middleware.stats.timeouts == 1  # s2's wait for a slot
    assert loader.session_ids == [SLOW_SESSION_ID]  # s2 never reached the loader
    assert middleware.stats.timeouts == 2


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


async def test_paths_match_under_uvicorn_root_path(live_server: LiveServer) -> None:
    # FastAPI's documented way to run behind a proxy that strips a prefix: uvicorn --root-path.
    # The proxy sends /ws/sessions/s1; uvicorn gives the app path="/api/ws/sessions/s1".
    loader = Loader()
    app = wrap(loader)
    with uvicorn_in_thread(app, ws=live_server.ws, root_path="/api") as url:
        async with client(f"{url}/ws/sessions/s1") as ws:
            assert json.loads(await receive_text(ws)) == snapshot_frame("s1")
            await assert_greets_and_echoes(ws)
    assert loader.session_ids == ["s1"]
