from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest

from asgi_session_sync import SessionContext, SessionSyncMiddleware, Snapshot
from asgi_session_sync._flights import SingleFlight
from asgi_session_sync._types import Receive, Scope, Send
from asgi_session_sync.testing import connect_websocket

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


class Load:
    """A load for SingleFlight that blocks until released; counts calls and cancellations."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.calls = 0
        self.cancelled = 0
        self.waiting_since: list[float | None] = []

    async def __call__(self, waiting_since: float | None) -> int:
        self.calls += 1
        self.waiting_since.append(waiting_since)
        call = self.calls
        try:
            await self.release.wait()
        except BaseException:
            self.cancelled += 1
            raise
        return call


def flights(ttl: float | None = None) -> SingleFlight[int]:
    return SingleFlight(ttl=ttl)


async def test_cancelled_waiter_leaves_the_shared_load_alone() -> None:
    table, load = flights(), Load()
    results: list[tuple[int | None, str]] = []

    async def run() -> None:
        results.append(await table.run("s1", load))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await wait_until(lambda: load.calls == 1)
        with anyio.CancelScope() as waiter:
            waiter.cancel()
            await table.run("s1", load)
        tg.start_soon(run)
        await anyio.lowlevel.checkpoint()
        load.release.set()
    assert sorted(results) == [(1, "coalesced"), (1, "loaded")]
    assert (load.calls, load.cancelled) == (1, 0)
    assert table.in_flight == 0


async def test_cancelled_leader_hands_the_load_over() -> None:
    table, load = flights(), Load()
    results: list[tuple[int | None, str]] = []
    leader = anyio.CancelScope()

    async def lead() -> None:
        with leader:
            await table.run("s1", load)

    async def wait() -> None:
        results.append(await table.run("s1", load))

    async with anyio.create_task_group() as tg:
        tg.start_soon(lead)
        await wait_until(lambda: load.calls == 1)
        tg.start_soon(wait)
        tg.start_soon(wait)
        await wait_until(lambda: table._flights["s1"].done is not None)  # someone waits on it
        await anyio.lowlevel.checkpoint()
        leader.cancel()
        await wait_until(lambda: load.calls == 2)
        load.release.set()
    assert load.cancelled == 1
    assert sorted(results) == [(2, "coalesced"), (2, "loaded")]


async def test_app_cancelled_during_the_load_frees_the_flight() -> None:
    # A server that cancels the app (its client left) during the held accept leaves no trace.
    loader = GatedLoader()
    app = wrap(loader)
    sent: list[Any] = []

    async def receive() -> dict[str, str]:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws/s1", "query_string": b"", "headers": []}
    with anyio.CancelScope() as connection:
        async with anyio.create_task_group() as tg:
            tg.start_soon(app, scope, receive, send)
            await wait_until(lambda: loader.running == 1)
            connection.cancel()
    assert sent == []
    assert loader.cancelled == 1
    assert app.sync.fetcher._snapshots.in_flight == 0


async def test_fresh_load_never_shares_a_load_started_before_it_was_asked() -> None:
    # A second tab's load read v20; v21 is lost; the resync must not coalesce into that load.
    table, load = flights(), Load()
    results: dict[str, tuple[int | None, str]] = {}

    async def run(name: str, fresh: bool) -> None:
        results[name] = await table.run("s1", load, fresh=fresh)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "tab", False)
        await wait_until(lambda: load.calls == 1)
        tg.start_soon(run, "resync", True)
        tg.start_soon(run, "other-resync", True)
        tg.start_soon(run, "new-tab", False)
        await wait_until(lambda: len(results) == 0 and table._flights["s1"].done is not None)
        await anyio.lowlevel.checkpoint()
        load.release.set()
    assert results["tab"] == (1, "loaded")
    assert results["new-tab"] == (1, "coalesced")
    # A burst of resyncs makes one load, after the old one: whichever wakes first leads it.
    assert sorted([results["resync"], results["other-resync"]]) == [(2, "coalesced"), (2, "loaded")]


async def test_fresh_load_skips_the_cache() -> None:
    table, load = flights(ttl=60), Load()
    load.release.set()
    assert await table.run("s1", load) == (1, "loaded")
    assert await table.run("s1", load) == (1, "cached")
    assert await table.run("s1", load, fresh=True) == (2, "loaded")
    assert await table.run("s1", load) == (2, "cached")


async def test_unshareable_loads_are_never_kept() -> None:
    table, load = flights(ttl=60), Load()
    load.release.set()
    for _ in range(300):
        assert (await table.run(None, load))[1] == "loaded"
    assert table.in_flight == 0


async def test_cached_entries_expire_by_time() -> None:
    table, load = flights(ttl=0.05), Load()
    load.release.set()
    for n in range(100):
        await table.run(f"s{n}", load)
    assert table.in_flight == 100
    await anyio.sleep(0.06)  # not synchronisation: the entries must outlive their ttl
    assert table.in_flight == 0
    assert await table.run("s0", load) == (101, "loaded")


async def test_unnamed_users_get_no_cache_entries() -> None:
    class Nameless:
        """A user object with no id the middleware can read."""

    calls = 0

    async def loader(ctx: SessionContext) -> Snapshot:
        nonlocal calls
        calls += 1
        return Snapshot({"n": calls}, version=calls)

    app = wrap(loader, cache_ttl=60)
    for _ in range(5):
        async with connect_websocket(app, "/ws/s1", scope={"user": Nameless()}) as ws:
            await ws.receive_json()
    assert calls == 5
    assert app.stats.cache_hits == 0
    assert app.sync.fetcher._snapshots.in_flight == 0


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


async def test_each_call_to_a_hung_db_times_out_in_its_turn() -> None:
    # The bound is on the call: a queued load waits for its slot, then gets its own timeout.
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
    assert (len(loader.calls), loader.cancelled, loader.most_running) == (3, 3, 1)


async def test_a_shared_load_that_times_out_fails_its_connections_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loader = GatedLoader()
    errors: list[BaseException] = []
    app = wrap(loader, timeout=0.2, on_error=lambda ctx, exc: errors.append(exc))
    firsts: list[str] = []

    async def client() -> None:
        async with connect_websocket(app, "/ws/s1") as ws:
            firsts.append(await ws.receive_text())

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(client)
    assert firsts == ["hello"] * 5
    # One call, cancelled once: no waiter takes over a hung load to hang again.
    assert (len(loader.calls), loader.cancelled) == (1, 1)
    assert (app.stats.timeouts, app.stats.coalesced) == (1, 4)
    assert [type(error) for error in errors] == [TimeoutError]
    [record] = [r for r in caplog.records if "timed out" in r.getMessage()]
    assert record.getMessage().startswith("snapshot load timed out after 0.2s session_id=s1")


async def test_a_load_waits_for_its_slot_past_timeout() -> None:
    # A reconnect storm makes the queue long, not the loads: a late snapshot beats none. Each
    # call takes well within its timeout (1 s); the last of four waits three calls for its slot.
    async def loader(ctx: SessionContext) -> Snapshot:
        await anyio.sleep(0.4)  # the load's own duration, not synchronisation
        return Snapshot({"id": ctx.session_id}, version=1)

    app = wrap(loader, max_concurrent_loads=1, timeout=1.0)
    done: list[str] = []

    async def client(n: int) -> None:
        async with connect_websocket(app, f"/ws/s{n}") as ws:
            done.append((await ws.receive_json())["session"]["id"])

    started = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(client, n)
    assert anyio.current_time() - started > 1.2  # the last one waited longer than timeout
    assert sorted(done) == ["s0", "s1", "s2", "s3"]
    assert app.stats.timeouts == 0


async def test_a_load_gives_up_waiting_for_a_slot_after_queue_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loader = GatedLoader()
    errors: list[BaseException] = []
    app = wrap(
        loader,
        max_concurrent_loads=1,
        queue_timeout=0.2,
        on_error=lambda ctx, exc: errors.append(exc),
    )
    firsts: dict[str, Any] = {}

    async def client(session_id: str) -> None:
        async with connect_websocket(app, f"/ws/{session_id}") as ws:
            firsts[session_id] = await ws.receive_text()

    async with anyio.create_task_group() as tg:
        tg.start_soon(client, "s0")
        await wait_until(lambda: loader.running == 1)
        for _ in range(3):  # three connections share the one queued load of s1
            tg.start_soon(client, "s1")
        await wait_until(lambda: "s1" in firsts)
        assert loader.calls == ["s0"]  # s1 never reached the loader
        loader.release.set()
    assert firsts["s1"] == "hello"
    assert '"session_id":"s0"' in firsts["s0"]
    assert (app.stats.timeouts, app.stats.coalesced) == (1, 2)
    assert [type(error) for error in errors] == [TimeoutError]
    [record] = [r for r in caplog.records if "queue_timeout" in r.getMessage()]
    assert record.getMessage().startswith(
        "snapshot load not started: no free slot of max_concurrent_loads=1 "
        "within queue_timeout=0.2s session_id=s1"
    )


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
