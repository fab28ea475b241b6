from __future__ import annotations

import json
from typing import Any

import pytest

from asgi_session_sync import SessionContext, SessionSyncMiddleware, Snapshot
from asgi_session_sync._types import Receive, Scope, Send
from asgi_session_sync.protocol import MAX_VERSION, Version
from asgi_session_sync.testing import connect_websocket

pytestmark = pytest.mark.anyio


class Store:
    """One session at a version; counts the full and the cheap loads."""

    def __init__(self, version: Version = 7) -> None:
        self.version = version
        self.loads: list[SessionContext] = []
        self.version_loads = 0

    async def load(self, ctx: SessionContext) -> Snapshot:
        self.loads.append(ctx)
        return Snapshot({"state": "current"}, version=self.version)

    async def load_version(self, ctx: SessionContext) -> Version:
        self.version_loads += 1
        return self.version


def app_sending(*frames: str) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        for text in (*frames, "hello"):
            await send({"type": "websocket.send", "text": text})
        await receive()

    return app


def wrap(store: Store, *frames: str, with_version_loader: bool = True, **options: Any) -> Any:
    return SessionSyncMiddleware(
        app_sending(*frames),
        loader=store.load,
        version_loader=store.load_version if with_version_loader else None,
        paths=["/ws/{session_id}"],
        **options,
    )


async def test_current_since_skips_the_full_load() -> None:
    store = Store(version=7)
    app = wrap(store)
    async with connect_websocket(app, "/ws/s1?since=7") as ws:
        assert await ws.receive_text() == "hello"
    assert store.loads == []
    assert store.version_loads == 1
    assert app.stats.skipped_by_resume == 1
    assert app.stats.snapshots_sent == 0


async def test_current_since_sends_session_synced_when_asked() -> None:
    store = Store(version=7)
    async with connect_websocket(wrap(store, send_synced=True), "/ws/s1?since=7") as ws:
        assert await ws.receive_json() == {
            "type": "session_synced",
            "session_id": "s1",
            "version": 7,
        }
        assert await ws.receive_text() == "hello"
    assert store.loads == []


@pytest.mark.parametrize("since", ["6", "8", "0"])
async def test_other_since_sends_the_snapshot(since: str) -> None:
    store = Store(version=7)
    async with connect_websocket(wrap(store), f"/ws/s1?since={since}") as ws:
        assert (await ws.receive_json())["version"] == 7
    assert [ctx.since for ctx in store.loads] == [int(since)]


async def test_without_version_loader_the_snapshot_version_decides() -> None:
    store = Store(version=7)
    app = wrap(store, with_version_loader=False)
    async with connect_websocket(app, "/ws/s1?since=7") as ws:
        assert await ws.receive_text() == "hello"
    assert len(store.loads) == 1
    assert app.stats.skipped_by_resume == 1


@pytest.mark.parametrize(
    "since",
    [
        "abc",
        "",
        "7&since=7",  # given twice
        "7a",
        "-7",
        "%2B7",  # +7
        "7.0",
        "7e0",
        "%207",  # " 7"
        "%EF%BC%97",  # a fullwidth 7
        "%FF",
        "2026-11-25T12:00:00Z",  # timestamps are not versions
        "00000000000000007",  # 17 digits, although its value is 7
        "1" * 100,
        str(2**53),
        str(2**64),
    ],
)
async def test_unusable_since_is_ignored(since: str) -> None:
    store = Store(version=7)
    app = wrap(store)
    async with connect_websocket(app, f"/ws/s1?since={since}") as ws:
        assert (await ws.receive_json())["version"] == 7
    assert store.loads[0].since is None
    assert store.version_loads == 0
    assert app.stats.skipped_by_resume == 0


@pytest.mark.parametrize("since", ["0000000000000007", "007"])
async def test_since_with_leading_zeros_up_to_16_digits_is_read(since: str) -> None:
    store = Store(version=7)
    async with connect_websocket(wrap(store), f"/ws/s1?since={since}") as ws:
        assert await ws.receive_text() == "hello"
    assert store.loads == []


async def test_since_at_the_largest_version_resumes() -> None:
    store = Store(version=MAX_VERSION)
    async with connect_websocket(wrap(store), f"/ws/s1?since={MAX_VERSION}") as ws:
        assert await ws.receive_text() == "hello"
    assert store.loads == []
    assert store.version_loads == 1


async def test_a_version_loader_answer_that_is_not_a_version_loads_in_full() -> None:
    store = Store(version=7)

    async def timestamp(ctx: SessionContext) -> Any:
        return "2026-11-25T12:00:00Z"

    app = SessionSyncMiddleware(
        app_sending(), loader=store.load, version_loader=timestamp, paths=["/ws/{session_id}"]
    )
    async with connect_websocket(app, "/ws/s1?since=7") as ws:
        assert await ws.receive_text() == "hello"  # the full load found 7: resumed
    assert len(store.loads) == 1
    assert app.stats.errors == 1


async def test_resumed_connection_is_fenced_at_since() -> None:
    stale = json.dumps({"type": "session_update", "session_id": "s1", "version": 7})
    newer = json.dumps({"type": "session_update", "session_id": "s1", "version": 8})
    async with connect_websocket(wrap(Store(version=7), stale, newer), "/ws/s1?since=7") as ws:
        assert (await ws.receive_json())["version"] == 8
        assert await ws.receive_text() == "hello"


async def test_a_resumed_connection_repairs_a_patch_that_does_not_chain() -> None:
    # The client says it has 7 and gets no snapshot; the app's first patch starts at 8 (7 -> 8
    # was lost): the middleware loads the session and sends it with "reset": true first.
    current, written = Store(version=7), Store(version=8)  # 8 written after the resume check
    ahead = json.dumps(
        {"type": "session_patch", "session_id": "s1", "base_version": 8, "version": 9, "patch": []}
    )
    app = SessionSyncMiddleware(
        app_sending(ahead),
        loader=written.load,
        version_loader=current.load_version,
        paths=["/ws/{session_id}"],
    )
    async with connect_websocket(app, "/ws/s1?since=7") as ws:
        fresh = await ws.receive_json()
        assert (fresh["type"], fresh["version"], fresh.get("reset")) == ("session_update", 8, True)
        assert (await ws.receive_json())["version"] == 9
        assert await ws.receive_text() == "hello"
    assert (len(written.loads), current.version_loads) == (1, 1)
    assert app.stats.skipped_by_resume == 1


async def test_custom_since_param() -> None:
    store = Store(version=7)
    async with connect_websocket(wrap(store, since_param="v"), "/ws/s1?v=7") as ws:
        assert await ws.receive_text() == "hello"
    assert store.loads == []


async def test_version_loader_failure_falls_back_to_the_full_load() -> None:
    store = Store(version=7)

    async def broken(ctx: SessionContext) -> Version:
        raise ConnectionError("db")

    app = SessionSyncMiddleware(
        app_sending(), loader=store.load, version_loader=broken, paths=["/ws/{session_id}"]
    )
    async with connect_websocket(app, "/ws/s1?since=6") as ws:
        assert (await ws.receive_json())["version"] == 7
    assert app.stats.errors == 1
