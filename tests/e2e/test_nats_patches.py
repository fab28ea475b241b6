"""Patches through a real nats-server and uvicorn: a lost patch is repaired on the open socket."""

from __future__ import annotations

import json
import threading
from typing import Any

import anyio
import anyio.to_thread
import jsonpatch
import pytest
from websockets.asyncio.client import ClientConnection, connect

from asgi_session_sync import SessionContext, Snapshot, make_patch
from asgi_session_sync.nats import EmbeddedNats, NatsBridge

from .bridged_app import BridgedApp
from .conftest import WAIT

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    # nats-py and the websockets client run on asyncio only (uvicorn runs its own loop).
    return "asyncio"


class PatchingApp(BridgedApp):
    """The database is a dict of committed states by version. The loader can be held (from the
    test's thread) after it has read, to let patches arrive while a resync is loading.
    """

    def __init__(self, nats_url: str) -> None:
        super().__init__(nats_url)
        self.states: dict[int, dict[str, Any]] = {1: {"text": ""}}
        self.version = 1
        self.hold_next_load = False
        self.load_read = threading.Event()
        self.release_load = threading.Event()

    async def load(self, ctx: SessionContext) -> Snapshot:
        snapshot = Snapshot(self.states[self.version], version=self.version)
        if self.hold_next_load:
            self.hold_next_load = False
            self.load_read.set()
            await anyio.to_thread.run_sync(self.release_load.wait, WAIT)
        return snapshot

    def commit(self, token: str) -> list[dict[str, Any]]:
        old = self.states[self.version]
        self.version += 1
        self.states[self.version] = {"text": old["text"] + token}
        return make_patch(old, self.states[self.version])


class BrowserState:
    """What a browser holds: applies each frame, refusing a patch for a base it lacks."""

    def __init__(self, ws: ClientConnection, app: PatchingApp) -> None:
        self.ws = ws
        self.app = app
        self.state: Any = None
        self.version: Any = None
        self.types: list[str] = []

    async def next(self) -> dict[str, Any]:
        with anyio.fail_after(WAIT):
            event: dict[str, Any] = json.loads(await self.ws.recv())
        self.types.append(event["type"])
        if event["type"] == "session_patch":
            assert event["base_version"] == self.version, "a patch for a base it lacks"
            self.state = jsonpatch.apply_patch(self.state, event["patch"])
        else:
            self.state = event["session"]
        self.version = event["version"]
        assert self.state == self.app.states[self.version]
        return event


async def test_a_lost_patch_is_repaired_by_a_resync_and_the_patches_after_it_follow(
    serve: Any,
) -> None:
    async with EmbeddedNats() as nats_server:
        app = PatchingApp(nats_server.url)
        base_url = serve(app)
        try:
            async with (
                connect(f"{base_url}/ws/sessions/s1", open_timeout=WAIT) as ws,
                NatsBridge(nats_server.url) as publisher,
            ):

                async def commit_and_publish(token: str) -> None:
                    operations = app.commit(token)
                    await publisher.publish_patch(
                        "s1", operations, base_version=app.version - 1, version=app.version
                    )

                browser = BrowserState(ws, app)
                assert (await browser.next())["version"] == 1
                await commit_and_publish("Hel")
                assert (await browser.next())["type"] == "session_patch"

                # Version 3 is committed, and its patch lost on the way (NATS core delivers
                # at most once). The patch 3 -> 4 reveals the gap: a resync loads version 4.
                app.commit("lo")
                app.hold_next_load = True
                await commit_and_publish(", ")
                assert await anyio.to_thread.run_sync(app.load_read.wait, WAIT)
                # While the snapshot is on its way, more patches arrive: they chain from it.
                await commit_and_publish("world")
                await commit_and_publish("!")
                app.release_load.set()

                snapshot = await browser.next()
                assert (snapshot["type"], snapshot["version"]) == ("session_update", 4)
                assert [(await browser.next())["version"] for _ in range(2)] == [5, 6]
                assert browser.state == {"text": "Hello, world!"}
        finally:
            await app.close()
    assert browser.types == [
        "session_update",
        "session_patch",
        "session_update",
        "session_patch",
        "session_patch",
    ]
    assert app.connections == 1  # repaired in place: the client never reconnected
    assert app.loads == 2
    assert app.bridge.stats.gaps >= 1
    assert app.bridge.stats.snapshots_forwarded == 1
