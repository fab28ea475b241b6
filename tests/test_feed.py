"""The per-socket feed behind a NATS subscription: ordering, patch chaining, repair, heartbeat.

The feed is backend neutral, so these run on asyncio and trio without a broker; the tests in
test_nats.py and tests/e2e/test_nats_patches.py run the same code behind a real nats-server.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from asgi_session_sync import SessionPatch, SessionUpdate
from asgi_session_sync._feed import HEARTBEAT, SessionFeed, parse_frame
from asgi_session_sync.stats import BridgeStats

pytestmark = pytest.mark.anyio

WAIT = 5.0


def update(version: Any, **session: Any) -> str:
    return SessionUpdate(session_id="s1", session=session, version=version).to_json().decode()


def patch(base: Any, version: Any) -> str:
    operations = [{"op": "replace", "path": "/n", "value": str(version)}]
    event = SessionPatch(session_id="s1", base_version=base, version=version, patch=operations)
    return event.to_json().decode()


class Loader:
    """What ``resync`` loads: a snapshot at ``version``, optionally held until released."""

    def __init__(self, version: Any) -> None:
        self.version = version
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
        return update(self.version, n=str(self.version))


@pytest.fixture
async def stats() -> BridgeStats:
    return BridgeStats()


@asynccontextmanager
async def open_feed(
    stats: BridgeStats, loader: Loader | None = None, version: Any = None
) -> AsyncIterator[SessionFeed]:
    feed = SessionFeed(
        "s1",
        resync=None if loader is None else loader.resync,
        scope=None,
        max_queued=16,
        stats=stats,
    )
    async with feed:
        if version is not None:
            feed.version = version
        yield feed


async def put(feed: SessionFeed, *texts: str) -> None:
    for text in texts:
        frame = parse_frame(text)
        assert not isinstance(frame, str)
        await feed.put(frame)


async def take(feed: SessionFeed, count: int) -> list[tuple[str, Any, Any]]:
    """The next ``count`` frames as (type, base_version, version)."""
    taken = []
    with anyio.fail_after(WAIT):
        for _ in range(count):
            event = json.loads(await feed.__anext__())
            taken.append((event["type"], event.get("base_version"), event.get("version")))
    return taken


async def nothing_more(feed: SessionFeed) -> bool:
    """No frame is waiting: the feed ends cleanly right after the ones already judged."""
    feed.end()
    with anyio.fail_after(WAIT):
        rest = [frame async for frame in feed]
    return rest == []


async def test_patches_chaining_from_the_socket_version_are_forwarded_in_order(
    stats: BridgeStats,
) -> None:
    async with open_feed(stats, version=1) as feed:
        await put(feed, patch(1, 2), patch(2, 3))
        assert await take(feed, 2) == [
            ("session_patch", 1, 2),
            ("session_patch", 2, 3),
        ]
        assert feed.version == 3
    assert stats.patches_forwarded == 2


async def test_patches_not_newer_than_the_socket_are_dropped(stats: BridgeStats) -> None:
    async with open_feed(stats, version=5) as feed:
        await put(feed, patch(3, 4), patch(4, 5), patch(5, 6))
        assert await take(feed, 1) == [("session_patch", 5, 6)]
    assert stats.stale_dropped == 2


async def test_a_lost_patch_resyncs_and_the_patches_chaining_from_the_snapshot_follow(
    stats: BridgeStats,
) -> None:
    loader = Loader(version=3)
    loader.release = anyio.Event()
    async with open_feed(stats, loader, version=1) as feed:
        # 1 -> 2 is lost. 2 -> 3 does not chain: never forwarded; a resync starts.
        await put(feed, patch(2, 3))
        async with anyio.create_task_group() as tg:
            first: list[Any] = []

            async def read_first() -> None:
                first.extend(await take(feed, 1))

            tg.start_soon(read_first)
            with anyio.fail_after(WAIT):
                await loader.started.wait()
            # Patches keep arriving while the snapshot loads; it reads version 3.
            await put(feed, patch(3, 4), patch(4, 5))
            loader.release.set()
        assert first == [("session_update", None, 3)]
        assert await take(feed, 2) == [("session_patch", 3, 4), ("session_patch", 4, 5)]
        assert await nothing_more(feed)
    assert loader.calls == 1
    # All three came before the snapshot, so none chained; only one resync was made.
    assert (stats.gaps, stats.resyncs, stats.snapshots_forwarded) == (3, 1, 1)
    assert stats.stale_dropped == 1  # the held 2 -> 3, which the snapshot holds


async def test_a_patch_while_the_socket_version_is_unknown_is_replaced_by_a_snapshot(
    stats: BridgeStats,
) -> None:
    loader = Loader(version=2)
    async with open_feed(stats, loader) as feed:
        assert feed.version is None
        await put(feed, patch(1, 2), patch(2, 3))
        assert await take(feed, 2) == [("session_update", None, 2), ("session_patch", 2, 3)]
    assert loader.calls == 1


async def test_without_resync_a_patch_that_does_not_chain_is_dropped_and_logged(
    stats: BridgeStats, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_feed(stats, version=1) as feed:
        await put(feed, patch(2, 3), patch(3, 4), update(5))
        assert await take(feed, 1) == [("session_update", None, 5)]
    assert (stats.gaps, stats.patches_unrepaired) == (2, 2)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per subscription, then debug
    assert "cannot chain here (no resync," in warnings[0].message


async def test_a_snapshot_that_does_not_reach_a_held_patch_drops_it(
    stats: BridgeStats,
) -> None:
    # The loader is behind the publisher (a lagging replica): its snapshot is older than the
    # held patch's base. The patch is dropped, not forwarded; the next gap asks again.
    loader = Loader(version=2)
    async with open_feed(stats, loader, version=1) as feed:
        await put(feed, patch(4, 5))
        assert await take(feed, 1) == [("session_update", None, 2)]
        loader.version = 6
        await put(feed, patch(6, 7))
        assert await take(feed, 2) == [("session_update", None, 6), ("session_patch", 6, 7)]
    assert loader.calls == 2
    assert stats.patches_unrepaired == 1


@pytest.fixture
def no_retry_delays(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries of a failed resync at once: the delays are policy, not what these tests check."""
    monkeypatch.setattr("asgi_session_sync._feed.RESYNC_RETRY_DELAYS", (0.0, 0.0, 0.0))


@pytest.mark.usefixtures("no_retry_delays")
async def test_a_failed_resync_is_retried_and_the_held_patch_is_repaired(
    stats: BridgeStats, caplog: pytest.LogCaptureFixture
) -> None:
    loader = Loader(version=3)
    loader.answers = ["not json", None]  # a garbled answer, then a load that failed
    async with open_feed(stats, loader, version=1) as feed:
        await put(feed, patch(2, 3))  # the last patch of a stream: nothing else will follow
        assert await take(feed, 1) == [("session_update", None, 3)]
        await put(feed, patch(3, 4))
        assert await take(feed, 1) == [("session_patch", 3, 4)]
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
    async with open_feed(stats, loader, version=1) as feed:
        await put(feed, patch(2, 3))
        with anyio.fail_after(WAIT), pytest.raises(StopAsyncIteration):
            await feed.__anext__()
    assert (loader.calls, stats.resync_failures, stats.patches_unrepaired) == (4, 4, 1)
    assert any("a gap could not be repaired" in r.message for r in caplog.records)


@pytest.mark.parametrize("snapshot_version", [None, "2026-01-01T00:00:00Z"])
async def test_patches_that_can_never_chain_do_not_reload_the_session_each(
    stats: BridgeStats, snapshot_version: Any
) -> None:
    # A snapshot without a version, or with a timestamp while patches carry ints: no patch can
    # chain on this socket. One resync tries; the rest are dropped without a load each.
    loader = Loader(version=snapshot_version)
    async with open_feed(stats, loader) as feed, anyio.create_task_group() as tg:

        async def publish() -> None:
            for n in range(1, 51):
                await put(feed, patch(n, n + 1))
            await put(feed, update(100))

        tg.start_soon(publish)
        frames: list[tuple[str, Any, Any]] = []
        while ("session_update", None, 100) not in frames:
            frames += await take(feed, 1)
    assert frames[-1] == ("session_update", None, 100)
    assert loader.calls == 1
    assert stats.patches_forwarded == 0


async def test_reordered_patches_are_forwarded_in_chain_order(stats: BridgeStats) -> None:
    loader = Loader(version=3)
    loader.release = anyio.Event()
    async with open_feed(stats, loader, version=1) as feed:
        await put(feed, patch(2, 3), patch(1, 2))
        assert await take(feed, 2) == [("session_patch", 1, 2), ("session_patch", 2, 3)]
        await put(feed, patch(3, 4))
        assert await take(feed, 1) == [("session_patch", 3, 4)]
    assert (stats.gaps, stats.patches_forwarded, loader.calls) == (1, 3, 1)


async def test_full_updates_order_by_version_and_patches_chain_from_them(
    stats: BridgeStats,
) -> None:
    async with open_feed(stats, version=3) as feed:
        await put(feed, update(2), update(3), update(5), patch(5, 6), update(4), patch(6, 7))
        assert await take(feed, 3) == [
            ("session_update", None, 5),
            ("session_patch", 5, 6),
            ("session_patch", 6, 7),
        ]
    assert (stats.updates_forwarded, stats.patches_forwarded, stats.stale_dropped) == (1, 2, 3)


BIG = 2**64


async def test_versions_beyond_2_53_chain_exactly(stats: BridgeStats) -> None:
    async with open_feed(stats, version=BIG) as feed:
        await put(feed, patch(BIG - 1, BIG), patch(BIG, BIG + 1), patch(BIG + 1, BIG + 2))
        assert await take(feed, 2) == [
            ("session_patch", str(BIG), str(BIG + 1)),
            ("session_patch", str(BIG + 1), str(BIG + 2)),
        ]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[1]", "not a JSON object"),
        ("{", "not JSON"),
        ('{"type": "session_patch", "version": 2, "patch": []}', "without a base_version"),
        ('{"type": "session_patch", "base_version": 1, "version": 2}', "not a list"),
    ],
)
def test_invalid_frames_are_named(text: str, reason: str) -> None:
    parsed = parse_frame(text)
    assert isinstance(parsed, str)
    assert reason in parsed


# The heartbeat.


class Socket:
    """The two ends ``forward`` needs, recording when each frame was sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, str]] = []
        self.heartbeat_sent = anyio.Event()
        self.to_app_send, self.to_app = anyio.create_memory_object_stream[dict[str, Any]](4)

    async def send_text(self, text: str) -> None:
        self.sent.append((anyio.current_time(), text))
        if text == HEARTBEAT:
            self.heartbeat_sent.set()

    async def wait_for_heartbeat(self) -> float:
        self.heartbeat_sent = anyio.Event()
        with anyio.fail_after(WAIT):
            await self.heartbeat_sent.wait()
        return self.sent[-1][0]

    async def disconnect(self) -> None:
        await self.to_app_send.send({"type": "websocket.disconnect", "code": 1000})


@pytest.fixture
def socket() -> Iterator[Socket]:
    socket = Socket()
    with socket.to_app_send, socket.to_app:
        yield socket


async def test_a_heartbeat_follows_every_period_of_quiet(
    stats: BridgeStats, socket: Socket
) -> None:
    period = 0.05
    async with open_feed(stats, version=1) as feed, anyio.create_task_group() as tg:
        started = anyio.current_time()
        tg.start_soon(
            lambda: feed.forward(socket.send_text, socket.to_app.receive, heartbeat=period)
        )
        first = await socket.wait_for_heartbeat()
        second = await socket.wait_for_heartbeat()
        assert first - started >= period
        assert second - first >= period
        # A frame resets the quiet: the next heartbeat comes a full period after it.
        await put(feed, patch(1, 2))
        third = await socket.wait_for_heartbeat()
        [patch_sent_at] = [at for at, text in socket.sent if text != HEARTBEAT]
        assert third - patch_sent_at >= period
        await socket.disconnect()
    assert json.loads(HEARTBEAT) == {"type": "heartbeat"}
    assert stats.heartbeats == 3


async def test_a_busy_socket_carries_no_heartbeats(stats: BridgeStats, socket: Socket) -> None:
    period = 0.5
    async with open_feed(stats, version=0) as feed, anyio.create_task_group() as tg:
        tg.start_soon(
            lambda: feed.forward(socket.send_text, socket.to_app.receive, heartbeat=period)
        )
        started = anyio.current_time()
        version = 0
        # A frame every tenth of the period, for two periods.
        while anyio.current_time() - started < 2 * period:
            await put(feed, patch(version, version + 1))
            version += 1
            await anyio.sleep(period / 10)  # pacing the publisher, not synchronisation
        await put(feed, patch(version, version + 1))
        await socket.wait_for_heartbeat()  # once quiet, it comes
        await socket.disconnect()
    heartbeats = [at for at, text in socket.sent if text == HEARTBEAT]
    last_frame = max(at for at, text in socket.sent if text != HEARTBEAT)
    assert len(heartbeats) == 1
    assert heartbeats[0] - last_frame >= period


@pytest.mark.parametrize("heartbeat", [0, -1.0])
async def test_heartbeat_must_be_positive(
    stats: BridgeStats, socket: Socket, heartbeat: float
) -> None:
    async with open_feed(stats) as feed:
        with pytest.raises(ValueError, match="heartbeat must be positive"):
            await feed.forward(socket.send_text, socket.to_app.receive, heartbeat=heartbeat)


async def test_stats_report_every_increment_and_export_as_a_dict() -> None:
    reported: list[tuple[str, float]] = []
    stats = BridgeStats(on_metric=lambda name, value: reported.append((name, value)))
    async with open_feed(stats, version=1) as feed:
        await put(feed, patch(1, 2), patch(1, 2))
        await take(feed, 1)
    assert reported == [("patches_forwarded", 1)]
    exported = stats.as_dict()
    assert "on_metric" not in exported
    assert exported["patches_forwarded"] == 1
    assert json.loads(json.dumps(exported)) == exported
