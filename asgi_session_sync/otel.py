"""OpenTelemetry metrics: the middleware's and the NATS bridge's counters, and load latency.

```python
from asgi_session_sync import SessionSyncMiddleware
from asgi_session_sync.otel import SessionSyncMetrics

app = SessionSyncMiddleware(app, loader=load_session, paths=["/ws/sessions/{session_id}"])
metrics = SessionSyncMetrics()  # the global MeterProvider; or meter_provider=...
metrics.observe(app.stats)  # asgi_session_sync.loads, asgi_session_sync.load.duration, ...
metrics.observe(bridge.stats)  # asgi_session_sync.nats.*
```

The instruments come from the stats object's rows of
:data:`~asgi_session_sync.stats.METRICS`, with their units and descriptions. Each counter
becomes an OpenTelemetry observable counter named ``<namespace>.<counter>``, read from the
object's ``as_dict()`` whenever the SDK collects: nothing is added to a connection's path for
it. Each histogram ``<what>_seconds`` becomes a histogram ``<namespace>.<what>.duration``, in
seconds, with :data:`~asgi_session_sync.stats.LATENCY_BUCKETS` as its advised buckets; its
samples arrive through a listener added with the object's ``add_listener``, which does nothing
but a dict lookup for anything but a sample. The object's ``on_metric`` is left alone: a
user's hook keeps being called, and may be replaced later.

Names follow OpenTelemetry's conventions: dot-separated, counts with a ``{thing}`` unit,
durations in ``s``. A Prometheus exporter turns them into ``asgi_session_sync_loads_total`` and
``asgi_session_sync_load_duration_seconds``.

Install it with the ``otel`` extra (``opentelemetry-api`` only; your app
chooses the SDK and the exporter).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

try:
    from opentelemetry.metrics import (
        CallbackOptions,
        Histogram,
        Meter,
        MeterProvider,
        Observation,
        get_meter,
    )
except ImportError as exc:
    raise ImportError("install asgi-session-sync[otel] to use asgi_session_sync.otel") from exc

from . import __version__
from .stats import LATENCY_BUCKETS, Metric, MetricHook

__all__ = [
    "DEFAULT_NAMESPACES",
    "INSTRUMENTATION_SCOPE",
    "SessionSyncMetrics",
    "StatsSource",
]

INSTRUMENTATION_SCOPE = "asgi_session_sync"
"""The OpenTelemetry meter's name (the instrumentation scope of every instrument)."""

DEFAULT_NAMESPACES: Mapping[str, str] = {
    "session_sync": "asgi_session_sync",
    "bridge": "asgi_session_sync.nats",
}
"""Metric name prefix for each component of :data:`~asgi_session_sync.stats.METRICS`."""

# Meters that a SessionSyncMetrics already owns. The SDK hands a second registration of an
# instrument name the first instrument and drops the new callbacks, so a second owner on the
# same meter would silently report nothing.
_METERS_IN_USE: weakref.WeakSet[Meter] = weakref.WeakSet()


class StatsSource(Protocol):
    """What :meth:`SessionSyncMetrics.observe` reads.

    :class:`~asgi_session_sync.stats.SessionSyncStats` and
    :class:`~asgi_session_sync.stats.BridgeStats` qualify. Another object qualifies when it
    declares its own :class:`~asgi_session_sync.stats.Metric` rows, counts them in
    ``as_dict()`` and reports its histogram samples to its listeners.
    """

    @property
    def metrics(self) -> Sequence[Metric]:
        """What the object counts: its rows of a metrics table."""
        ...

    def as_dict(self) -> Mapping[str, Any]:
        """Every field by name: each counter of :attr:`metrics` is an int."""
        ...

    def add_listener(self, listener: MetricHook, /) -> None:
        """Call ``listener(name, value)`` with each sample of a histogram of :attr:`metrics`."""
        ...


class _Source:
    """One observed stats object and the attributes its measurements carry."""

    def __init__(self, stats: StatsSource, attributes: Mapping[str, str]) -> None:
        self.stats = stats
        self.attributes = dict(attributes)
        self.key = tuple(sorted(self.attributes.items()))


class SessionSyncMetrics:
    """OpenTelemetry instruments for asgi-session-sync's stats objects.

    Create one per ``MeterProvider``, then :meth:`observe` each stats object: the middleware's
    ``stats`` and the NATS bridge's ``stats``. Several middlewares may share a namespace; give
    each its own ``attributes`` to tell them apart, or they are summed.

    Args:
        meter_provider: Where the instruments live; the global ``MeterProvider`` when omitted.

    Raises:
        ValueError: Another ``SessionSyncMetrics`` already uses this provider's meter.
    """

    def __init__(self, *, meter_provider: MeterProvider | None = None) -> None:
        self._meter = get_meter(INSTRUMENTATION_SCOPE, __version__, meter_provider=meter_provider)
        if self._meter in _METERS_IN_USE:
            raise ValueError(
                "this MeterProvider already has a SessionSyncMetrics: create one per provider, "
                "at start-up, and observe every stats object through it"
            )
        _METERS_IN_USE.add(self._meter)
        self._sources: dict[str, list[_Source]] = {}  # by counter instrument name
        self._histograms: dict[str, Histogram] = {}  # by histogram instrument name
        self._observed: list[StatsSource] = []

    def observe(
        self,
        stats: StatsSource,
        *,
        namespace: str | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> None:
        """Report ``stats`` through this object's instruments from now on.

        Args:
            stats: The middleware's ``stats``, the bridge's ``stats``, or another
                :class:`StatsSource`.
            namespace: The metric name prefix. Defaults to ``asgi_session_sync`` for the
                middleware's stats and ``asgi_session_sync.nats`` for the bridge's
                (:data:`DEFAULT_NAMESPACES`, by the component of ``stats.metrics``);
                required for any other object.
            attributes: Attributes on every measurement of this object, such as
                ``{"app": "chat"}``.

        Raises:
            ValueError: ``stats`` is already observed, no namespace is known for it, or its
                ``as_dict()`` lacks an int for a counter it declares.
        """
        if any(stats is observed for observed in self._observed):
            raise ValueError(f"{type(stats).__name__} object is already observed")
        metrics = tuple(stats.metrics)
        if namespace is None:
            components = {metric.component for metric in metrics}
            if len(components) == 1:
                namespace = DEFAULT_NAMESPACES.get(components.pop())
            if namespace is None:
                raise ValueError(
                    f"no default namespace for {type(stats).__name__}: pass namespace="
                    "(a metric name prefix such as 'myapp.session_sync')"
                )
        values = stats.as_dict()
        for metric in metrics:
            if metric.kind == "counter" and type(values.get(metric.name)) is not int:
                raise ValueError(
                    f"{type(stats).__name__}.as_dict() has no int {metric.name!r}, "
                    "which its metrics declare as a counter"
                )
        source = _Source(stats, attributes or {})
        histograms: dict[str, Histogram] = {}
        for metric in metrics:
            if metric.kind == "counter":
                self._counter(namespace, metric).append(source)
            else:
                histograms[metric.name] = self._histogram(namespace, metric)
        self._observed.append(stats)
        if histograms:
            stats.add_listener(_recorder(histograms, source.attributes))

    def _counter(self, namespace: str, metric: Metric) -> list[_Source]:
        """The sources of ``metric``'s counter, creating the instrument on first use."""
        name = f"{namespace}.{metric.name}"
        sources = self._sources.get(name)
        if sources is None:
            sources = self._sources[name] = []
            self._meter.create_observable_counter(
                name,
                callbacks=[_observe_field(metric.name, sources)],
                unit=metric.unit,
                description=metric.description,
            )
        return sources

    def _histogram(self, namespace: str, metric: Metric) -> Histogram:
        """``metric``'s histogram, creating the instrument on first use."""
        name = f"{namespace}.{metric.name.removesuffix('_seconds')}.duration"
        histogram = self._histograms.get(name)
        if histogram is None:
            histogram = self._histograms[name] = self._meter.create_histogram(
                name,
                unit=metric.unit,
                description=metric.description,
                explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
            )
        return histogram


def _observe_field(
    field: str, sources: list[_Source]
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    """The callback of one counter: each source's current value, summed per attribute set."""

    def callback(options: CallbackOptions) -> Iterable[Observation]:
        totals: dict[tuple[tuple[str, str], ...], tuple[int, Mapping[str, str]]] = {}
        for source in sources:
            value = source.stats.as_dict().get(field)
            if type(value) is not int:
                continue
            total, attributes = totals.get(source.key, (0, source.attributes))
            totals[source.key] = (total + value, attributes)
        return [Observation(total, attributes) for total, attributes in totals.values()]

    return callback


def _recorder(histograms: Mapping[str, Histogram], attributes: Mapping[str, str]) -> MetricHook:
    """A stats listener that records the samples named in ``histograms``; it ignores the rest."""

    def record(name: str, value: float) -> None:
        histogram = histograms.get(name)
        if histogram is not None:
            histogram.record(value, attributes)

    return record
