"""A NATS broker restart under a real uvicorn: the connected client gets the current state."""

from __future__ import annotations

import asyncio
import json
import threading
from contextlib import AsyncExitStack
from typing import Any

import anyio
import anyio.to_thread
import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import ClientConnection, connect

from asgi_session_sync import SessionContext, SessionSyncMiddleware, Snapshot, get_resync
from asgi_session_sync._types import Receive, Scope, Send
from asgi_session_sync.nats import EmbeddedNats, NatsBridge

from .conftest import WAIT

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

PATHS = ["/ws/sessions/{session_id}"]


@pytest.fixture
def anyio_backend() -> str:
    # nats-py and the websockets client run on asyncio only (uvicorn runs its own loop).
    return "asyncio"


class BridgedApp:
    """Starlette behind SessionSyncMiddleware, forwarding a NatsBridge's updates to WebSockets.

    The shared test server runs without lifespan, so the bridge opens on the server's loop
    with the first connection, and :meth:`close` closes it there, as a lifespan would.
    """

    def __init__(self, nats_url: str, db: dict[str, Snapshot]) -> None:
        self.db = db
        self.bridge = NatsBridge(nats_url, reconnect_time_wait=0.1, connect_timeout=1)
        self.connections = 0
        self.loads = 0
        self.handler_done = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        starlette = Starlette(routes=[WebSocketRoute(PATHS[0], self.session_socket)])
        self.app = SessionSyncMiddleware(starlette, loader=self.load, paths=PATHS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The test makes one connection, so there is no race to open the bridge twice.
        if scope["type"] == "websocket" and self._loop is None:
            self._loop = asyncio.get_running_loop()
            await self.bridge.__aenter__()
        await self.app(scope, receive, send)

    async def load(self, ctx: SessionContext) -> Snapshot:
        self.loads += 1
        return self.db[ctx.session_id]

    async def session_socket(self, websocket: WebSocket) -> None:
        self.connections += 1
        session_id = websocket.path_params["session_id"]
        try:
            resync = get_resync(websocket.scope)
            async with self.bridge.subscribe(session_id, resync=resync) as updates:
                await websocket.accept()
                await updates.forward(websocket.send_text, websocket.receive)
        finally:
            self.handler_done.set()

    async def close(self) -> None:
        """Close the bridge on the server's loop, once the connection's handler is done."""
        if self._loop is None:
            return
        if self.connections:
            assert await anyio.to_thread.run_sync(self.handler_done.wait, WAIT)
        closing = asyncio.run_coroutine_threadsafe(
            self.bridge.__aexit__(None, None, None), self._loop
        )
        await anyio.to_thread.run_sync(closing.result, WAIT)


async def receive_json(ws: ClientConnection) -> Any:
    with anyio.fail_after(WAIT):
        return json.loads(await ws.recv())


async def test_broker_restart_reaches_the_connected_client_without_reconnecting(
    serve: Any,
) -> None:
    db = {"s1": Snapshot({"title": "first"}, owner="alice", version=1)}
    async with AsyncExitStack() as servers:
        first = await servers.enter_async_context(EmbeddedNats())
        app = BridgedApp(first.url, db)
        base_url = serve(app)
        try:
            async with connect(f"{base_url}/ws/sessions/s1", open_timeout=WAIT) as ws:
                assert await receive_json(ws) == {
                    "type": "session_update",
                    "session_id": "s1",
                    "owner": "alice",
                    "session": {"title": "first"},
                    "version": 1,
                }

                await first.kill()
                db["s1"] = Snapshot({"title": "changed while NATS was down"}, "alice", 2)
                restarted = await servers.enter_async_context(EmbeddedNats(port=first.port))
                with anyio.fail_after(2):
                    event = await receive_json(ws)
                assert event["session"] == {"title": "changed while NATS was down"}
                assert event["version"] == 2

                # Another replica (or a worker) publishes through the restarted broker.
                async with NatsBridge(restarted.url) as publisher:
                    await publisher.publish("s1", {"title": "live"}, owner="alice", version=3)
                assert (await receive_json(ws))["session"] == {"title": "live"}
        finally:
            await app.close()
    assert app.connections == 1
    assert app.loads == 2
