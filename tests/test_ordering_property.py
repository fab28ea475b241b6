"""Property: whatever the interleaving of writes, publishes, connect and load, the client's view
never goes back, nothing older than the snapshot follows it, and it ends on the DB's last state.
"""

from __future__ import annotations

import json
import math
from typing import Any

import anyio
import pytest
from anyio.lowlevel import checkpoint
from anyio.streams.memory import MemoryObjectSendStream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgi_session_sync import SessionContext, SessionSyncMiddleware, Snapshot
from asgi_session_sync._types import Receive, Scope, Send
from asgi_session_sync.testing import connect_websocket


class World:
    """A DB row with a version, and a broker that delivers publishes in order to subscribers."""

    def __init__(self) -> None:
        self.version = 0
        self.tokens: list[int] = []
        self.subscribers: list[MemoryObjectSendStream[str]] = []

    def write(self) -> None:
        self.version += 1
        self.tokens.append(self.version)
        event = {
            "type": "session_update",
            "session_id": "s1",
            "version": self.version,
            "session": {"tokens": list(self.tokens)},
        }
        for subscriber in self.subscribers:
            subscriber.send_nowait(json.dumps(event))


async def yield_n(n: int) -> None:
    for _ in range(n):
        await checkpoint()


async def scenario(world: World, pauses: dict[str, Any]) -> list[dict[str, Any]]:
    async def loader(ctx: SessionContext) -> Snapshot:
        await yield_n(pauses["before_read"])
        snapshot = Snapshot({"tokens": list(world.tokens)}, version=world.version)
        await yield_n(pauses["after_read"])
        return snapshot

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        # Subscribe before accepting, so nothing published from here on is missed.
        inbox_send, inbox = anyio.create_memory_object_stream[str](math.inf)
        world.subscribers.append(inbox_send)
        await yield_n(pauses["after_subscribe"])
        await send({"type": "websocket.accept"})
        with inbox_send, inbox:
            async for frame in inbox:
                await yield_n(pauses["forward"])
                await send({"type": "websocket.send", "text": frame})

    async def writer() -> None:
        for pause in pauses["writes"]:
            await yield_n(pause)
            world.write()

    middleware = SessionSyncMiddleware(app, loader=loader, paths=["/ws/{session_id}"])
    seen: list[dict[str, Any]] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer)
        await yield_n(pauses["connect_after"])
        async with connect_websocket(middleware, "/ws/s1") as ws:
            while not seen or seen[-1]["version"] < len(pauses["writes"]):
                seen.append(await ws.receive_json())
            for subscriber in world.subscribers:
                subscriber.close()
    return seen


pauses = st.fixed_dictionaries(
    {
        "writes": st.lists(st.integers(0, 6), min_size=1, max_size=12),
        "connect_after": st.integers(0, 20),
        "after_subscribe": st.integers(0, 6),
        "before_read": st.integers(0, 6),
        "after_read": st.integers(0, 6),
        "forward": st.integers(0, 2),
    }
)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pauses=pauses)
def test_client_never_sees_the_past(backend: str, pauses: dict[str, Any]) -> None:
    world = World()
    seen = anyio.run(scenario, world, pauses, backend=backend)
    versions = [event["version"] for event in seen]
    assert versions == sorted(set(versions)), "versions went down or repeated"
    snapshot_version = versions[0]
    assert all(v > snapshot_version for v in versions[1:]), "an event older than the snapshot"
    assert versions[-1] == world.version
    assert seen[-1]["session"] == {"tokens": world.tokens}
