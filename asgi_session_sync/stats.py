"""Counters a user can read and export, with no metrics dependency."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

__all__ = ["LATENCY_BUCKETS", "BridgeStats", "MetricHook", "SessionSyncStats"]

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


class _Counters:
    """What every counters object shares: ``incr``, the ``on_metric`` hook and ``as_dict``."""

    on_metric: MetricHook | None
    __dataclass_fields__: ClassVar[dict[str, Any]]  # the subclasses are dataclasses

    def incr(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to the counter ``name`` and report it to ``on_metric``."""
        setattr(self, name, getattr(self, name) + amount)
        if self.on_metric is not None:
            self._report(name, amount)

    def _report(self, name: str, value: float) -> None:
        assert self.on_metric is not None
        try:
            self.on_metric(name, value)
        except Exception:
            logger.exception("on_metric hook raised metric=%s", name)

    def as_dict(self) -> dict[str, Any]:
        """Return every counter as a plain dict, ready for JSON or a metrics exporter."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "on_metric"}


@dataclass
class SessionSyncStats(_Counters):
    """What the middleware did since it was created; read it, or export it with ``on_metric``.

    Attributes:
        connections: WebSocket connections on a served path with a valid session id.
        invalid_ids: Connections on a served path whose session id was missing or refused.
        loads: Loader calls actually made (after single-flight and the cache).
        coalesced: Loads that joined another connection's in-flight load instead of calling.
        cache_hits: Loads answered from the opt-in TTL cache.
        version_loads: ``version_loader`` calls actually made.
        snapshots_sent: Snapshot frames sent.
        skipped_by_resume: Snapshots not sent because the client's ``since`` was current.
        fenced_frames: App frames dropped because they were not newer than the snapshot.
        errors: Loads (snapshot or version) that raised, returned something unusable or could
            not be serialised, and ``authenticate`` calls that raised.
        timeouts: Waits for a snapshot or a version load that ran past ``timeout``; a resuming
            connection can count twice.
        oversize: Snapshots over ``max_bytes``, not sent.
        disconnects_during_load: Clients that left while their snapshot was loading.
        load_seconds_total: Sum of the durations of the loader calls made.
        load_seconds_max: The longest loader call.
        load_seconds_buckets: Histogram of loader call durations: item ``i`` counts the calls
            that took at most ``LATENCY_BUCKETS[i]`` and longer than the bound before it; the
            last item counts the calls longer than every bound.
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
    disconnects_during_load: int = 0
    load_seconds_total: float = 0.0
    load_seconds_max: float = 0.0
    load_seconds_buckets: list[int] = field(
        default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1)
    )
    on_metric: MetricHook | None = field(default=None, repr=False, compare=False)

    def observe_load(self, seconds: float) -> None:
        """Record the duration of one loader call."""
        self.load_seconds_total += seconds
        self.load_seconds_max = max(self.load_seconds_max, seconds)
        self.load_seconds_buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        if self.on_metric is not None:
            self._report("load_seconds", seconds)


@dataclass
class BridgeStats(_Counters):
    """What a :class:`~asgi_session_sync.nats.NatsBridge` did since it was created.

    The same shape as :class:`SessionSyncStats`: read the fields, call ``as_dict()``, or
    pass ``on_metric`` to the bridge to see every increment.

    Attributes:
        subscriptions: Subscriptions entered.
        updates_forwarded: Full-state frames (and other non-patch frames) handed to sockets.
        patches_forwarded: Patches handed to sockets; each chained from the socket's version.
        snapshots_forwarded: Resync snapshots handed to sockets.
        stale_dropped: Frames dropped because the socket already had their version or a newer
            one (updates, patches and resync snapshots).
        gaps: Patches that did not chain from the socket's version (a patch before them was
            lost, or they overlap it). None is ever forwarded; each one leads to a resync.
        patches_unrepaired: Of those, patches dropped for good: no ``resync`` was given, the
            holding buffer was full, or the resynced state did not reach their base.
        resyncs: Resync loads made (after a gap, a reconnect, a slow-consumer drop, or at the
            app's request).
        resync_failures: Resyncs that raised, returned nothing or returned text that is not a
            JSON object.
        reconnects: Reconnects to NATS.
        slow_consumer_drops: Messages NATS dropped because a subscription fell behind.
        heartbeats: Heartbeat frames sent by ``forward``.
        invalid_messages: Messages dropped because they are not JSON objects, or are patches
            without both versions and a list of operations.
    """

    subscriptions: int = 0
    updates_forwarded: int = 0
    patches_forwarded: int = 0
    snapshots_forwarded: int = 0
    stale_dropped: int = 0
    gaps: int = 0
    patches_unrepaired: int = 0
    resyncs: int = 0
    resync_failures: int = 0
    reconnects: int = 0
    slow_consumer_drops: int = 0
    heartbeats: int = 0
    invalid_messages: int = 0
    on_metric: MetricHook | None = field(default=None, repr=False, compare=False)
