"""The hub: one broker subscription per session per process, bounded streams, one cursor each.

The first part drives a :class:`~asgi_session_sync.hub.Hub` through an in-memory broker (the
hub's ``Backend`` protocol is all it needs), so ordering, repair and heartbeats run on asyncio
and trio. The second part runs the same hub behind :class:`~asgi_session_sync.nats.NatsBridge`
and a real nats-server: fan-out parsed once, byte bounds under stalled consumers, frames
refused for the wrong session or owner, a poisoned version, and an adopted client's restart.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import jsonpatch
import nats
import pytest
from conftest import MonitoredNats

import asgi_session_sync.nats
from asgi_session_sync import SessionContext, SessionSocket, SessionSync, Snapshot
from asgi_session_sync.hub import Hub, SessionStream
from asgi_session_sync.nats import EmbeddedNats, NatsBridge
from asgi_session_sync.protocol import (
    HEARTBEAT,
    MAX_VERSION,
    SessionPatch,
    SessionUpdate,
    parse_frame,
)
from asgi_session_sync.stats import BridgeStats

pytestmark = pytest.mark.anyio

WAIT = 5.0
# nats-py runs on asyncio only: the tests behind a real nats-server run there alone.
asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])


def update(
    version: int | None, *, reset: bool = False, session_id: str = "s1", **session: Any
) -> str:
    event = SessionUpdate(
        session_id=session_id, session=session, version=version, reset=True if reset else None
    )
    return event.to_json().decode()


def patch(base: int, version: int, *, value: str | None = None) -> str:
    """A patch of ``s1`` from ``base`` to ``version`` that sets ``/n`` (to ``value`` if given)."""
    operations = [{"op": "replace", "path": "/n", "value": value or str(version)}]
    event = SessionPatch(session_id="s1", base_version=base, version=version, patch=operations)
    return event.to_json().decode()


async def wait_until(condition: Callable[[], bool]) -> None:
    """Let other tasks run until ``condition`` holds; for state no event announces."""
    with anyio.fail_after(WAIT):
        while not condition():
            await anyio.lowlevel.checkpoint()


# --------------------------------------------------------------------------------------------
# The hub behind an in-memory broker
# --------------------------------------------------------------------------------------------


class MemoryBroker:
    """The hub's backend in memory: a subject is a session id, publishing delivers at once."""

    def __init__(self) -> None:
        self.subscribers: dict[str, Callable[[bytes], None]] = {}
        self.subscribes = 0

    async def subscribe_subject(
        self, session_id: str, deliver: Callable[[bytes], None]
    ) -> Callable[[], Any]:
        assert session_id not in self.subscribers, "a second subscription for one session"
        self.subscribers[session_id] = deliver
        self.subscribes += 1

        async def unsubscribe() -> None:
            del self.subscribers[session_id]

        return unsubscribe

    async def catch_up(self, session_id: str, version: int) -> bytes | None:
        return None  # no producer streams into these sessions

    def publish(self, session_id: str, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        self.subscribers[session_id](data)


class Loader:
    """What ``resync`` loads: a reset snapshot at ``version``, optionally held until released."""

    def __init__(self, version: int | None, *, session_id: str = "s1") -> None:
        self.version = version
        self.session_id = session_id
        self.calls = 0
        self.started = anyio.Event()
        self.release: anyio.Event | None = None
        self.answers: list[str | None] = []  # what the next calls return, before snapshots

    async def resync(self) -> str | None:
        self.calls += 1
        self.started.set()
        if self.release is not None:
            await self.release.wait()
        if self.answers:
            return self.answers.pop(0)
        return update(self.version, reset=True, session_id=self.session_id, n=str(self.version))


class Rig:
    """One hub on an in-memory broker, its counters, and a stream of session ``s1``."""

    def __init__(
        self,
        stats: BridgeStats,
        *,
        max_socket_bytes: int = 1 << 20,
        max_process_bytes: int = 16 << 20,
        broker: MemoryBroker | None = None,
    ) -> None:
        self.broker = MemoryBroker() if broker is None else broker
        self.stats = stats
        self.hub = Hub(
            self.broker,
            stats=stats,
            max_socket_bytes=max_socket_bytes,
            max_process_bytes=max_process_bytes,
            max_concurrent_resyncs=4,
        )

    def put(self, *texts: str) -> None:
        for text in texts:
            self.broker.publish("s1", text)


@pytest.fixture
def stats() -> BridgeStats:
    return BridgeStats()


@asynccontextmanager
async def open_stream(
    stats: BridgeStats, loader: Loader | None = None, version: int | None = None
) -> AsyncIterator[tuple[Rig, SessionStream]]:
    rig = Rig(stats)
    async with rig.hub.subscribe("s1") as stream:
        if version is not None:
            stream.version = version
        if loader is not None:
            stream.set_resync(loader.resync)
        yield rig, stream


async def take(stream: SessionStream, count: int) -> list[tuple[str, Any, Any]]:
    """The next ``count`` frames as (type, base_version, version)."""
    taken = []
    with anyio.fail_after(WAIT):
        for _ in range(count):
            event = json.loads(await stream.__anext__())
            taken.append((event["type"], event.get("base_version"), event.get("version")))
    return taken


async def nothing_more(stream: SessionStream) -> bool:
    """No frame is waiting: the stream ends cleanly right after the ones already judged."""
    stream.end()
    with anyio.fail_after(WAIT):
        rest = [frame async for frame in stream]
    return rest == []


async def test_patches_chaining_from_the_socket_version_are_forwarded_in_order(
    stats: BridgeStats,
) -> None:
    async with open_stream(stats, version=1) as (rig, stream):
        rig.put(patch(1, 2), patch(2, 3))
        assert await take(stream, 2) == [
            ("session_patch", 1, 2),
            ("session_patch", 2, 3),
        ]
        assert stream.version == 3
    assert stats.patches_forwarded == 2


async def test_a_reader_cancelled_as_it_is_woken_leaves_the_stream_neither_stuck_nor_spinning(
    stats: BridgeStats,
) -> None:
    # The stream's wake-up is reused: a reader cancelled as a frame wakes it, and frames offered
    # while nobody reads, must leave the next reader every frame, in order, and then waiting.
    async with open_stream(stats, version=1) as (rig, stream):
        read: list[tuple[str, Any, Any]] = []

        async def read_one() -> None:
            read.extend(await take(stream, 1))

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_one)
            for _ in range(3):
                await anyio.lowlevel.checkpoint()  # the reader waits
            rig.put(patch(1, 2))  # wakes it ...
            tg.cancel_scope.cancel()  # ... and it is cancelled: it may or may not have read
        rig.put(patch(2, 3), patch(3, 4))  # more wake-ups, no reader
        read += await take(stream, 3 - len(read))
        assert read == [("session_patch", 1, 2), ("session_patch", 2, 3), ("session_patch", 3, 4)]

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_one)
            for _ in range(3):
                await anyio.lowlevel.checkpoint()  # any wake-up left over has come and gone
            assert len(read) == 3  # nothing to read: it waits
            rig.put(patch(4, 5))
        assert read[3:] == [("session_patch", 4, 5)]
        assert await nothing_more(stream)


async def test_patches_not_newer_than_the_socket_are_dropped(stats: BridgeStats) -> None:
    async with open_stream(stats, version=5) as (rig, stream):
        rig.put(patch(3, 4), patch(4, 5), patch(5, 6))
        assert await take(stream, 1) == [("session_patch", 5, 6)]
    assert stats.stale_dropped == 2


async def test_a_lost_patch_resyncs_and_the_patches_chaining_from_the_snapshot_follow(
    stats: BridgeStats,
) -> None:
    loader = Loader(version=3)
    loader.release = anyio.Event()
    async with open_stream(stats, loader, version=1) as (rig, stream):
        # 1 -> 2 is lost. 2 -> 3 does not chain: never forwarded; a resync starts.
        rig.put(patch(2, 3))
        async with anyio.create_task_group() as tg:
            first: list[Any] = []

            async def read_first() -> None:
                first.extend(await take(stream, 1))

            tg.start_soon(read_first)
            with anyio.fail_after(WAIT):
                await loader.started.wait()
            # Patches keep arriving while the snapshot loads; it reads version 3.
            rig.put(patch(3, 4), patch(4, 5))
            loader.release.set()
        assert first == [("session_update", None, 3)]
        assert await take(stream, 2) == [("session_patch", 3, 4), ("session_patch", 4, 5)]
        assert await nothing_more(stream)
    assert loader.calls == 1
    # The patches that arrived during the load waited in the queue and chained from the
    # snapshot; one resync was made, for the one gap.
    assert (stats.gaps, stats.resyncs, stats.snapshots_forwarded) == (1, 1, 1)
    assert stats.patches_forwarded == 2


async def test_a_patch_while_the_socket_version_is_unknown_is_replaced_by_a_snapshot(
    stats: BridgeStats,
) -> None:
    loader = Loader(version=2)
    async with open_stream(stats, loader) as (rig, stream):
        assert stream.version is None
        rig.put(patch(1, 2), patch(2, 3))
        assert await take(stream, 2) == [("session_update", None, 2), ("session_patch", 2, 3)]
    assert loader.calls == 1


async def test_without_resync_a_patch_that_does_not_chain_is_dropped_and_logged(
    stats: BridgeStats, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_stream(stats, version=1) as (rig, stream):
        rig.put(patch(2, 3), patch(3, 4), update(5))
        assert await take(stream, 1) == [("session_update", None, 5)]
    assert (stats.gaps, stats.patches_unrepaired) == (2, 2)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings
    assert all("there is no resync session_id=s1" in r.getMessage() for r in warnings)


@pytest.mark.usefixtures("no_retry_delays")
async def test_a_snapshot_that_does_not_reach_a_held_patch_is_loaded_again(
    stats: BridgeStats,
) -> None:
    # The loader is behind the publisher (a lagging replica): its first snapshot is older
    # than the held patch's base. The patch waits, and the next load, caught up, releases it.
    loader = Loader(version=4)  # caught up by the second load
    loader.answers = [update(2, reset=True, n="2")]  # the first load: behind
    async with open_stream(stats, loader, version=1) as (rig, stream):
        rig.put(patch(4, 5))
        assert await take(stream, 3) == [
            ("session_update", None, 2),
            ("session_update", None, 4),
            ("session_patch", 4, 5),
        ]
    assert loader.calls == 2
    assert stats.patches_unrepaired == 0


@pytest.fixture
def no_retry_delays(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries of a failed resync at once: the delays are policy, not what these tests check."""
    monkeypatch.setattr("asgi_session_sync.hub.RESYNC_RETRY_DELAYS", (0.0, 0.0, 0.0))


@pytest.mark.usefixtures("no_retry_delays")
async def test_a_failed_resync_is_retried_and_the_held_patch_is_repaired(
    stats: BridgeStats, caplog: pytest.LogCaptureFixture
) -> None:
    loader = Loader(version=3)
    loader.answers = ["not json", None]  # a garbled answer, then a load that failed
    async with open_stream(stats, loader, version=1) as (rig, stream):
        rig.put(patch(2, 3))  # the last patch of a stream: nothing else will follow
        assert await take(stream, 1) == [("session_update", None, 3)]
        rig.put(patch(3, 4))
        assert await take(stream, 1) == [("session_patch", 3, 4)]
    assert (loader.calls, stats.resync_failures, stats.patches_unrepaired) == (3, 2, 0)
    assert any("resync returned text that is not a snapshot" in r.message for r in caplog.records)


@pytest.mark.usefixtures("no_retry_delays")
async def test_a_gap_no_resync_can_repair_ends_the_stream(
    stats: BridgeStats, caplog: pytest.LogCaptureFixture
) -> None:
    # Every retry failed: the socket cannot be repaired in place, so the iteration ends, the
    # endpoint returns, and the client reconnects with since.
    loader = Loader(version=3)
    loader.answers = [None, None, None, None]
    async with open_stream(stats, loader, version=1) as (rig, stream):
        rig.put(patch(2, 3))
        with anyio.fail_after(WAIT), pytest.raises(StopAsyncIteration):
            await stream.__anext__()
    assert (loader.calls, stats.resync_failures, stats.patches_unrepaired) == (4, 4, 1)
    assert any("the socket could not be repaired" in r.message for r in caplog.records)


@pytest.mark.usefixtures("no_retry_delays")
async def test_a_loader_that_stays_behind_the_held_patch_ends_the_stream(
    stats: BridgeStats, caplog: pytest.LogCaptureFixture
) -> None:
    # 5 -> 6 was lost and 6 -> 7 is held; every load (a lagging replica) still reads 5. Sent
    # the snapshot at 5 and nothing after, the client would stay at 5 for good while the
    # database is at 7 and the session goes quiet: the stream ends, so the client reconnects.
    loader = Loader(version=5)
    async with open_stream(stats, loader, version=5) as (rig, stream):
        rig.put(patch(6, 7))
        with anyio.fail_after(WAIT):
            assert [text async for text in stream] == []
    assert (loader.calls, stats.resync_failures, stats.patches_unrepaired) == (4, 0, 1)
    assert any("the socket could not be repaired" in r.message for r in caplog.records)


async def test_patches_that_can_never_chain_do_not_reload_the_session_each(
    stats: BridgeStats,
) -> None:
    # A snapshot without a version: no patch can chain on this socket. One resync tries; the
    # rest are dropped without a load each.
    loader = Loader(version=None)
    async with open_stream(stats, loader) as (rig, stream), anyio.create_task_group() as tg:

        async def publish() -> None:
            for n in range(1, 51):
                rig.put(patch(n, n + 1))
                await anyio.lowlevel.checkpoint()
            rig.put(update(100))

        tg.start_soon(publish)
        frames: list[tuple[str, Any, Any]] = []
        while ("session_update", None, 100) not in frames:
            frames += await take(stream, 1)
    assert frames[-1] == ("session_update", None, 100)
    assert loader.calls == 1
    assert stats.patches_forwarded == 0


async def test_reordered_patches_are_repaired_by_one_snapshot(stats: BridgeStats) -> None:
    # NATS core keeps one publisher's order; should two patches still arrive swapped, the
    # first that does not chain asks the database, and the late one is then stale.
    loader = Loader(version=3)
    async with open_stream(stats, loader, version=1) as (rig, stream):
        rig.put(patch(2, 3), patch(1, 2))
        assert await take(stream, 1) == [("session_update", None, 3)]
        rig.put(patch(3, 4))
        assert await take(stream, 1) == [("session_patch", 3, 4)]
    assert (stats.gaps, stats.patches_forwarded, loader.calls) == (1, 1, 1)


async def test_full_updates_order_by_version_and_patches_chain_from_them(
    stats: BridgeStats,
) -> None:
    async with open_stream(stats, version=3) as (rig, stream):
        rig.put(update(2), update(3), update(5), patch(5, 6), update(4), patch(6, 7))
        assert await take(stream, 3) == [
            ("session_update", None, 5),
            ("session_patch", 5, 6),
            ("session_patch", 6, 7),
        ]
    assert (stats.updates_forwarded, stats.patches_forwarded, stats.stale_dropped) == (1, 2, 3)


async def test_versions_up_to_2_53_minus_1_chain_exactly_and_larger_ones_are_invalid(
    stats: BridgeStats,
) -> None:
    top = MAX_VERSION
    async with open_stream(stats, version=top - 2) as (rig, stream):
        rig.put(patch(top - 3, top - 2), patch(top - 2, top - 1))
        rig.broker.publish(
            "s1",
            json.dumps(
                {
                    "type": "session_patch",
                    "session_id": "s1",
                    "base_version": top - 1,
                    "version": top + 1,
                    "patch": [],
                }
            ),
        )
        rig.put(patch(top - 1, top))
        assert await take(stream, 2) == [
            ("session_patch", top - 2, top - 1),
            ("session_patch", top - 1, top),
        ]
        assert stream.version == top
    assert stats.invalid_messages == 1


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"[1]", "not a JSON object"),
        (b"{", "not JSON"),
        (b"\xff", "not UTF-8"),
        (b'{"type": "session_patch", "version": 2, "patch": []}', "without a base_version"),
        (b'{"type": "session_patch", "base_version": 1, "version": 2}', "not a list"),
        (b'{"type": "session_update", "session_id": "s1", "version": "7"}', "whole number"),
        # Not RFC 8259: JSON.parse in the browser throws on them.
        (b'{"type": "session_update", "session_id": "s1", "session": {"x": NaN}}', "not JSON"),
        (b'{"type": "session_update", "session_id": "s1", "version": Infinity}', "not JSON"),
        (b'{"type": "token", "session_id": "s1", "score": -Infinity}', "not JSON"),
    ],
)
async def test_invalid_messages_are_counted_and_named_and_reach_no_stream(
    stats: BridgeStats, caplog: pytest.LogCaptureFixture, data: bytes, reason: str
) -> None:
    if data != b"\xff":
        parsed = parse_frame(data.decode())
        assert isinstance(parsed, str)
        assert reason in parsed
    async with open_stream(stats, version=1) as (rig, stream):
        rig.broker.publish("s1", data)
        rig.put(update(2))
        assert await take(stream, 1) == [("session_update", None, 2)]
    assert (stats.invalid_messages, stats.frames_parsed) == (1, 2)
    assert any(reason in r.getMessage() for r in caplog.records)


async def test_streams_of_one_session_share_one_subscription_until_the_last_leaves(
    stats: BridgeStats,
) -> None:
    rig = Rig(stats)
    async with AsyncExitStack() as stack:
        streams = [await stack.enter_async_context(rig.hub.subscribe("s1")) for _ in range(3)]
        other = await stack.enter_async_context(rig.hub.subscribe("s2"))
        assert (rig.broker.subscribes, rig.hub.sessions) == (2, 2)
        rig.put(update(1))
        for stream in streams:
            assert await take(stream, 1) == [("session_update", None, 1)]
        assert other._queue == type(other._queue)()
        assert stats.frames_parsed == 1
    assert rig.broker.subscribers == {}
    assert rig.hub.sessions == 0


class SlowBroker(MemoryBroker):
    """An in-memory broker that confirms its first subscription only when told to."""

    def __init__(self) -> None:
        super().__init__()
        self.subscribing = anyio.Event()
        self.confirm = anyio.Event()

    async def subscribe_subject(
        self, session_id: str, deliver: Callable[[bytes], None]
    ) -> Callable[[], Any]:
        self.subscribing.set()
        await self.confirm.wait()
        return await super().subscribe_subject(session_id, deliver)


async def test_a_socket_that_waited_on_a_channel_its_first_socket_left_gets_a_live_one(
    stats: BridgeStats,
) -> None:
    # The first socket subscribes and leaves at once (its client went away during the
    # handshake), dropping the channel a second socket was waiting on: the second must
    # subscribe anew, not stay in a channel no broker subscription feeds.
    rig = Rig(stats, broker=SlowBroker())
    broker = rig.broker
    assert isinstance(broker, SlowBroker)
    received: list[tuple[str, Any, Any]] = []

    async def first() -> None:
        async with rig.hub.subscribe("s1"):
            pass

    async def second() -> None:
        async with rig.hub.subscribe("s1") as stream:
            assert (rig.hub.sessions, "s1" in broker.subscribers) == (1, True), "an orphan"
            rig.put(update(1))
            received.extend(await take(stream, 1))

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        with anyio.fail_after(WAIT):
            await broker.subscribing.wait()
        tg.start_soon(second)
        await anyio.wait_all_tasks_blocked()  # the second waits for the first's subscription
        broker.confirm.set()
    assert received == [("session_update", None, 1)]
    assert broker.subscribes == 2  # the first socket's, then the second's own
    assert (broker.subscribers, rig.hub.sessions) == ({}, 0)


# Byte bounds.


async def test_the_process_bound_resyncs_the_stream_holding_the_most_not_the_next_to_receive(
    stats: BridgeStats,
) -> None:
    # Two sockets of one session stopped reading and fill the process bound; a third socket,
    # of another session, reads at once. Its update must reach it as it is: the process makes
    # room by resyncing a stalled stream (the one holding the most), not the fast one.
    rig = Rig(stats, max_socket_bytes=10_000, max_process_bytes=20_000)
    stalled_loader = Loader(18, session_id="big")
    fast_loader = Loader(2, session_id="fast")
    async with AsyncExitStack() as sockets:
        stalled = [await sockets.enter_async_context(rig.hub.subscribe("big")) for _ in range(2)]
        for stream in stalled:
            stream.version = 0
            stream.set_resync(stalled_loader.resync)
        fast = await sockets.enter_async_context(rig.hub.subscribe("fast"))
        fast.version = 1
        fast.set_resync(fast_loader.resync)
        for version in range(1, 19):
            rig.broker.publish("big", update(version, session_id="big", pad="x" * 420))
        assert rig.hub.queued_bytes > 17_000
        assert stats.slow_consumers == 0

        rig.broker.publish("fast", update(2, session_id="fast", pad="y" * 3000))
        assert rig.hub.queued_bytes <= 20_000
        with anyio.fail_after(WAIT):
            text = await fast.__anext__()
        assert (json.loads(text)["version"], "reset" in json.loads(text)) == (2, False)
        assert fast_loader.calls == 0
        assert stats.slow_consumers == 1
        evicted, kept = sorted(stalled, key=lambda stream: stream.buffered_bytes)
        assert evicted.buffered_bytes == 0
        # The evicted stream is repaired when it reads; the other kept every update.
        assert await take(evicted, 1) == [("session_update", None, 18)]
        assert stalled_loader.calls == 1
        assert await take(kept, 18) == [("session_update", None, v) for v in range(1, 19)]


async def test_a_frame_over_max_socket_bytes_is_replaced_by_a_resync_and_is_not_a_slow_consumer(
    stats: BridgeStats, caplog: pytest.LogCaptureFixture
) -> None:
    # However fast the socket reads, a frame over its bound is never queued: the database's
    # snapshot stands in for it. It is logged, not counted as a slow consumer.
    loader = Loader(version=2)
    rig = Rig(stats, max_socket_bytes=10_000)
    async with rig.hub.subscribe("s1") as stream, anyio.create_task_group() as tg:
        stream.version = 1
        stream.set_resync(loader.resync)
        texts: list[str] = []

        async def read() -> None:
            with anyio.fail_after(WAIT):
                texts.extend([await stream.__anext__() for _ in range(2)])

        tg.start_soon(read)
        await anyio.wait_all_tasks_blocked()  # the reader waits for a frame
        rig.put(update(2, pad="y" * 12_000))
        assert (stream.buffered_bytes, rig.hub.queued_bytes) == (0, 0)
        rig.put(patch(2, 3))
    first, second = (json.loads(text) for text in texts)
    assert (first["version"], first["reset"], first["session"]) == (2, True, {"n": "2"})
    assert (second["base_version"], second["version"]) == (2, 3)
    assert (loader.calls, stats.resyncs, stats.slow_consumers) == (1, 1, 0)
    assert any(
        "a frame of" in r.getMessage() and "over max_socket_bytes=10000" in r.getMessage()
        for r in caplog.records
    )


async def test_frames_a_repair_released_count_against_the_socket_bound(stats: BridgeStats) -> None:
    # 1 -> 2 was lost: the large 2 -> 3 is held; the repair's snapshot (v2) releases it, and
    # the reader stalls right after taking the snapshot. The released patch waits to be sent
    # and counts against the bound with what queues after it.
    bound = 10_000
    loader = Loader(version=2)
    rig = Rig(stats, max_socket_bytes=bound)
    async with rig.hub.subscribe("s1") as stream:
        stream.version = 1
        stream.set_resync(loader.resync)
        rig.put(patch(2, 3, value="z" * 9000))
        assert 9000 < stream.buffered_bytes <= bound  # held for the repair
        first = json.loads(await stream.__anext__())
        assert (first["version"], first["reset"]) == (2, True)
        assert 9000 < stream.buffered_bytes <= bound  # released, due to send
        loader.version = 12  # what the database has by the time the reader resumes
        for version in range(4, 13):
            rig.put(update(version, pad="q" * 900))
            assert stream.buffered_bytes <= bound
            assert rig.hub.queued_bytes == stream.buffered_bytes
        assert stats.slow_consumers == 1
        # Resuming, the reader is repaired to the database's latest; the rest is stale.
        snapshot = json.loads(await stream.__anext__())
        assert (snapshot["version"], snapshot["reset"]) == (12, True)
        assert await nothing_more(stream)
    assert rig.hub.queued_bytes == 0


# The heartbeat, through forward and a socket accepted by SessionSync.


SCOPE = {"type": "websocket", "path": "/ws/sessions/s1", "query_string": b"", "headers": []}


class RecordingSocket:
    """The ASGI side of one WebSocket: records each text frame sent, with when it was sent.

    Once :attr:`stalled`, a send blocks for good (a client that stopped reading).
    """

    def __init__(self) -> None:
        self.sent: list[tuple[float, str]] = []
        self.heartbeat_sent = anyio.Event()
        self.stalled = False
        self.send_blocked = anyio.Event()
        self.to_app_send, self.to_app = anyio.create_memory_object_stream[dict[str, Any]](4)

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] != "websocket.send":
            return
        if self.stalled:
            self.send_blocked.set()
            await anyio.sleep_forever()
        self.sent.append((anyio.current_time(), message["text"]))
        if message["text"] == HEARTBEAT:
            self.heartbeat_sent.set()

    async def accept(self, version: int) -> SessionSocket:
        """Accept through a real SessionSync whose snapshot is at ``version``; forget it."""

        async def load(ctx: SessionContext) -> Snapshot:
            return Snapshot({"n": str(version)}, version=version)

        socket = await SessionSync(load).accept(SCOPE, self.send, "s1")
        assert socket.version == version
        self.sent.clear()
        return socket

    async def wait_for_heartbeat(self) -> float:
        self.heartbeat_sent = anyio.Event()
        with anyio.fail_after(WAIT):
            await self.heartbeat_sent.wait()
        return self.sent[-1][0]

    async def disconnect(self) -> None:
        await self.to_app_send.send({"type": "websocket.disconnect", "code": 1000})


@pytest.fixture
def recording() -> Iterator[RecordingSocket]:
    recording = RecordingSocket()
    with recording.to_app_send, recording.to_app:
        yield recording


async def test_a_heartbeat_follows_every_period_of_quiet(
    stats: BridgeStats, recording: RecordingSocket
) -> None:
    period = 0.05
    socket = await recording.accept(version=1)
    async with open_stream(stats) as (rig, stream), anyio.create_task_group() as tg:
        started = anyio.current_time()
        tg.start_soon(lambda: stream.forward(socket, recording.to_app.receive, heartbeat=period))
        first = await recording.wait_for_heartbeat()
        second = await recording.wait_for_heartbeat()
        assert first - started >= period
        assert second - first >= period
        # A frame resets the quiet: the next heartbeat comes a full period after it.
        rig.put(patch(1, 2))
        third = await recording.wait_for_heartbeat()
        [patch_sent_at] = [at for at, text in recording.sent if text != HEARTBEAT]
        assert third - patch_sent_at >= period
        await recording.disconnect()
    assert json.loads(HEARTBEAT) == {"type": "heartbeat"}
    assert stats.heartbeats == 3


async def test_a_busy_socket_carries_no_heartbeats(
    stats: BridgeStats, recording: RecordingSocket
) -> None:
    period = 0.5
    socket = await recording.accept(version=0)
    async with open_stream(stats) as (rig, stream), anyio.create_task_group() as tg:
        tg.start_soon(lambda: stream.forward(socket, recording.to_app.receive, heartbeat=period))
        started = anyio.current_time()
        version = 0
        # A frame every tenth of the period, for two periods.
        while anyio.current_time() - started < 2 * period:
            rig.put(patch(version, version + 1))
            version += 1
            await anyio.sleep(period / 10)  # pacing the publisher, not synchronisation
        rig.put(patch(version, version + 1))
        await recording.wait_for_heartbeat()  # once quiet, it comes
        await recording.disconnect()
    heartbeats = [at for at, text in recording.sent if text == HEARTBEAT]
    last_frame = max(at for at, text in recording.sent if text != HEARTBEAT)
    assert len(heartbeats) == 1
    assert heartbeats[0] - last_frame >= period
    assert stats.patches_forwarded == version + 1


async def test_heartbeats_do_not_pile_up_behind_a_blocked_send(
    recording: RecordingSocket,
) -> None:
    period = 0.02
    heartbeats: list[float] = []
    pending = anyio.Event()

    def on_metric(name: str, value: float) -> None:
        if name == "heartbeats":
            heartbeats.append(value)
            if len(heartbeats) == 2:
                pending.set()

    stats = BridgeStats(on_metric=on_metric)
    socket = await recording.accept(version=1)
    recording.stalled = True
    async with open_stream(stats) as (rig, stream), anyio.create_task_group() as tg:
        tg.start_soon(lambda: stream.forward(socket, recording.to_app.receive, heartbeat=period))
        with anyio.fail_after(WAIT):
            await recording.send_blocked.wait()  # the first heartbeat, being sent for good
            await pending.wait()  # the second, waiting behind it
        await anyio.sleep(10 * period)  # not synchronisation: ten more periods of quiet
        assert stats.heartbeats == 2
        assert stream.buffered_bytes == rig.hub.queued_bytes == len(HEARTBEAT)
        await recording.disconnect()
    assert recording.sent == []


@pytest.mark.parametrize("heartbeat", [0, -1.0])
async def test_heartbeat_must_be_positive(
    stats: BridgeStats, recording: RecordingSocket, heartbeat: float
) -> None:
    socket = await recording.accept(version=1)
    async with open_stream(stats) as (_, stream):
        with pytest.raises(ValueError, match="heartbeat must be positive"):
            await stream.forward(socket, recording.to_app.receive, heartbeat=heartbeat)


async def test_stats_report_every_increment_and_export_as_a_dict() -> None:
    reported: list[tuple[str, float]] = []
    stats = BridgeStats(on_metric=lambda name, value: reported.append((name, value)))
    async with open_stream(stats, version=1) as (rig, stream):
        rig.put(patch(1, 2), patch(1, 2))
        await take(stream, 1)
    assert reported == [
        ("subscriptions", 1),
        ("frames_parsed", 1),
        ("frames_parsed", 1),
        ("patches_forwarded", 1),
    ]
    exported = stats.as_dict()
    assert "on_metric" not in exported
    assert (exported["patches_forwarded"], exported["frames_parsed"]) == (1, 2)
    assert json.loads(json.dumps(exported)) == exported


# --------------------------------------------------------------------------------------------
# The hub behind NatsBridge and a real nats-server
# --------------------------------------------------------------------------------------------


FAST: dict[str, Any] = {"reconnect_time_wait": 0.1, "connect_timeout": 1, "startup_timeout": 5.0}


class Database:
    """Committed states of session ``s1`` by version: what a resync loads."""

    def __init__(self, state: dict[str, Any], *, owner: str | None = None) -> None:
        self.states = {1: state}
        self.version = 1
        self.owner = owner
        self.loads = 0

    def commit(self, state: dict[str, Any]) -> tuple[list[dict[str, Any]], int, int]:
        """Commit ``state`` as the next version; return its patch, base and version."""
        old = self.states[self.version]
        self.version += 1
        self.states[self.version] = state
        return jsonpatch.make_patch(old, state).patch, self.version - 1, self.version

    async def load(self, ctx: SessionContext) -> Snapshot:
        self.loads += 1
        return Snapshot(self.states[self.version], owner=self.owner, version=self.version)

    async def resync(self) -> str:
        self.loads += 1
        return update_of(self.states[self.version], self.version, owner=self.owner)


def update_of(state: dict[str, Any], version: int, *, owner: str | None = None) -> str:
    event = SessionUpdate(session_id="s1", owner=owner, session=state, version=version, reset=True)
    return event.to_json().decode()


class Browser:
    """What a client holds: applies each frame as the JS client does, checking each step.

    A patch applies only at its base version; a full state only when newer, or when it is a
    ``reset`` snapshot, which replaces whatever the client had.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self.version: int | None = None
        self.state: Any = None
        self.events: list[dict[str, Any]] = []
        self.changed = anyio.Event()

    def receive(self, text: str) -> None:
        event = json.loads(text)
        self.events.append(event)
        if event["type"] == "session_patch":
            assert event["base_version"] == self.version, "a patch for a base the client lacks"
            self.state = jsonpatch.apply_patch(self.state, event["patch"])
        elif event["type"] == "session_update":
            if not event.get("reset") and self.version is not None:
                assert event["version"] > self.version, "a full state that is not newer"
            self.state = event["session"]
        else:
            return
        self.version = event["version"]
        self.changed.set()
        self.changed = anyio.Event()

    async def wait_for(self, version: int) -> None:
        with anyio.fail_after(WAIT):
            while self.version != version:
                await self.changed.wait()

    def is_current(self) -> bool:
        return self.version == self.db.version and self.state == self.db.states[self.version]


class BrowserSocket:
    """The ASGI side of one WebSocket, feeding a :class:`Browser`; optionally stalled."""

    def __init__(self, db: Database) -> None:
        self.browser = Browser(db)
        self.stalled = False
        self.resume = anyio.Event()
        self.to_app_send, self.to_app = anyio.create_memory_object_stream[dict[str, Any]](4)

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] != "websocket.send":
            return
        if self.stalled:
            await self.resume.wait()  # a client that stopped reading: the send blocks
        self.browser.receive(message["text"])

    async def disconnect(self) -> None:
        await self.to_app_send.send({"type": "websocket.disconnect", "code": 1000})


@asynccontextmanager
async def forwarding(
    bridge: NatsBridge, db: Database, *, heartbeat: float | None = None
) -> AsyncIterator[tuple[SessionStream, BrowserSocket]]:
    """One socket of session ``s1`` as the docs write it: subscribe, accept, forward."""
    sock = BrowserSocket(db)
    sync = SessionSync(db.load)
    async with (
        sock.to_app_send,
        sock.to_app,
        bridge.subscribe("s1") as updates,
        anyio.create_task_group() as tg,
    ):
        socket = await sync.accept(SCOPE, sock.send, "s1")
        tg.start_soon(lambda: updates.forward(socket, sock.to_app.receive, heartbeat=heartbeat))
        await wait_until(lambda: updates.version == socket.version)
        yield updates, sock
        await sock.disconnect()


async def next_event(updates: SessionStream) -> dict[str, Any]:
    with anyio.fail_after(WAIT):
        event: dict[str, Any] = json.loads(await updates.__anext__())
    return event


@asyncio_only
async def test_a_hundred_sockets_of_one_session_share_one_subscription_and_one_parse(
    monitored_nats: MonitoredNats,
) -> None:
    updates_count = 20
    async with (
        NatsBridge(monitored_nats.url, **FAST) as bridge,
        NatsBridge(monitored_nats.url, **FAST) as publisher,
        AsyncExitStack() as sockets,
    ):
        streams = [await sockets.enter_async_context(bridge.subscribe("s1")) for _ in range(100)]
        assert bridge.hub.sessions == 1
        assert await monitored_nats.subscriptions("session_sync.s1") == 1
        for version in range(1, updates_count + 1):
            await publisher.publish("s1", {"n": version}, version=version)
        for stream in streams:
            versions = [(await next_event(stream))["version"] for _ in range(updates_count)]
            assert versions == list(range(1, updates_count + 1))
        assert bridge.stats.frames_parsed == updates_count
        assert bridge.stats.updates_forwarded == 100 * updates_count
        assert bridge.stats.subscriptions == 100
    assert bridge.hub.sessions == 0
    assert await monitored_nats.subscriptions("session_sync.s1") == 0


@asyncio_only
async def test_stalled_consumers_of_large_updates_stay_within_the_byte_bounds_then_catch_up(
    nats_server: EmbeddedNats,
) -> None:
    blob = "x" * (512 * 1024)
    max_socket_bytes, max_process_bytes = 2 << 20, 5 << 20
    db = Database({"n": 0, "blob": blob})
    async with (
        NatsBridge(
            nats_server.url,
            max_socket_bytes=max_socket_bytes,
            max_process_bytes=max_process_bytes,
            **FAST,
        ) as bridge,
        NatsBridge(nats_server.url, **FAST) as publisher,
        AsyncExitStack() as sockets,
    ):
        # Three sockets whose consumer never reads, and one whose send blocks for good.
        idle = [await sockets.enter_async_context(bridge.subscribe("s1")) for _ in range(3)]
        for stream in idle:
            stream.version = db.version
            stream.set_resync(db.resync)
        blocked, sock = await sockets.enter_async_context(forwarding(bridge, db))
        sock.stalled = True
        streams = [*idle, blocked]

        peak = 0
        for n in range(1, 41):
            _, _, version = db.commit({"n": n, "blob": blob})
            await publisher.publish("s1", db.states[version], version=version)
            await wait_until(lambda n=n: bridge.stats.frames_parsed == n)  # type: ignore[misc]
            for stream in streams:
                assert stream._queued_bytes >= 0
                assert stream._queued_bytes + stream.cursor.held_bytes <= max_socket_bytes
            assert bridge.hub.queued_bytes == sum(stream._queued_bytes for stream in streams)
            assert 0 <= bridge.hub.queued_bytes <= max_process_bytes
            peak = max(peak, bridge.hub.queued_bytes)
        assert peak > max_socket_bytes  # the streams did hold frames: the bound was reached
        assert bridge.stats.slow_consumers == len(streams)

        # The consumers resume: each gets the database's latest state, then the updates after.
        sock.stalled = False
        sock.resume.set()
        browsers = [Browser(db) for _ in idle]
        for browser in browsers:
            browser.state, browser.version = db.states[1], 1  # the snapshot they were sent
        stalled_at = db.version  # 41: the first state and 40 updates
        async with anyio.create_task_group() as readers:
            for stream, browser in zip(idle, browsers, strict=True):

                async def read(stream: SessionStream = stream, browser: Browser = browser) -> None:
                    async for text in stream:
                        browser.receive(text)

                readers.start_soon(read)
            # Each reader repairs its socket first, then judges the frames queued before it.
            for browser in browsers:
                await browser.wait_for(stalled_at)
                first = browser.events[0]
                assert (first["type"], first.get("reset")) == ("session_update", True)
            await wait_until(lambda: all(stream._queued_bytes == 0 for stream in idle))
            for n in (41, 42):
                _, _, version = db.commit({"n": n, "blob": blob})
                await publisher.publish("s1", db.states[version], version=version)
            for browser in browsers:
                await browser.wait_for(db.version)
                assert browser.is_current()
                versions = [event["version"] for event in browser.events]
                assert versions == [stalled_at, stalled_at + 1, stalled_at + 2]
            for stream in idle:
                stream.end()
        await sock.browser.wait_for(db.version)
        assert sock.browser.is_current()
        assert any(event.get("reset") for event in sock.browser.events)
        assert bridge.hub.queued_bytes == 0


@asyncio_only
async def test_frames_for_another_session_or_owner_or_only_the_server_may_send_are_refused(
    nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database({"title": "mine"}, owner="alice")
    refused = [
        {"type": "session_update", "session_id": "s2", "session": {}, "version": 5},
        {
            "type": "session_update",
            "session_id": "s1",
            "owner": "mallory",
            "session": {},
            "version": 5,
        },
        {"type": "session_update", "session_id": "s1", "session": {}, "version": 5, "reset": True},
        {"type": "session_synced", "session_id": "s1", "version": 5},
        {"type": "session_patch", "base_version": 1, "version": 2, "patch": []},
    ]
    welcome = {
        "type": "session_update",
        "session_id": "s1",
        "owner": "alice",
        "session": {"title": "live"},
        "version": 2,
    }
    async with (
        NatsBridge(nats_server.url, **FAST) as bridge,
        forwarding(bridge, db) as (updates, sock),
    ):
        assert updates.owner == "alice"
        raw = await nats.connect(nats_server.url)
        try:
            for event in [*refused, welcome]:
                await raw.publish("session_sync.s1", json.dumps(event).encode())
            await raw.flush()
        finally:
            await raw.close()
        await sock.browser.wait_for(2)
        # One connection's messages arrive in order: every refused one was judged first.
        assert [event["version"] for event in sock.browser.events] == [1, 2]
        assert sock.browser.state == {"title": "live"}
    assert bridge.stats.refused_frames == len(refused)
    assert bridge.stats.frames_parsed == len(refused) + 1
    assert bridge.stats.updates_forwarded == 1
    assert db.loads == 1  # none of them made the socket resync
    messages = [r.getMessage() for r in caplog.records]
    for reason in ("another session", "another owner", "reset is sent only", "session_synced"):
        assert any(reason in message for message in messages), reason


async def test_a_resync_answered_as_plain_text_still_reaches_the_client_as_a_reset(
    stats: BridgeStats,
) -> None:
    # set_resync documents JSON text as an answer; the snapshot replaces the client's state
    # even when older, so the client must be told (reset), or it keeps its newer state while
    # the patches that follow chain from the older one.
    async def resync() -> str:
        return update(3, n="3")  # a session_update, without reset

    async with open_stream(stats, version=1) as (rig, stream):
        stream.set_resync(resync)
        rig.put(update(5))
        assert await take(stream, 1) == [("session_update", None, 5)]
        stream.request_resync("the app asked")
        snapshot = json.loads(await stream.__anext__())
        assert (snapshot["version"], snapshot.get("reset")) == (3, True)


async def test_an_apps_own_event_naming_another_session_is_refused(stats: BridgeStats) -> None:
    async with open_stream(stats, version=1) as (rig, stream):
        rig.put('{"type": "chat", "session_id": "s2", "text": "for someone else"}')
        rig.put('{"type": "chat", "session_id": "s1", "text": "for s1"}')
        assert json.loads(await stream.__anext__())["text"] == "for s1"
    assert stats.refused_frames == 1


@asyncio_only
async def test_a_poisoned_version_cannot_freeze_a_socket(nats_server: EmbeddedNats) -> None:
    db = Database({"text": ""})
    async with (
        NatsBridge(nats_server.url, **FAST) as bridge,
        forwarding(bridge, db) as (updates, sock),
    ):
        assert sock.browser.version == 1
        # The real publisher refuses such a version before anything is sent.
        listener = await nats.connect(nats_server.url)
        try:
            heard = await listener.subscribe(">")
            await listener.flush()
            for base, version in ((1, 10**62), (1, MAX_VERSION + 1), (10**62, 10**62 + 1)):
                with pytest.raises(ValueError, match="a version is a whole number"):
                    await bridge.publish_patch("s1", [], base_version=base, version=version)
            # A forged (or buggy) message chains from the socket's version to the largest one.
            poison = {
                "type": "session_patch",
                "session_id": "s1",
                "base_version": 1,
                "version": MAX_VERSION,
                "patch": [{"op": "replace", "path": "/text", "value": "poison"}],
            }
            await listener.publish("session_sync.s1", json.dumps(poison).encode())
            await listener.flush()
            message = await heard.next_msg(timeout=WAIT)
            assert json.loads(message.data) == poison  # the first thing that reached NATS
        finally:
            await listener.close()
        await sock.browser.wait_for(MAX_VERSION)
        assert sock.browser.state == {"text": "poison"}

        for token in ("Hel", "lo"):
            operations, base, version = db.commit({"text": db.states[db.version]["text"] + token})
            await bridge.publish_patch("s1", operations, base_version=base, version=version)
        await sock.browser.wait_for(3)
        assert sock.browser.is_current()
        assert sock.browser.state == {"text": "Hello"}
        after_poison = sock.browser.events[2:]
        assert after_poison[0]["type"] == "session_update"
        assert after_poison[0]["reset"] is True
        assert updates.version == 3
    assert db.loads == 2  # the snapshot, then one resync


@asyncio_only
async def test_an_adopted_clients_reconnect_resyncs_its_streams() -> None:
    db = Database({"title": "first"})
    async with AsyncExitStack() as servers:
        first = await servers.enter_async_context(EmbeddedNats())
        client = await nats.connect(
            first.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1, connect_timeout=1
        )
        try:
            async with NatsBridge(client=client) as bridge, bridge.subscribe("s1") as updates:
                updates.version = db.version
                updates.set_resync(db.resync)
                await first.kill()
                db.commit({"title": "changed while NATS was down"})
                restarted = await servers.enter_async_context(
                    EmbeddedNats(port=first.port, user=first.user, password=first.password)
                )
                event = await next_event(updates)
                assert event == json.loads(update_of(db.states[2], 2))
                assert (bridge.stats.reconnects, bridge.stats.resyncs) == (1, 1)

                async with NatsBridge(restarted.url, **FAST) as publisher:
                    await publisher.publish("s1", {"title": "live"}, version=3)
                assert (await next_event(updates))["session"] == {"title": "live"}
            assert client.is_connected  # adopted: the bridge leaves it open
        finally:
            await client.close()


def test_the_bridge_uses_no_private_attribute_of_the_nats_client() -> None:
    source = Path(asgi_session_sync.nats.__file__).read_text()
    assert "client._" not in source
    assert "_client._" not in source
