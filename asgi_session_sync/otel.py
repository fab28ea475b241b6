"""OpenTelemetry metrics: the middleware's and the NATS bridge's counters, and load latency.

```python
from asgi_session_sync import SessionSyncMiddleware
from asgi_session_sync.otel import SessionSyncMetrics

app = SessionSyncMiddleware(app, loader=load_session, paths=["/ws/sessions/{session_id}"])
metrics = SessionSyncMetrics()  # the global MeterProvider; or meter_provider=...
metrics.observe(app.stats)  # asgi_session_sync.loads, asgi_session_sync.load.duration, ...
metrics.observe(bridge.stats)  # asgi_session_sync.nats.*
```

Every integer counter of a stats object (its ``as_dict()``)
becomes an OpenTelemetry observable counter named ``<namespace>.<counter>``, read from the
object whenever the SDK collects: nothing is added to a connection's path for it. Each duration
the object samples through its ``on_metric`` hook (``"load_seconds"``, one per loader call)
is recorded in a histogram ``<namespace>.<what>.duration``, in seconds, with
:data:`~asgi_session_sync.stats.LATENCY_BUCKETS` as its advised buckets. That hook runs inline
on every counter increment and does nothing but a dict lookup for anything but a duration; an
``on_metric`` hook already set on the object keeps being called after it.

Names follow OpenTelemetry's conventions: dot-separated, counts with a ``{thing}`` unit,
durations in ``s``. A Prometheus exporter turns them into ``asgi_session_sync_loads_total`` and
``asgi_session_sync_load_duration_seconds``.

Install it with ``pip install asgi-session-sync[otel]`` (``opentelemetry-api`` only; your app
chooses the SDK and the exporter).
"""

from __future__ import annotations

import inspect
import re
import weakref
from collections.abc import Callable, Iterable, Mapping
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
from .stats import LATENCY_BUCKETS, MetricHook

__all__ = [
    "DEFAULT_NAMESPACES",
    "DEFAULT_UNIT",
    "INSTRUMENTATION_SCOPE",
    "UNITS",
    "SessionSyncMetrics",
    "StatsSource",
]

INSTRUMENTATION_SCOPE = "asgi_session_sync"
"""The OpenTelemetry meter's name (the instrumentation scope of every instrument)."""

DEFAULT_NAMESPACES: Mapping[str, str] = {
    "SessionSyncStats": "asgi_session_sync",
    "BridgeStats": "asgi_session_sync.nats",
}
"""Metric name prefix for each stats class of this package, by class name."""

UNITS: Mapping[str, str] = {
    "connections": "{connection}",
    "invalid_ids": "{connection}",
    "loads": "{load}",
    "coalesced": "{load}",
    "cache_hits": "{load}",
    "version_loads": "{load}",
    "snapshots_sent": "{snapshot}",
    "skipped_by_resume": "{snapshot}",
    "oversize": "{snapshot}",
    "fenced_frames": "{frame}",
    "errors": "{error}",
    "timeouts": "{timeout}",
}
"""The unit of each counter, as an OpenTelemetry annotation; other counters get ``{event}``."""

DEFAULT_UNIT = "{event}"
"""The unit of a counter that :data:`UNITS` does not name."""

# A stats object that has a histogram keeps its sum as "<what>_seconds_total" and reports each
# sample to on_metric as "<what>_seconds".
_DURATION_SUM = re.compile(r"^(?P<what>\w+)_seconds_total$")

# Meters that a SessionSyncMetrics already owns. The SDK hands a second registration of an
# instrument name the first instrument and drops the new callbacks, so a second owner on the
# same meter would silently report nothing.
_METERS_IN_USE: weakref.WeakSet[Meter] = weakref.WeakSet()


class StatsSource(Protocol):
    """What :meth:`SessionSyncMetrics.observe` reads: any object with ``as_dict()``.

    :class:`~asgi_session_sync.SessionSyncStats` and the NATS bridge's stats qualify. A
    settable ``on_metric`` attribute (``def on_metric(name, value)``), when the object has
    one, feeds the duration histograms.
    """

    def as_dict(self) -> Mapping[str, Any]:
        """Every counter by name: ints are counted, ``*_seconds_total`` sums name histograms."""
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
            stats: The middleware's ``stats``, the bridge's ``stats``, or any object with
                ``as_dict()``.
            namespace: The metric name prefix. Defaults to ``asgi_session_sync`` for the
                middleware's stats and ``asgi_session_sync.nats`` for the bridge's
                (:data:`DEFAULT_NAMESPACES`); required for any other object.
            attributes: Attributes on every measurement of this object, such as
                ``{"app": "chat"}``.

        Raises:
            ValueError: ``stats`` is already observed, or no namespace is known for it.
        """
        if any(stats is observed for observed in self._observed):
            raise ValueError(f"{type(stats).__name__} object is already observed")
        if namespace is None:
            namespace = DEFAULT_NAMESPACES.get(type(stats).__name__)
            if namespace is None:
                raise ValueError(
                    f"no default namespace for {type(stats).__name__}: pass namespace="
                    "(a metric name prefix such as 'myapp.session_sync')"
                )
        source = _Source(stats, attributes or {})
        descriptions = _attribute_docs(type(stats))
        histograms: dict[str, Histogram] = {}
        for field, value in stats.as_dict().items():
            duration = _DURATION_SUM.match(field)
            if duration is not None:
                what = duration["what"]
                histograms[f"{what}_seconds"] = self._histogram(
                    f"{namespace}.{what}.duration",
                    f"Duration of each {what.replace('_', ' ')}.",
                )
            elif type(value) is int:  # not bool, not float sums or maxima, not bucket lists
                self._counter(f"{namespace}.{field}", field, descriptions.get(field, "")).append(
                    source
                )
        self._observed.append(stats)
        if histograms and hasattr(stats, "on_metric"):
            previous: MetricHook | None = getattr(stats, "on_metric")  # noqa: B009
            hook = _recording_hook(histograms, source.attributes, previous)
            setattr(stats, "on_metric", hook)  # noqa: B010 (not part of the StatsSource protocol)

    def _counter(self, name: str, field: str, description: str) -> list[_Source]:
        """The sources of counter ``name``, creating the instrument on first use."""
        sources = self._sources.get(name)
        if sources is None:
            sources = self._sources[name] = []
            self._meter.create_observable_counter(
                name,
                callbacks=[_observe_field(field, sources)],
                unit=UNITS.get(field, DEFAULT_UNIT),
                description=description,
            )
        return sources

    def _histogram(self, name: str, description: str) -> Histogram:
        histogram = self._histograms.get(name)
        if histogram is None:
            histogram = self._histograms[name] = self._meter.create_histogram(
                name,
                unit="s",
                description=description,
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


def _recording_hook(
    histograms: Mapping[str, Histogram],
    attributes: Mapping[str, str],
    previous: MetricHook | None,
) -> MetricHook:
    """An ``on_metric`` hook that records duration samples, then calls ``previous``."""

    def on_metric(name: str, value: float) -> None:
        histogram = histograms.get(name)
        if histogram is not None:
            histogram.record(value, attributes)
        if previous is not None:
            previous(name, value)

    return on_metric


def _attribute_docs(cls: type) -> dict[str, str]:
    """The ``Attributes:`` section of ``cls``'s Google-style docstring, as name -> text."""
    docs: dict[str, str] = {}
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    try:
        start = lines.index("Attributes:") + 1
    except ValueError:
        return docs
    name = None
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break  # the next section
        entry = re.match(r"^ {4}(\w+): (.*)$", line)
        if entry is not None:
            name = entry[1]
            docs[name] = entry[2]
        elif name is not None and line.strip():
            docs[name] += " " + line.strip()
    return docs
