"""A NATS broker restart under a real uvicorn: the connected client gets the current state."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from typing import Any

import anyio
import anyio.to_thread
import pytest
from websockets.asyncio.client import ClientConnection, connect

from asgi_session_sync import SessionContext, Snapshot
from asgi_session_sync.nats import EmbeddedNats, NatsBridge

from .bridged_app import BridgedApp
from .conftest import WAIT

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    # nats-py and the websockets client run on asyncio only (uvicorn runs its own loop).
    return "asyncio"


class DictApp(BridgedApp):
    """Snapshots from a dict."""

    def __init__(self, nats_url: str, db: dict[str, Snapshot]) -> None:
        super().__init__(nats_url)
        self.db = db

    async def load(self, ctx: SessionContext) -> Snapshot:
        return self.db[ctx.session_id]


async def receive_json(ws: ClientConnection) -> Any:
    with anyio.fail_after(WAIT):
        return json.loads(await ws.recv())


async def test_broker_restart_reaches_the_connected_client_without_reconnecting(
    serve: Any,
) -> None:
    db = {"s1": Snapshot({"title": "first"}, owner="alice", version=1)}
    async with AsyncExitStack() as servers:
        first = await servers.enter_async_context(EmbeddedNats())
        app = DictApp(first.url, db)
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
                # Where the first one was, with its credentials: the bridge reconnects there.
                restarted = await servers.enter_async_context(
                    EmbeddedNats(port=first.port, user=first.user, password=first.password)
                )
                with anyio.fail_after(2):
                    event = await receive_json(ws)
                assert event["session"] == {"title": "changed while NATS was down"}
                assert (event["version"], event["reset"]) == (2, True)

                # Another replica (or a worker) publishes through the restarted broker.
                async with NatsBridge(restarted.url) as publisher:
                    await publisher.publish("s1", {"title": "live"}, owner="alice", version=3)
                assert (await receive_json(ws))["session"] == {"title": "live"}
        finally:
            await app.close()
    assert app.connections == 1
    assert app.loads == 2
