from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest

from asgi_session_sync import SessionContext, SessionSyncMiddleware, Snapshot
from asgi_session_sync._types import Receive, Scope, Send
from asgi_session_sync.testing import WebSocketClient, connect_websocket

pytestmark = pytest.mark.anyio


async def accepting_app(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    await send({"type": "websocket.accept"})
    try:
        await send({"type": "websocket.send", "text": "hello"})
    except OSError:  # the client left during the load, as the server tells the app
        return
    await receive()


class GatedLoader:
    """Blocks every call until released; counts calls and the most running at once."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.calls: list[str] = []
        self.running = 0
        self.most_running = 0
        self.cancelled = 0

    async def __call__(self, ctx: SessionContext) -> Snapshot:
        self.calls.append(ctx.session_id)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.release.wait()
        except BaseException:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        return Snapshot({"id": ctx.session_id, "user": ctx.user}, owner=ctx.user, version=1)


def wrap(loader: Any, **options: Any) -> SessionSyncMiddleware:
    options.setdefault("timeout", 30)
    return SessionSyncMiddleware(
        accepting_app, loader=loader, paths=["/ws/{session_id}"], **options
    )


async def wait_until(condition: Any) -> None:
    with anyio.fail_after(5):
        while not condition():
            await anyio.lowlevel.checkpoint()


async def test_concurrent_connections_share_one_load_per_session() -> None:
    loader = GatedLoader()
    app = wrap(loader, max_concurrent_loads=64)
    firsts: dict[int, Any] = {}

    async def client(n: int) -> None:
        async with connect_websocket(app, f"/ws/s{n % 50}", timeout=30) as ws:
            firsts[n] = await ws.receive_json()

    async with anyio.create_task_group() as tg:
        for n in range(500):
            tg.start_soon(client, n)
        await wait_until(lambda: app.stats.connections == 500 and loader.running == 50)
        loader.release.set()
    assert len(loader.calls) == 50
    assert app.stats.loads == 50
    assert app.stats.coalesced == 450
    assert all(firsts[n]["session"]["id"] == f"s{n % 50}" for n in range(500))


async def test_cancelled_waiter_leaves_the_shared_load_alone() -> None:
    loader = GatedLoader()
    app = wrap(loader)
    results: list[Any] = []
    stayers_in: list[WebSocketClient] = []

    async def stay() -> None:
        async with connect_websocket(app, "/ws/s1") as ws:
            stayers_in.append(ws)
            results.append(await ws.receive_json())

    async with anyio.create_task_group() as tg:
        tg.start_soon(stay)
        await wait_until(lambda: loader.running == 1)
        async with connect_websocket(app, "/ws/s1") as leaver:
            await wait_until(lambda: app.stats.connections == 2)
            await leaver.disconnect()
            await leaver.wait_app_done()
        tg.start_soon(stay)
        await wait_until(lambda: len(stayers_in) == 2)
        loader.release.set()
    assert [r["session"]["id"] for r in results] == ["s1", "s1"]
    assert loader.calls == ["s1"]
    assert loader.cancelled == 0
    assert app.stats.disconnects_during_load == 1


async def test_cancelled_leader_hands_the_load_over() -> None:
    loader = GatedLoader()
    app = wrap(loader)
    results: list[Any] = []

    async def stay() -> None:
        async with connect_websocket(app, "/ws/s1") as ws:
            results.append(await ws.receive_json())

    async with anyio.create_task_group() as tg:
        async with connect_websocket(app, "/ws/s1") as leader:
            await wait_until(lambda: loader.running == 1)
            tg.start_soon(stay)
            tg.start_soon(stay)
            await wait_until(lambda: app.stats.connections == 3)
            await leader.disconnect()
            await leader.wait_app_done()
        await wait_until(lambda: len(loader.calls) == 2)
        loader.release.set()
    assert loader.cancelled == 1
    assert len(results) == 2


async def test_different_users_never_share_a_load() -> None:
    class OwnerCheckingLoader(GatedLoader):
        async def __call__(self, ctx: SessionContext) -> Snapshot | None:  # type: ignore[override]
            snapshot = await super().__call__(ctx)
            return snapshot if ctx.user == "alice" else None

    loader = OwnerCheckingLoader()
    app = wrap(loader)
    firsts: dict[str, Any] = {}

    async def client(user: str) -> None:
        async with connect_websocket(app, "/ws/s1", scope={"user": user}) as ws:
            firsts[user] = await ws.receive()

    async with anyio.create_task_group() as tg:
        for user in ("alice", "alice", "mallory"):
            tg.start_soon(client, user)
        await wait_until(lambda: app.stats.connections == 3 and loader.running == 2)
        loader.release.set()
    assert sorted(loader.calls) == ["s1", "s1"]
    assert '"owner":"alice"' in firsts["alice"]["text"]
    assert firsts["mallory"]["text"] == "hello"


async def test_single_flight_off_calls_the_loader_per_connection() -> None:
    loader = GatedLoader()
    app = wrap(loader, single_flight=False)

    async def client() -> None:
        async with connect_websocket(app, "/ws/s1") as ws:
            await ws.receive_json()

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(client)
        await wait_until(lambda: loader.running == 5)
        loader.release.set()
    assert len(loader.calls) == 5


async def test_loads_never_exceed_max_concurrent_loads() -> None:
    loader = GatedLoader()
    app = wrap(loader, max_concurrent_loads=3)
    done: list[str] = []

    async def client(n: int) -> None:
        async with connect_websocket(app, f"/ws/s{n}") as ws:
            done.append((await ws.receive_json())["session"]["id"])

    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(client, n)
        await wait_until(lambda: app.stats.connections == 20 and loader.running == 3)
        assert len(loader.calls) == 3
        loader.release.set()
    assert loader.most_running == 3
    assert sorted(done) == sorted(f"s{n}" for n in range(20))


async def test_queued_load_times_out_when_the_db_is_slow() -> None:
    loader = GatedLoader()
    app = wrap(loader, max_concurrent_loads=1, timeout=0.2)
    firsts: list[str] = []

    async def client(n: int) -> None:
        async with connect_websocket(app, f"/ws/s{n}") as ws:
            firsts.append(await ws.receive_text())

    async with anyio.create_task_group() as tg:
        for n in range(3):
            tg.start_soon(client, n)
    assert firsts == ["hello"] * 3
    assert app.stats.timeouts == 3
    assert loader.most_running == 1


async def test_cache_ttl_reuses_a_finished_load() -> None:
    loader = GatedLoader()
    loader.release.set()
    cached = wrap(loader, cache_ttl=60)
    for _ in range(3):
        async with connect_websocket(cached, "/ws/s1") as ws:
            await ws.receive_json()
    assert len(loader.calls) == 1
    assert cached.stats.cache_hits == 2

    uncached = wrap(loader)
    for _ in range(3):
        async with connect_websocket(uncached, "/ws/s1") as ws:
            await ws.receive_json()
    assert len(loader.calls) == 4


async def test_cache_ttl_never_keeps_a_failed_load() -> None:
    calls = 0

    async def flaky(ctx: SessionContext) -> Snapshot:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("db down")
        return Snapshot({"n": calls}, version=calls)

    app = wrap(flaky, cache_ttl=60)
    async with connect_websocket(app, "/ws/s1") as ws:
        assert await ws.receive_text() == "hello"  # no snapshot: the load failed
    async with connect_websocket(app, "/ws/s1") as ws:
        assert (await ws.receive_json())["version"] == 2  # loaded again, not the failure
    async with connect_websocket(app, "/ws/s1") as ws:
        assert (await ws.receive_json())["version"] == 2  # now from the cache
    assert calls == 2
    assert app.stats.cache_hits == 1
