"""Review of the load bounds (fcdd9ee): ``timeout`` bounds each loader call, ``queue_timeout``
the wait for one of ``max_concurrent_loads`` slots, and a timeout is one failure shared by the
connections on that load.

Checks the edges of that change: a leader cancelled (its client left) while it queues or while
its call runs, and a cancel racing the slot's hand-over (the waiters still get a load, the slot
always comes back); the per-connection bound ``queue_timeout + timeout`` the docs promise when a
leader hands its load over; ``queue_timeout=None``; the version load (``?since=``) timing out
in its call or in the queue (the full load runs, the timeout is reported once); ``cache_ttl``
never keeping a timed-out load; a fresh resync during a hung loader; the validation of
``queue_timeout``. Every test runs on asyncio and trio.
"""

from __future__ import annotations

import math
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from test_single_flight import wait_until, wrap

from asgi_session_sync import SessionContext, SessionSync, SessionSyncMiddleware, Snapshot
from asgi_session_sync._fetcher import FAILED
from asgi_session_sync.testing import connect_websocket

pytestmark = pytest.mark.anyio


class Gates:
    """A loader that blocks each session's calls until its gate is opened; records calls,
    cancellations and the most calls running at once."""

    def __init__(self) -> None:
        self.gates: dict[str, anyio.Event] = {}
        self.calls: list[str] = []
        self.cancelled: list[str] = []
        self.running = 0

    def gate(self, session_id: str) -> anyio.Event:
        return self.gates.setdefault(session_id, anyio.Event())

    async def __call__(self, ctx: SessionContext) -> Snapshot:
        self.calls.append(ctx.session_id)
        self.running += 1
        try:
            await self.gate(ctx.session_id).wait()
        except BaseException:
            self.cancelled.append(ctx.session_id)
            raise
        finally:
            self.running -= 1
        return Snapshot({"id": ctx.session_id}, version=len(self.calls))


def scope_for(path: str) -> dict[str, Any]:
    path, _, query = path.partition("?")
    return {"type": "websocket", "path": path, "query_string": query.encode(), "headers": []}


def ctx_for(session_id: str) -> SessionContext:
    return SessionContext(session_id, scope_for(f"/ws/{session_id}"))


async def leaving_client(app: Any, path: str, scope: anyio.CancelScope) -> None:
    """A connection whose server cancels the app when its client leaves (``scope.cancel()``),
    during the held accept: nothing is sent to it."""

    async def receive() -> dict[str, str]:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        raise AssertionError(f"sent to a client that left: {message}")

    with scope:
        await app(scope_for(path), receive, send)


async def connect_and_hold(app: Any) -> None:
    """A connection to session "hold", whose load holds a slot until its gate opens."""
    async with connect_websocket(app, "/ws/hold", timeout=30) as ws:
        await ws.receive()


def waited_on(fetcher: Any) -> bool:
    """Whether a connection waits on another's snapshot load (anonymous session "s1")."""
    flight = fetcher._snapshots._flights.get(("s1", None))
    return flight is not None and flight.done is not None


def queued(app: SessionSyncMiddleware) -> int:
    return app.sync.fetcher._slots.statistics().tasks_waiting


class Clients:
    """An app whose clients connect to ``path``, with a :class:`Gates` loader (the ``answering``
    sessions answered at once); collects the clients' first frames and ``on_error``'s reports."""

    def __init__(self, path: str, *, answering: tuple[str, ...] = (), **options: Any) -> None:
        self.path = path
        self.loader = Gates()
        for session_id in answering:
            self.loader.gate(session_id).set()
        self.errors: list[BaseException] = []
        self.firsts: list[Any] = []
        self.app = wrap(self.loader, on_error=lambda ctx, exc: self.errors.append(exc), **options)

    async def client(self) -> None:
        async with connect_websocket(self.app, self.path) as ws:
            self.firsts.append(await ws.receive_json())


# --- A leader that leaves -------------------------------------------------------------------


async def test_a_leader_that_leaves_while_queued_hands_its_load_over() -> None:
    clients = Clients("/ws/s1", max_concurrent_loads=1)
    loader, app, firsts, client = clients.loader, clients.app, clients.firsts, clients.client
    leader = anyio.CancelScope()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(connect_and_hold, app)
            await wait_until(lambda: loader.running == 1)
            tg.start_soon(leaving_client, app, "/ws/s1", leader)
            await wait_until(lambda: queued(app) == 1)
            tg.start_soon(client)
            await wait_until(lambda: waited_on(app.sync.fetcher))
            leader.cancel()
            await wait_until(lambda: queued(app) == 1 and leader.cancelled_caught)
            loader.gate("hold").set()
            loader.gate("s1").set()
    assert [first["session"]["id"] for first in firsts] == ["s1"]
    assert loader.calls == ["hold", "s1"]  # the leader never reached the loader
    assert app.stats.timeouts == 0
    assert app.sync.fetcher._slots.value == 1
    assert app.sync.fetcher._snapshots.in_flight == 0


async def test_a_leader_that_leaves_mid_call_frees_its_slot_and_a_waiter_loads_again() -> None:
    clients = Clients("/ws/s1", max_concurrent_loads=1)
    loader, app, firsts, client = clients.loader, clients.app, clients.firsts, clients.client
    leader = anyio.CancelScope()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(leaving_client, app, "/ws/s1", leader)
            await wait_until(lambda: loader.running == 1)
            tg.start_soon(client)
            await wait_until(lambda: waited_on(app.sync.fetcher))
            leader.cancel()
            await wait_until(lambda: len(loader.calls) == 2)
            assert app.sync.fetcher._slots.value == 0  # the waiter's call holds the one slot
            loader.gate("s1").set()
    assert loader.cancelled == ["s1"]
    assert [first["session"]["id"] for first in firsts] == ["s1"]
    assert app.stats.timeouts == 0
    assert app.sync.fetcher._slots.value == 1
    assert app.sync.fetcher._snapshots.in_flight == 0


async def test_a_leader_cancelled_as_the_slot_is_handed_to_it_gives_the_slot_back() -> None:
    # The slot's holder releases it to the queued leader in the same step as the leader's
    # client leaves: whichever wins, the slot must come back and the waiter must get a load.
    loader = Gates()
    loader.gate("s1").set()
    sync = SessionSync(loader, max_concurrent_loads=1)
    fetcher = sync.fetcher
    fetcher._slots.acquire_nowait()  # someone else's call holds the only slot
    leader = anyio.CancelScope()
    results: list[Any] = []

    async def lead() -> None:
        with leader:
            await fetcher.snapshot(ctx_for("s1"))

    async def wait() -> None:
        results.append(await fetcher.snapshot(ctx_for("s1")))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lead)
            await wait_until(lambda: fetcher._slots.statistics().tasks_waiting == 1)
            tg.start_soon(wait)
            await wait_until(lambda: waited_on(fetcher))
            fetcher._slots.release()
            leader.cancel()
    [result] = results
    assert result is not None
    assert result.data is not None
    assert fetcher._slots.value == 1
    assert fetcher._snapshots.in_flight == 0
    assert sync.stats.timeouts == 0


async def test_a_waiter_whose_leader_left_the_queue_is_still_answered_within_its_bounds() -> None:
    # Documented (SyncConfig.queue_timeout, operations.md, concepts.md): a connection's snapshot
    # takes at most queue_timeout + timeout, and a client that leaves is noticed at those
    # bounds. A waiter whose leader leaves leads the load again, with what is left of its own
    # queue_timeout, counted from when it began to wait: not a fresh one from the back of the
    # queue, which restarted its clock at every leader that left.
    queue_timeout, timeout = 1.0, 2.0
    loader = Gates()
    app = wrap(loader, max_concurrent_loads=1, queue_timeout=queue_timeout, timeout=timeout)
    leader = anyio.CancelScope()
    answered: list[float] = []

    async def client() -> None:
        async with connect_websocket(app, "/ws/s1", timeout=10) as ws:
            assert await ws.receive_text() == "hello"  # no snapshot: its wait timed out
            answered.append(anyio.current_time())

    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(connect_and_hold, app)
            await wait_until(lambda: loader.running == 1)
            tg.start_soon(leaving_client, app, "/ws/s1", leader)
            await wait_until(lambda: queued(app) == 1)
            joined = anyio.current_time()
            tg.start_soon(client)
            await wait_until(lambda: waited_on(app.sync.fetcher))
            await anyio.sleep(0.7)  # time spent in the queue, not synchronisation
            leader.cancel()
            await wait_until(lambda: queued(app) == 1 and leader.cancelled_caught)
            # Past the first leader's queue deadline, before the new leader's.
            await anyio.sleep(joined + queue_timeout + 0.35 - anyio.current_time())
            assert loader.calls == ["hold"]
            loader.gate("hold").set()  # its call took 1.35 s, within timeout
    # Its queue_timeout ran out at joined + 1 s, before the slot was free: no call of its own.
    assert loader.calls == ["hold"]
    assert app.stats.timeouts == 1
    waited = answered[0] - joined
    assert waited <= queue_timeout + timeout + 0.1, (
        f"the waiter was answered {waited:.2f}s after it connected, past "
        f"queue_timeout + timeout = {queue_timeout + timeout}s"
    )


# --- queue_timeout=None ---------------------------------------------------------------------


async def test_queue_timeout_none_waits_its_turn() -> None:
    loader = Gates()
    loader.gate("s1").set()
    app = wrap(loader, max_concurrent_loads=1, queue_timeout=None, timeout=5)
    firsts: list[Any] = []

    async def client() -> None:
        async with connect_websocket(app, "/ws/s1", timeout=10) as ws:
            firsts.append(await ws.receive_json())

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(connect_and_hold, app)
            await wait_until(lambda: loader.running == 1)
            tg.start_soon(client)
            await wait_until(lambda: queued(app) == 1)
            await anyio.sleep(0.3)  # a while in the queue, not synchronisation
            assert firsts == []
            loader.gate("hold").set()
    assert [first["session"]["id"] for first in firsts] == ["s1"]
    assert app.stats.timeouts == 0
    assert app.sync.fetcher._slots.value == 1


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (-1, ValueError),
        (0.0, ValueError),
        (math.nan, ValueError),
        ("30", TypeError),
        (True, TypeError),
        ([30], TypeError),
    ],
)
def test_queue_timeout_is_validated(value: object, error: Any) -> None:
    with pytest.raises(error, match="queue_timeout must be a positive number of seconds or None"):
        SessionSync(Gates(), queue_timeout=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [None, 0.001, 30, math.inf])
def test_queue_timeout_accepts_none_and_positive_numbers(value: float | None) -> None:
    assert SessionSync(Gates(), queue_timeout=value).config.queue_timeout == value


# --- The version load (resume) --------------------------------------------------------------


async def test_a_version_load_that_times_out_is_reported_once_then_the_full_load_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    never = anyio.Event()
    version_calls: list[str] = []

    async def version_loader(ctx: SessionContext) -> int:
        version_calls.append(ctx.session_id)
        await never.wait()
        return 1

    clients = Clients(
        "/ws/s1?since=99", answering=("s1",), version_loader=version_loader, timeout=0.3
    )
    app, errors, firsts, client = clients.app, clients.errors, clients.firsts, clients.client

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(3):  # three resuming tabs share the one hung version load
                tg.start_soon(client)
    assert version_calls == ["s1"]
    assert [first["session"]["id"] for first in firsts] == ["s1"] * 3
    assert (app.stats.timeouts, app.stats.version_loads) == (1, 1)
    assert [str(error) for error in errors] == ["version load timed out after 0.3s"]
    [record] = [r for r in caplog.records if "timed out" in r.getMessage()]
    assert record.getMessage().startswith(
        "version load timed out after 0.3s, loading in full session_id=s1"
    )
    assert app.sync.fetcher._slots.value == 64


async def test_a_version_load_with_no_free_slot_falls_back_to_the_full_load() -> None:
    async def version_loader(ctx: SessionContext) -> int:
        raise AssertionError("never reached: no slot")

    clients = Clients(
        "/ws/s1?since=99",
        answering=("s1",),
        version_loader=version_loader,
        max_concurrent_loads=1,
        queue_timeout=0.3,
    )
    app, errors, firsts, client = clients.app, clients.errors, clients.firsts, clients.client
    loader = clients.loader

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(connect_and_hold, app)
            await wait_until(lambda: loader.running == 1)
            tg.start_soon(client)
            await wait_until(lambda: app.stats.timeouts == 1)  # the version load gave up
            await wait_until(lambda: queued(app) == 1)  # the full load queues in its turn
            loader.gate("hold").set()
    assert [first["session"]["id"] for first in firsts] == ["s1"]
    assert (app.stats.timeouts, app.stats.version_loads, app.stats.loads) == (1, 0, 2)
    [error] = errors
    assert str(error).startswith("version load not started: no free slot")
    assert app.sync.fetcher._slots.value == 1


# --- The cache and resyncs ------------------------------------------------------------------


async def test_cache_ttl_never_keeps_a_timed_out_load() -> None:
    loader = Gates()
    app = wrap(loader, cache_ttl=60, timeout=0.2)
    with anyio.fail_after(10):
        async with connect_websocket(app, "/ws/s1") as ws:
            assert await ws.receive_text() == "hello"  # the call timed out: no snapshot
        loader.gate("s1").set()
        async with connect_websocket(app, "/ws/s1") as ws:
            assert (await ws.receive_json())["version"] == 2  # loaded again
        async with connect_websocket(app, "/ws/s1") as ws:
            assert (await ws.receive_json())["version"] == 2  # from the cache now
    assert (app.stats.timeouts, app.stats.loads, app.stats.cache_hits) == (1, 2, 1)


async def test_cache_ttl_never_keeps_a_load_that_found_no_slot() -> None:
    loader = Gates()
    loader.gate("s1").set()
    app = wrap(loader, cache_ttl=60, max_concurrent_loads=1, queue_timeout=0.2)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(connect_and_hold, app)
            await wait_until(lambda: loader.running == 1)
            async with connect_websocket(app, "/ws/s1") as ws:
                assert await ws.receive_text() == "hello"  # no slot in time: no snapshot
            loader.gate("hold").set()
        async with connect_websocket(app, "/ws/s1") as ws:
            assert (await ws.receive_json())["session"]["id"] == "s1"
    assert loader.calls == ["hold", "s1"]
    assert (app.stats.timeouts, app.stats.cache_hits) == (1, 0)


async def test_a_fresh_resync_during_a_hung_load_waits_it_out_then_loads_itself() -> None:
    # A resync never shares a load that started before it; when that load hangs, the resync
    # waits for its timeout (one failure, not the resync's), then makes its own call.
    loader = Gates()
    sync = SessionSync(loader, timeout=0.3)
    fetcher = sync.fetcher
    results: dict[str, Any] = {}

    async def run(name: str, fresh: bool) -> None:
        results[name] = await fetcher.snapshot(ctx_for("s1"), fresh=fresh)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "stale", False)
            await wait_until(lambda: loader.running == 1)
            tg.start_soon(run, "resync", True)
            await wait_until(lambda: len(loader.calls) == 2)  # after the first timed out
            loader.gate("s1").set()
    assert results["stale"] is FAILED
    assert results["resync"].data is not None
    assert results["resync"].version == 2  # its own call, the second
    assert loader.cancelled == ["s1"]
    assert (sync.stats.timeouts, sync.stats.loads) == (1, 2)
    assert fetcher._slots.value == 64
