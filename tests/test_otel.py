"""The OpenTelemetry adapter reports real counters and latencies, read with the SDK's reader."""

from __future__ import annotations

import importlib
import logging
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
    Sum,
)
from opentelemetry.sdk.metrics.export import Metric as Exported

from asgi_session_sync import SessionContext, SessionSyncMiddleware, Snapshot
from asgi_session_sync._types import Receive, Scope, Send
from asgi_session_sync.otel import SessionSyncMetrics
from asgi_session_sync.stats import (
    LATENCY_BUCKETS,
    METRICS,
    BridgeStats,
    Metric,
    MetricHook,
    SessionSyncStats,
)
from asgi_session_sync.testing import connect_websocket

pytestmark = pytest.mark.anyio

LOAD_SECONDS = 0.02  # how long the test loader takes, at least


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    await send({"type": "websocket.accept"})
    await receive()


async def load_session(ctx: SessionContext) -> Snapshot | None:
    await anyio.sleep(LOAD_SECONDS)
    return None if ctx.session_id == "missing" else Snapshot({"title": "t"}, version=1)


def session_sync(on_metric: MetricHook | None = None) -> SessionSyncMiddleware:
    return SessionSyncMiddleware(
        app, loader=load_session, paths=["/ws/{session_id}"], on_metric=on_metric
    )


async def connect(middleware: SessionSyncMiddleware, path: str, *, snapshot: bool) -> None:
    """One real WebSocket conversation: read the snapshot when one is due, then leave."""
    async with connect_websocket(middleware, path) as ws:
        if snapshot:
            assert (await ws.receive_json())["type"] == "session_update"
        await ws.disconnect()


@dataclass
class Telemetry:
    """An SDK MeterProvider whose metrics the test reads in memory."""

    provider: MeterProvider
    reader: InMemoryMetricReader

    def collect(self) -> dict[str, Exported]:
        """Every metric the reader collects now, by name."""
        data = self.reader.get_metrics_data()
        if data is None:  # no instrument yet
            return {}
        return {
            metric.name: metric
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        }


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield Telemetry(provider, reader)
    provider.shutdown()


def counter_values(metric: Exported) -> dict[tuple[tuple[str, Any], ...], float]:
    """A monotonic counter's values, by sorted attribute items."""
    assert isinstance(metric.data, Sum)
    assert metric.data.is_monotonic
    values = {}
    for point in metric.data.data_points:
        assert isinstance(point, NumberDataPoint)
        values[tuple(sorted((point.attributes or {}).items()))] = point.value
    return values


def histogram_point(metric: Exported) -> HistogramDataPoint:
    assert isinstance(metric.data, Histogram)
    [point] = metric.data.data_points
    assert isinstance(point, HistogramDataPoint)
    return point


async def test_every_middleware_counter_is_an_otel_counter_with_the_stats_value(
    telemetry: Telemetry,
) -> None:
    middleware = session_sync()
    SessionSyncMetrics(meter_provider=telemetry.provider).observe(middleware.stats)
    for _ in range(3):
        await connect(middleware, "/ws/s1", snapshot=True)
    await connect(middleware, "/ws/missing", snapshot=False)
    await connect(middleware, "/ws/bad.id", snapshot=False)

    collected = telemetry.collect()
    expected = {
        name: value
        for name, value in middleware.stats.as_dict().items()
        if type(value) is int  # counters; the float sums and buckets are the histogram's
    }
    assert expected["connections"] == 4
    assert expected["loads"] == 4
    assert expected["snapshots_sent"] == 3
    assert expected["invalid_ids"] == 1
    for name, value in expected.items():
        assert counter_values(collected[f"asgi_session_sync.{name}"]) == {(): value}, name
    assert collected["asgi_session_sync.loads"].unit == "{load}"
    assert collected["asgi_session_sync.connections"].unit == "{connection}"
    assert collected["asgi_session_sync.loads"].description == (
        "Loader calls actually made (after single-flight and the cache)."
    )


async def test_counters_follow_later_connections(telemetry: Telemetry) -> None:
    middleware = session_sync()
    SessionSyncMetrics(meter_provider=telemetry.provider).observe(middleware.stats)
    await connect(middleware, "/ws/s1", snapshot=True)
    first = counter_values(telemetry.collect()["asgi_session_sync.snapshots_sent"])
    await connect(middleware, "/ws/s1", snapshot=True)
    second = counter_values(telemetry.collect()["asgi_session_sync.snapshots_sent"])
    assert (first, second) == ({(): 1}, {(): 2})


async def test_each_loader_call_is_recorded_in_the_load_duration_histogram(
    telemetry: Telemetry,
) -> None:
    middleware = session_sync()
    SessionSyncMetrics(meter_provider=telemetry.provider).observe(middleware.stats)
    await connect(middleware, "/ws/s1", snapshot=True)
    await connect(middleware, "/ws/s2", snapshot=True)

    metric = telemetry.collect()["asgi_session_sync.load.duration"]
    point = histogram_point(metric)
    assert metric.unit == "s"
    assert point.count == middleware.stats.loads == 2
    assert point.sum == pytest.approx(middleware.stats.load_seconds_total)
    assert point.min >= LOAD_SECONDS
    assert point.max == pytest.approx(middleware.stats.load_seconds_max)
    assert tuple(point.explicit_bounds) == LATENCY_BUCKETS
    assert list(point.bucket_counts) == middleware.stats.load_seconds_buckets


async def test_an_existing_on_metric_hook_is_still_called(telemetry: Telemetry) -> None:
    reported: list[tuple[str, float]] = []

    def on_metric(name: str, value: float) -> None:
        reported.append((name, value))

    middleware = session_sync(on_metric=on_metric)
    SessionSyncMetrics(meter_provider=telemetry.provider).observe(middleware.stats)
    assert middleware.stats.on_metric is on_metric  # observed beside it, not in its place
    await connect(middleware, "/ws/s1", snapshot=True)

    assert [name for name, _ in reported] == [
        "connections",
        "loads",
        "load_seconds",
        "snapshots_sent",
    ]
    assert histogram_point(telemetry.collect()["asgi_session_sync.load.duration"]).count == 1


async def test_a_failing_existing_hook_is_logged_and_the_sample_still_recorded(
    telemetry: Telemetry, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(name: str, value: float) -> None:
        raise RuntimeError("boom")

    middleware = session_sync(on_metric=broken)
    SessionSyncMetrics(meter_provider=telemetry.provider).observe(middleware.stats)
    with caplog.at_level(logging.ERROR, logger="asgi_session_sync"):
        await connect(middleware, "/ws/s1", snapshot=True)

    assert "on_metric hook raised metric=load_seconds" in caplog.text
    assert histogram_point(telemetry.collect()["asgi_session_sync.load.duration"]).count == 1


async def test_attributes_tell_two_middlewares_apart_and_equal_ones_are_summed(
    telemetry: Telemetry,
) -> None:
    chat, admin, chat_replica = session_sync(), session_sync(), session_sync()
    metrics = SessionSyncMetrics(meter_provider=telemetry.provider)
    metrics.observe(chat.stats, attributes={"app": "chat"})
    metrics.observe(admin.stats, attributes={"app": "admin"})
    metrics.observe(chat_replica.stats, attributes={"app": "chat"})
    await connect(chat, "/ws/s1", snapshot=True)
    await connect(chat_replica, "/ws/s1", snapshot=True)
    await connect(admin, "/ws/bad.id", snapshot=False)

    collected = telemetry.collect()
    assert counter_values(collected["asgi_session_sync.snapshots_sent"]) == {
        (("app", "chat"),): 2,
        (("app", "admin"),): 0,
    }
    assert counter_values(collected["asgi_session_sync.invalid_ids"]) == {
        (("app", "chat"),): 0,
        (("app", "admin"),): 1,
    }
    durations = collected["asgi_session_sync.load.duration"].data
    assert isinstance(durations, Histogram)
    assert {tuple((p.attributes or {}).items()): p.count for p in durations.data_points} == {
        (("app", "chat"),): 2
    }


async def test_every_bridge_counter_is_counted_under_the_nats_namespace(
    telemetry: Telemetry,
) -> None:
    bridge_stats = BridgeStats()
    SessionSyncMetrics(meter_provider=telemetry.provider).observe(bridge_stats)
    for amount, metric in enumerate(BridgeStats.metrics, start=1):
        bridge_stats.incr(metric.name, amount)

    collected = telemetry.collect()
    for amount, metric in enumerate(BridgeStats.metrics, start=1):
        exported = collected[f"asgi_session_sync.nats.{metric.name}"]
        assert counter_values(exported) == {(): amount}, metric.name
        assert (exported.unit, exported.description) == (metric.unit, metric.description)
    assert collected["asgi_session_sync.nats.slow_consumers"].unit == "{socket}"


async def test_a_users_on_metric_receives_every_increment_while_otel_observes(
    telemetry: Telemetry,
) -> None:
    reported: list[tuple[str, float]] = []

    def on_metric(name: str, value: float) -> None:
        reported.append((name, value))

    sync_stats = SessionSyncStats(on_metric=on_metric)
    bridge_stats = BridgeStats(on_metric=on_metric)
    metrics = SessionSyncMetrics(meter_provider=telemetry.provider)
    metrics.observe(sync_stats)
    metrics.observe(bridge_stats)
    assert (sync_stats.on_metric, bridge_stats.on_metric) == (on_metric, on_metric)

    expected: list[tuple[str, float]] = []
    for stats in (sync_stats, bridge_stats):
        for amount, metric in enumerate(stats.metrics, start=1):
            if metric.kind == "counter":
                stats.incr(metric.name, amount)
                expected.append((metric.name, amount))
    for seconds in (0.002, 0.3):
        sync_stats.observe_load(seconds)
        expected.append(("load_seconds", seconds))

    assert reported == expected
    collected = telemetry.collect()
    for namespace, stats in (
        ("asgi_session_sync", sync_stats),
        ("asgi_session_sync.nats", bridge_stats),
    ):
        for metric in stats.metrics:
            if metric.kind == "counter":
                exported = collected[f"{namespace}.{metric.name}"]
                assert counter_values(exported) == {(): getattr(stats, metric.name)}
    point = histogram_point(collected["asgi_session_sync.load.duration"])
    assert point.count == 2
    assert point.sum == pytest.approx(0.302)


async def test_a_hook_set_after_observe_replaces_only_the_users_hook(
    telemetry: Telemetry,
) -> None:
    stats = SessionSyncStats()
    SessionSyncMetrics(meter_provider=telemetry.provider).observe(stats)
    reported: list[str] = []
    stats.on_metric = lambda name, value: reported.append(name)
    stats.observe_load(0.01)
    stats.on_metric = None
    stats.observe_load(0.02)

    assert reported == ["load_seconds"]
    assert histogram_point(telemetry.collect()["asgi_session_sync.load.duration"]).count == 2


class Jobs:
    """A user's own stats object, with its own metrics table."""

    metrics = (Metric("jobs", "worker", "counter", "{job}", "Jobs run."),)

    def __init__(self) -> None:
        self.jobs = 5

    def as_dict(self) -> dict[str, Any]:
        return {"jobs": self.jobs, "ratio": 0.5}

    def add_listener(self, listener: MetricHook) -> None:
        raise AssertionError("a table without histograms needs no listener")


async def test_any_stats_source_is_observed_from_its_own_table(telemetry: Telemetry) -> None:
    SessionSyncMetrics(meter_provider=telemetry.provider).observe(Jobs(), namespace="myapp.sync")
    collected = telemetry.collect()
    assert counter_values(collected["myapp.sync.jobs"]) == {(): 5}
    assert (collected["myapp.sync.jobs"].unit, collected["myapp.sync.jobs"].description) == (
        "{job}",
        "Jobs run.",
    )
    assert "myapp.sync.ratio" not in collected  # not in its table


def test_a_declared_counter_missing_from_as_dict_is_refused(telemetry: Telemetry) -> None:
    class Broken(Jobs):
        def as_dict(self) -> dict[str, Any]:
            return {"jobs": 1.5}

    metrics = SessionSyncMetrics(meter_provider=telemetry.provider)
    with pytest.raises(ValueError, match=r"Broken.as_dict\(\) has no int 'jobs'"):
        metrics.observe(Broken(), namespace="myapp")
    assert telemetry.collect() == {}  # nothing half-registered


GUIDE = Path(__file__).parent.parent / "docs" / "guides" / "metrics.md"
GUIDE_ROW = re.compile(r"^\| `([^`]+)` \| (counter|histogram) \| `([^`]+)` \| (.+) \|$", re.M)


def test_the_metrics_guide_lists_exactly_what_is_exported(telemetry: Telemetry) -> None:
    sync_stats, bridge_stats = SessionSyncStats(), BridgeStats()
    metrics = SessionSyncMetrics(meter_provider=telemetry.provider)
    metrics.observe(sync_stats)
    metrics.observe(bridge_stats)
    sync_stats.observe_load(0.01)  # a histogram with no sample is not collected

    exported = {
        (
            metric.name,
            "histogram" if isinstance(metric.data, Histogram) else "counter",
            metric.unit,
            metric.description,
        )
        for metric in telemetry.collect().values()
    }
    assert len(exported) == len(METRICS)
    assert set(GUIDE_ROW.findall(GUIDE.read_text())) == exported


def test_an_unknown_stats_class_needs_a_namespace(telemetry: Telemetry) -> None:
    metrics = SessionSyncMetrics(meter_provider=telemetry.provider)
    with pytest.raises(ValueError, match="no default namespace for Jobs: pass namespace="):
        metrics.observe(Jobs())


def test_observing_the_same_stats_twice_is_refused(telemetry: Telemetry) -> None:
    middleware = session_sync()
    metrics = SessionSyncMetrics(meter_provider=telemetry.provider)
    metrics.observe(middleware.stats)
    with pytest.raises(ValueError, match="already observed"):
        metrics.observe(middleware.stats, attributes={"app": "other"})


def test_a_second_owner_of_the_same_provider_is_refused(telemetry: Telemetry) -> None:
    # The SDK would give the second owner's counters to the first and drop their callbacks.
    SessionSyncMetrics(meter_provider=telemetry.provider)
    with pytest.raises(ValueError, match="already has a SessionSyncMetrics"):
        SessionSyncMetrics(meter_provider=telemetry.provider)


def test_missing_opentelemetry_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "asgi_session_sync.otel")
    monkeypatch.setitem(sys.modules, "opentelemetry.metrics", None)  # import fails
    with pytest.raises(ImportError, match=r"install asgi-session-sync\[otel\]"):
        importlib.import_module("asgi_session_sync.otel")
