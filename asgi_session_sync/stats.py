"""Counters a user can read and export, with no metrics dependency.

Every metric is declared once, in :data:`METRICS`: its name, which stats object counts it, its
kind, its unit and what it means. :class:`SessionSyncStats` and :class:`BridgeStats` hold one
field per counter of their component (a test checks that the fields and the table agree), their
``as_dict()`` lists those fields in the table's order, and an exporter such as
:mod:`asgi_session_sync.otel` builds its instruments from the table.
"""

from __future__ import annotations

import bisect
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

__all__ = [
    "LATENCY_BUCKETS",
    "METRICS",
    "BridgeStats",
    "Metric",
    "MetricHook",
    "MetricKind",
    "SessionSyncStats",
]

logger = logging.getLogger("asgi_session_sync")

LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
"""Upper bounds, in seconds, of the load latency histogram (Prometheus' default buckets)."""

MetricHook = Callable[[str, float], object]
"""``def on_metric(name, value)``: called for every counter increment and every latency sample."""

MetricKind = Literal["counter", "histogram"]
"""``"counter"``: an int that only grows. ``"histogram"``: durations in seconds."""


@dataclass(frozen=True)
class Metric:
    """One metric of a stats object: a row of :data:`METRICS`.

    Attributes:
        name: A counter's field in its stats object, and the name ``on_metric`` receives
            with each increment. For a histogram, the name ``on_metric`` receives with each
            sample; the stats object keeps ``<name>_total``, ``<name>_max`` and
            ``<name>_buckets`` (see :attr:`field_names`).
        component: Which stats object counts it: ``"session_sync"`` for
            :class:`SessionSyncStats`, ``"bridge"`` for :class:`BridgeStats`.
        kind: ``"counter"`` or ``"histogram"`` (durations in seconds, bucketed by
            :data:`LATENCY_BUCKETS`).
        unit: The UCUM unit, as OpenTelemetry writes it: ``s`` for seconds, an annotation
            such as ``{connection}`` for a count of things.
        description: What it counts, in one or two plain sentences (no markup): exporters
            show it as the metric's help text.
    """

    name: str
    component: str
    kind: MetricKind
    unit: str
    description: str

    @property
    def field_names(self) -> tuple[str, ...]:
        """The stats object's fields that hold this metric, as ``as_dict()`` names them."""
        if self.kind == "counter":
            return (self.name,)
        return (f"{self.name}_total", f"{self.name}_max", f"{self.name}_buckets")


_SYNC = "session_sync"
_BRIDGE = "bridge"

METRICS: tuple[Metric, ...] = (
    Metric(
        "connections",
        _SYNC,
        "counter",
        "{connection}",
        "WebSocket connections on a served path with a valid session id.",
    ),
    Metric(
        "invalid_ids",
        _SYNC,
        "counter",
        "{connection}",
        "Connections on a served path whose session id was missing or refused.",
    ),
    Metric(
        "loads",
        _SYNC,
        "counter",
        "{load}",
        "Loader calls actually made (after single-flight and the cache).",
    ),
    Metric(
        "coalesced",
        _SYNC,
        "counter",
        "{load}",
        "Loads that joined another connection's in-flight load instead of calling.",
    ),
    Metric("cache_hits", _SYNC, "counter", "{load}", "Loads answered from the opt-in TTL cache."),
    Metric("version_loads", _SYNC, "counter", "{load}", "version_loader calls actually made."),
    Metric("snapshots_sent", _SYNC, "counter", "{snapshot}", "Snapshot frames sent."),
    Metric(
        "skipped_by_resume",
        _SYNC,
        "counter",
        "{snapshot}",
        "Snapshots not sent because the version in the client's since parameter was current.",
    ),
    Metric(
        "fenced_frames",
        _SYNC,
        "counter",
        "{frame}",
        "App frames dropped because they were not newer than the snapshot.",
    ),
    Metric(
        "errors",
        _SYNC,
        "counter",
        "{error}",
        "Loads (snapshot or version) that raised, returned something unusable or could not be "
        "serialised; authenticate and flight_key calls that raised; snapshot sends the server "
        "refused with anything but an OSError.",
    ),
    Metric(
        "timeouts",
        _SYNC,
        "counter",
        "{timeout}",
        "Loads (snapshot or version) whose call ran past timeout, or that found no free slot "
        "within queue_timeout; once per load, however many connections shared it.",
    ),
    Metric("oversize", _SYNC, "counter", "{snapshot}", "Snapshots over max_bytes, not sent."),
    Metric("load_seconds", _SYNC, "histogram", "s", "Duration of each loader call."),
    Metric("subscriptions", _BRIDGE, "counter", "{subscription}", "Subscriptions entered."),
    Metric(
        "frames_parsed",
        _BRIDGE,
        "counter",
        "{message}",
        "Broker messages parsed by the process's hub: one per message, however many sockets "
        "watch the session.",
    ),
    Metric(
        "updates_forwarded",
        _BRIDGE,
        "counter",
        "{frame}",
        "Full-state frames (and other non-patch frames) handed to sockets.",
    ),
    Metric(
        "patches_forwarded",
        _BRIDGE,
        "counter",
        "{patch}",
        "Patches handed to sockets; each chained from the socket's version.",
    ),
    Metric(
        "snapshots_forwarded",
        _BRIDGE,
        "counter",
        "{snapshot}",
        "Resync snapshots handed to sockets.",
    ),
    Metric(
        "stale_dropped",
        _BRIDGE,
        "counter",
        "{frame}",
        "Frames dropped because the socket already had their version or a newer one (updates, "
        "patches and resync snapshots).",
    ),
    Metric(
        "gaps",
        _BRIDGE,
        "counter",
        "{patch}",
        "Patches that did not chain from the socket's version (a patch before them was lost, "
        "or they overlap it). None is ever forwarded; each one leads to a resync.",
    ),
    Metric(
        "patches_unrepaired",
        _BRIDGE,
        "counter",
        "{patch}",
        "Patches that did not chain and were dropped for good: no resync was given, the holding "
        "buffer was full, or the resynced state did not reach their base.",
    ),
    Metric(
        "resyncs",
        _BRIDGE,
        "counter",
        "{resync}",
        "Resync loads made (after a gap, a reconnect, a slow consumer, or at the app's request).",
    ),
    Metric(
        "resync_failures",
        _BRIDGE,
        "counter",
        "{resync}",
        "Resyncs that raised, returned nothing or returned text that is not a JSON object.",
    ),
    Metric(
        "catch_ups",
        _BRIDGE,
        "counter",
        "{request}",
        "Gaps a socket asked the session's producer to fill (a streamed answer ahead of the "
        "socket's snapshot or of a lost patch), instead of loading a snapshot.",
    ),
    Metric(
        "catch_up_failures",
        _BRIDGE,
        "counter",
        "{request}",
        "Catch-ups no producer answered, or answered with a patch that does not chain: the "
        "socket then loads a snapshot.",
    ),
    Metric("reconnects", _BRIDGE, "counter", "{reconnect}", "Reconnects to NATS."),
    Metric(
        "slow_consumer_drops",
        _BRIDGE,
        "counter",
        "{message}",
        "Messages NATS dropped because a subscription fell behind.",
    ),
    Metric(
        "slow_consumers",
        _BRIDGE,
        "counter",
        "{socket}",
        "Sockets whose queue passed its byte bound; they are resynced instead of buffered further.",
    ),
    Metric(
        "heartbeats", _BRIDGE, "counter", "{frame}", "Heartbeat frames sent to sockets by forward."
    ),
    Metric(
        "invalid_messages",
        _BRIDGE,
        "counter",
        "{message}",
        "Messages dropped because they are not JSON objects, or are patches without both "
        "versions and a list of operations.",
    ),
    Metric(
        "refused_frames",
        _BRIDGE,
        "counter",
        "{frame}",
        "Frames refused because they name another session or another owner than the "
        "subscription's.",
    ),
)
"""Every metric of every stats object, in the order of the objects' fields."""


def _attributes_section(metrics: tuple[Metric, ...]) -> str:
    """The Google-style ``Attributes:`` section that documents the fields of ``metrics``."""
    lines = ["", "Attributes:"]
    for metric in metrics:
        if metric.kind == "counter":
            lines.append(f"    {metric.name}: {metric.description} Unit: ``{metric.unit}``.")
            continue
        lines += [
            f"    {metric.name}_total: {metric.description} The sum of the samples, in seconds.",
            f"    {metric.name}_max: The largest ``{metric.name}`` sample, in seconds.",
            f"    {metric.name}_buckets: Histogram of the ``{metric.name}`` samples: item ``i``",
            "        counts the samples at most ``LATENCY_BUCKETS[i]`` and above the bound",
            "        before it; the last item counts the samples above every bound.",
        ]
    return "\n".join(lines)


@dataclass(kw_only=True)
class _Counters:
    """What every stats object shares: ``incr``, ``on_metric``, listeners and ``as_dict``."""

    metrics: ClassVar[tuple[Metric, ...]]
    """This object's rows of :data:`METRICS`."""

    _field_names: ClassVar[tuple[str, ...]]

    on_metric: MetricHook | None = field(default=None, repr=False, compare=False)
    """The user's ``def on_metric(name, value)``: every increment and every sample."""

    _listeners: tuple[MetricHook, ...] = field(default=(), init=False, repr=False, compare=False)

    def __init_subclass__(cls, *, component: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.metrics = tuple(metric for metric in METRICS if metric.component == component)
        cls._field_names = tuple(name for metric in cls.metrics for name in metric.field_names)
        cls.__doc__ = inspect.cleandoc(cls.__doc__ or "") + "\n" + _attributes_section(cls.metrics)

    def incr(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to the counter ``name`` and report it to ``on_metric`` and listeners."""
        setattr(self, name, getattr(self, name) + amount)
        if self.on_metric is not None or self._listeners:
            self._report(name, amount)

    def add_listener(self, listener: MetricHook) -> None:
        """Also call ``listener(name, value)`` for every increment and sample, after ``on_metric``.

        For exporters (:mod:`asgi_session_sync.otel` uses it), so that they never take the
        place of the user's ``on_metric``. A listener that raises is logged and the others are
        still called. It runs inline on a connection's path: keep it fast.
        """
        self._listeners = (*self._listeners, listener)

    def remove_listener(self, listener: MetricHook) -> None:
        """Stop calling ``listener``.

        Raises:
            ValueError: ``listener`` was not added.
        """
        listeners = list(self._listeners)
        listeners.remove(listener)
        self._listeners = tuple(listeners)

    def as_dict(self) -> dict[str, Any]:
        """Return every field of :attr:`metrics` as a plain dict, ready for JSON or an exporter."""
        return {name: getattr(self, name) for name in self._field_names}

    def _report(self, name: str, value: float) -> None:
        if self.on_metric is not None:
            try:
                self.on_metric(name, value)
            except Exception:
                logger.exception("on_metric hook raised metric=%s", name)
        for listener in self._listeners:
            try:
                listener(name, value)
            except Exception:
                logger.exception("metric listener raised metric=%s listener=%r", name, listener)


@dataclass
class SessionSyncStats(_Counters, component="session_sync"):
    """What the middleware did since it was created; read it, or export it with ``on_metric``.

    One field per counter of the ``"session_sync"`` rows of :data:`METRICS` (listed in
    ``docs/guides/metrics.md``), plus ``load_seconds_total``, ``load_seconds_max`` and
    ``load_seconds_buckets`` for the ``load_seconds`` histogram.
    """

    connections: int = 0
    invalid_ids: int = 0
    loads: int = 0
    coalesced: int = 0
    cache_hits: int = 0
    version_loads: int = 0
    snapshots_sent: int = 0
    skipped_by_resume: int = 0
    fenced_frames: int = 0
    errors: int = 0
    timeouts: int = 0
    oversize: int = 0
    load_seconds_total: float = 0.0
    load_seconds_max: float = 0.0
    load_seconds_buckets: list[int] = field(
        default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1)
    )

    def observe_load(self, seconds: float) -> None:
        """Record the duration of one loader call, and report it as ``"load_seconds"``."""
        self.load_seconds_total += seconds
        self.load_seconds_max = max(self.load_seconds_max, seconds)
        self.load_seconds_buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        if self.on_metric is not None or self._listeners:
            self._report("load_seconds", seconds)


@dataclass
class BridgeStats(_Counters, component="bridge"):
    """What a :class:`~asgi_session_sync.nats.NatsBridge` did since it was created.

    The same shape as :class:`SessionSyncStats`: read the fields, call ``as_dict()``, or
    pass ``on_metric`` to the bridge to see every increment. One field per counter of the
    ``"bridge"`` rows of :data:`METRICS` (listed in ``docs/guides/metrics.md``).
    """

    subscriptions: int = 0
    frames_parsed: int = 0
    updates_forwarded: int = 0
    patches_forwarded: int = 0
    snapshots_forwarded: int = 0
    stale_dropped: int = 0
    gaps: int = 0
    patches_unrepaired: int = 0
    resyncs: int = 0
    resync_failures: int = 0
    catch_ups: int = 0
    catch_up_failures: int = 0
    reconnects: int = 0
    slow_consumer_drops: int = 0
    slow_consumers: int = 0
    heartbeats: int = 0
    invalid_messages: int = 0
    refused_frames: int = 0
