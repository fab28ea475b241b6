"""A Starlette app whose sockets are accepted by SessionSync and forward a NatsBridge stream.

Shared by the e2e tests that run the bridge under the shared uvicorn server, which runs without
lifespan: the first connection starts a task on the server's loop that holds the bridge open
(``async with bridge``), and :meth:`close` ends that task, as a lifespan would. One task enters
and leaves the bridge: its task group must be exited by the task that entered it.
"""

from __future__ import annotations

import asyncio
import threading

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from asgi_session_sync import SessionContext, SessionSync, Snapshot
from asgi_session_sync._types import Receive, Scope, Send
from asgi_session_sync.nats import NatsBridge

from .conftest import WAIT

PATH = "/ws/sessions/{session_id}"
# Seconds of quiet before a heartbeat: longer than any wait of these tests, so none comes.
HEARTBEAT = 15.0


class BridgedApp:
    """Serves ``/ws/sessions/{session_id}``: the documented socket handler, subscribing before
    it accepts. Subclasses give the loader (:meth:`load`).

    Args:
        nats_url: The broker the bridge connects to.
    """

    def __init__(self, nats_url: str) -> None:
        self.bridge = NatsBridge(nats_url, reconnect_time_wait=0.1, connect_timeout=1)
        self.sync = SessionSync(self.counted_load)
        self.connections = 0
        self.loads = 0
        self.handler_done = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bridge_task: asyncio.Task[None] | None = None
        self._opened = asyncio.Event()
        self._stop = asyncio.Event()
        self.app = Starlette(routes=[WebSocketRoute(PATH, self.session_socket)])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
                # The server's loop has no lifespan here: this task is the bridge's owner.
                self._bridge_task = asyncio.create_task(self._hold_bridge_open())
            await self._opened.wait()
            assert self._bridge_task is not None
            if self._bridge_task.done():
                self._bridge_task.result()  # the bridge failed to open: raise why
        await self.app(scope, receive, send)

    async def _hold_bridge_open(self) -> None:
        try:
            async with self.bridge:
                self._opened.set()
                await self._stop.wait()
        finally:
            self._opened.set()  # a failed open wakes the connections, which raise its error

    async def _close_bridge(self) -> None:
        assert self._bridge_task is not None
        self._stop.set()
        await self._bridge_task

    async def counted_load(self, ctx: SessionContext) -> Snapshot:
        self.loads += 1
        return await self.load(ctx)

    async def load(self, ctx: SessionContext) -> Snapshot:
        """The snapshot of ``ctx.session_id``."""
        raise NotImplementedError

    async def session_socket(self, websocket: WebSocket) -> None:
        self.connections += 1
        session_id = websocket.path_params["session_id"]
        try:
            async with self.bridge.subscribe(session_id) as updates:
                socket = await self.sync.accept(websocket.scope, websocket.send, session_id)
                await updates.forward(socket, websocket.receive, heartbeat=HEARTBEAT)
        finally:
            self.handler_done.set()

    async def close(self) -> None:
        """Close the bridge on the server's loop, once the connection's handler is done."""
        if self._loop is None:
            return
        if self.connections:
            assert await anyio.to_thread.run_sync(self.handler_done.wait, WAIT)
        closing = asyncio.run_coroutine_threadsafe(self._close_bridge(), self._loop)
        await anyio.to_thread.run_sync(closing.result, WAIT)
