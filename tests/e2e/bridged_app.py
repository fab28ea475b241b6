"""A Starlette app behind SessionSyncMiddleware whose sockets forward a NatsBridge subscription.

Shared by the e2e tests that run the bridge under the shared uvicorn server, which runs without
lifespan: the bridge opens on the server's loop with the first connection, and :meth:`close`
closes it there, as a lifespan would.
"""

from __future__ import annotations

import asyncio
import threading

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from asgi_session_sync import SessionContext, SessionSyncMiddleware, Snapshot, get_resync
from asgi_session_sync._types import Receive, Scope, Send
from asgi_session_sync.nats import NatsBridge

from .conftest import WAIT

PATHS = ["/ws/sessions/{session_id}"]


class BridgedApp:
    """Serves ``/ws/sessions/{session_id}``: the documented socket handler, subscribing before
    it accepts. Subclasses give the loader (:meth:`load`).

    Args:
        nats_url: The broker the bridge connects to.
        subscribe_with_scope: Subscribe with ``scope=`` (the recommended form, which chains
            patches from the snapshot); ``False`` for the older ``resync=get_resync(scope)``.
    """

    def __init__(self, nats_url: str, *, subscribe_with_scope: bool = True) -> None:
        self.bridge = NatsBridge(nats_url, reconnect_time_wait=0.1, connect_timeout=1)
        self.subscribe_with_scope = subscribe_with_scope
        self.connections = 0
        self.loads = 0
        self.handler_done = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        starlette = Starlette(routes=[WebSocketRoute(PATHS[0], self.session_socket)])
        self.app = SessionSyncMiddleware(starlette, loader=self.counted_load, paths=PATHS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and self._loop is None:
            self._loop = asyncio.get_running_loop()
            await self.bridge.__aenter__()
        await self.app(scope, receive, send)

    async def counted_load(self, ctx: SessionContext) -> Snapshot:
        self.loads += 1
        return await self.load(ctx)

    async def load(self, ctx: SessionContext) -> Snapshot:
        """The snapshot of ``ctx.session_id``."""
        raise NotImplementedError

    async def session_socket(self, websocket: WebSocket) -> None:
        self.connections += 1
        session_id = websocket.path_params["session_id"]
        if self.subscribe_with_scope:
            subscription = self.bridge.subscribe(session_id, scope=websocket.scope)
        else:
            subscription = self.bridge.subscribe(session_id, resync=get_resync(websocket.scope))
        try:
            async with subscription as updates:
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
