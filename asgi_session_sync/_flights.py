"""Single-flight loads: concurrent loads of one key share one call."""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, Literal, TypeVar

import anyio

__all__ = ["Call", "How", "SingleFlight"]

T = TypeVar("T")

How = Literal["loaded", "coalesced", "cached"]

Call = Callable[[float | None], Awaitable[T | None]]
"""A run: ``fn(waiting_since)``, see :meth:`SingleFlight.run`."""


class _Flight(Generic[T]):
    __slots__ = ("done", "ended", "expires", "finished", "result", "serial")

    def __init__(self, serial: int) -> None:
        self.serial = serial  # flights are numbered in the order they start
        # Made by the first waiter: most flights have none, and an Event costs a backend lookup.
        self.done: anyio.Event | None = None
        self.ended = False
        self.finished = False  # False once ended means the leader was cancelled: retry
        self.result: T | None = None
        self.expires = 0.0

    async def wait(self) -> None:
        if not self.ended:
            if self.done is None:
                self.done = anyio.Event()
            await self.done.wait()


class SingleFlight(Generic[T]):
    """Runs at most one call per key at a time; callers that arrive meanwhile share its result.

    The caller that finds no flight for its key is the leader: it runs the call in its own task,
    so the bounds ``fn`` sets on itself (its timeout) end the call for every caller sharing it. A
    waiter that is cancelled just stops waiting; the leader and the other waiters go on. If the
    leader is cancelled, the call is abandoned and one of the waiters becomes the new leader, so
    nobody is left without a load. ``fn`` must not raise ``Exception``: failures (a timeout
    included) are results (``None``, or what ``keep`` refuses), shared like any other with the
    callers in flight, but never cached. A key of ``None`` is never shared and never cached.

    With ``ttl``, a successful result stays in the table for ``ttl`` seconds and answers later
    callers. Entries expire in the order they were made (one ``ttl`` for all), so expiring
    them is a look at the oldest: every call costs O(1) amortised, whatever the table's size.
    """

    def __init__(
        self,
        *,
        ttl: float | None = None,
        keep: Callable[[T], bool] = lambda result: True,
    ) -> None:
        self._flights: dict[Hashable, _Flight[T]] = {}
        self._expiry: deque[tuple[Hashable, _Flight[T]]] = deque()
        self._ttl = ttl
        self._keep = keep
        self._started = 0

    @property
    def in_flight(self) -> int:
        """Keys being loaded, or cached, now."""
        if self._expiry:
            self._expire()
        return len(self._flights)

    async def run(
        self, key: Hashable | None, fn: Call[T], *, fresh: bool = False
    ) -> tuple[T | None, How]:
        """Return ``fn(waiting_since)``'s result for ``key`` and how it was obtained.

        The second item is ``"loaded"`` (this caller ran ``fn``), ``"coalesced"`` (it shared
        another caller's run) or ``"cached"`` (a finished run within ``ttl``). A ``fresh`` call
        needs state read after it was asked for: it skips the cache and shares only a run that
        started after the call did, waiting for an older run to end first. A burst of fresh
        calls for one key thus makes at most two runs.

        ``waiting_since`` is ``None`` for a caller that leads at once, and for one that leads
        after waiting on other runs (their leaders left, or it was ``fresh``), the time
        (``anyio.current_time()``) it began to wait: ``fn`` bounds its own waits from there, so
        a run handed from leader to leader does not start its caller's clock again.
        """
        if key is None:
            return await fn(None), "loaded"
        asked = self._started
        since: float | None = None
        if self._expiry:
            self._expire()
        while True:
            flight = self._flights.get(key)
            if flight is None:
                return await self._lead(key, fn, since), "loaded"
            if fresh and flight.serial <= asked:
                # Started before the ask: it may have read state older than what the caller
                # needs. Wait for it to end rather than load beside it, so every fresh caller
                # of a burst (a broker restart resyncs every socket) shares the next load.
                if flight.finished:
                    return await self._lead(key, fn, since), "loaded"
                if since is None:
                    since = anyio.current_time()
                await flight.wait()
                continue
            if flight.finished:
                return flight.result, "cached"
            if since is None:
                since = anyio.current_time()
            await flight.wait()
            if flight.finished:
                return flight.result, "coalesced"

    async def _lead(self, key: Hashable, fn: Call[T], since: float | None) -> T | None:
        self._started += 1
        flight: _Flight[T] = _Flight(self._started)
        self._flights[key] = flight
        cached = False
        try:
            flight.result = await fn(since)
            flight.finished = True
            result = flight.result
            if (
                self._ttl is not None
                and result is not None
                and self._keep(result)
                and self._owns(key, flight)
            ):
                flight.expires = anyio.current_time() + self._ttl
                self._expiry.append((key, flight))
                cached = True
        finally:
            if not cached and self._owns(key, flight):
                del self._flights[key]
            flight.ended = True
            if flight.done is not None:
                flight.done.set()
        return flight.result

    def _owns(self, key: Hashable, flight: _Flight[T]) -> bool:
        return self._flights.get(key) is flight

    def _expire(self) -> None:
        now = anyio.current_time()
        expiry = self._expiry
        while expiry and expiry[0][1].expires <= now:
            key, flight = expiry.popleft()
            if self._owns(key, flight):
                del self._flights[key]
