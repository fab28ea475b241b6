from __future__ import annotations

import json
import logging

import pytest

from asgi_session_sync import SessionContext, SessionSyncMiddleware, SessionSyncStats, Snapshot
from asgi_session_sync._types import Receive, Scope, Send
from asgi_session_sync.stats import LATENCY_BUCKETS
from asgi_session_sync.testing import connect_websocket

pytestmark = pytest.mark.anyio


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    await send({"type": "websocket.accept"})
    await receive()


async def test_counters_and_metric_hook_follow_each_connection() -> None:
    reported: list[tuple[str, float]] = []

    async def loader(ctx: SessionContext) -> Snapshot:
        return Snapshot({}, version=1)

    middleware = SessionSyncMiddleware(
        app,
        loader=loader,
        paths=["/ws/{session_id}"],
        on_metric=lambda name, value: reported.append((name, value)),
    )
    async with connect_websocket(middleware, "/ws/s1") as ws:
        await ws.receive_json()
    async with connect_websocket(middleware, "/ws/bad.id"):
        pass
    stats = middleware.stats.as_dict()
    assert stats["connections"] == 1
    assert stats["loads"] == 1
    assert stats["snapshots_sent"] == 1
    assert stats["invalid_ids"] == 1
    assert sum(stats["load_seconds_buckets"]) == 1
    assert json.loads(json.dumps(stats)) == stats
    names = [name for name, _ in reported]
    assert names == ["connections", "loads", "load_seconds", "snapshots_sent", "invalid_ids"]


def test_latency_histogram_buckets() -> None:
    stats = SessionSyncStats()
    for seconds in (0.0005, 0.001, 0.003, 100.0):
        stats.observe_load(seconds)
    assert stats.load_seconds_buckets[0] == 2  # <= 1 ms
    assert stats.load_seconds_buckets[2] == 1  # <= 5 ms
    assert stats.load_seconds_buckets[len(LATENCY_BUCKETS)] == 1  # beyond every bound
    assert stats.load_seconds_max == 100.0


def test_failing_metric_hook_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def broken(name: str, value: float) -> None:
        raise RuntimeError("exporter down")

    stats = SessionSyncStats(on_metric=broken)
    with caplog.at_level(logging.ERROR, logger="asgi_session_sync"):
        stats.incr("loads")
    assert stats.loads == 1
    assert "on_metric hook raised metric=loads" in caplog.text
