from __future__ import annotations

import dataclasses
import json
import logging
import re

import pytest

from asgi_session_sync import SessionContext, SessionSyncMiddleware, Snapshot
from asgi_session_sync._types import Receive, Scope, Send
from asgi_session_sync.stats import (
    LATENCY_BUCKETS,
    METRICS,
    BridgeStats,
    MetricHook,
    SessionSyncStats,
)
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


COUNTERS = (SessionSyncStats, BridgeStats)
BOOKKEEPING = {"on_metric", "_listeners"}  # fields of every stats object that count nothing


@pytest.mark.parametrize("stats_class", COUNTERS)
def test_the_metrics_table_and_the_stats_fields_agree(
    stats_class: type[SessionSyncStats | BridgeStats],
) -> None:
    declared = [name for metric in stats_class.metrics for name in metric.field_names]
    counted = [f.name for f in dataclasses.fields(stats_class) if f.name not in BOOKKEEPING]
    assert counted == declared
    stats = stats_class()
    assert list(stats.as_dict()) == declared
    for metric in stats_class.metrics:
        if metric.kind == "counter":
            assert type(getattr(stats, metric.name)) is int, metric.name
        assert f"    {metric.field_names[0]}: " in (stats_class.__doc__ or ""), metric.name


def test_every_row_of_the_table_belongs_to_a_stats_class_once() -> None:
    claimed = [metric for cls in COUNTERS for metric in cls.metrics]
    assert sorted(claimed, key=METRICS.index) == list(METRICS)
    assert len({(metric.component, metric.name) for metric in METRICS}) == len(METRICS)
    for metric in METRICS:
        assert re.fullmatch(r"s|\{[a-z]+\}", metric.unit), metric
        assert (metric.kind == "histogram") == (metric.unit == "s"), metric
        assert metric.description.endswith("."), metric
        assert "`" not in metric.description, metric  # exporters show it verbatim


def test_the_bridge_counts_what_the_hub_needs() -> None:
    names = {metric.name for metric in BridgeStats.metrics}
    assert {"frames_parsed", "refused_frames", "slow_consumers"} <= names


def test_listeners_hear_every_increment_and_sample_after_on_metric() -> None:
    heard: list[tuple[str, str, float]] = []
    stats = SessionSyncStats(on_metric=lambda name, value: heard.append(("hook", name, value)))
    first: MetricHook = lambda name, value: heard.append(("first", name, value))  # noqa: E731
    stats.add_listener(first)
    stats.add_listener(lambda name, value: heard.append(("second", name, value)))
    stats.incr("loads", 2)
    stats.observe_load(0.5)
    stats.remove_listener(first)
    stats.incr("errors")

    assert heard == [
        ("hook", "loads", 2),
        ("first", "loads", 2),
        ("second", "loads", 2),
        ("hook", "load_seconds", 0.5),
        ("first", "load_seconds", 0.5),
        ("second", "load_seconds", 0.5),
        ("hook", "errors", 1),
        ("second", "errors", 1),
    ]
    with pytest.raises(ValueError, match="not in"):
        stats.remove_listener(first)


def test_a_failing_listener_is_logged_and_the_others_still_hear(
    caplog: pytest.LogCaptureFixture,
) -> None:
    heard: list[str] = []

    def broken(name: str, value: float) -> None:
        raise RuntimeError("exporter down")

    stats = BridgeStats(on_metric=lambda name, value: heard.append(name))
    stats.add_listener(broken)
    stats.add_listener(lambda name, value: heard.append(name))
    with caplog.at_level(logging.ERROR, logger="asgi_session_sync"):
        stats.incr("refused_frames")
    assert stats.refused_frames == 1
    assert heard == ["refused_frames", "refused_frames"]
    assert "metric listener raised metric=refused_frames" in caplog.text
