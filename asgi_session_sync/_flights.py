"""Single-flight loads: concurrent loads of one key share one call, under a concurrency bound."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import anyio

__all__ = ["SingleFlight"]

T = TypeVar("T")

# Past this many cached entries, expired ones are swept on the next insert.
_SWEEP_AT = 1024


class _Flight(Generic[T]):
    __slots__ = ("done", "ended", "expires", "finished", "result")

    def __init__(self) -> None:
        # Made by the first waiter: most flights have none, and an Event costs a backend lookup.
        self.done: anyio.Event | None = None
        self.ended = False
        self.finished = False  # False once ended means the leader was cancelled: retry
        self.result: T | None = None
        self.expires = math.inf

    async def wait(self) -> None:
        if not self.ended:
            if self.done is None:
                self.done = anyio.Event()
            await self.done.wait()


class SingleFlight(Generic[T]):
    """Runs at most one call per key at a time; callers that arrive meanwhile share its result.

    The caller that finds no flight for its key is the leader: it runs the call in its own task,
    so its cancel scopes (timeout, disconnect) apply. A waiter that is cancelled just stops
    waiting; the leader and the other waiters go on. If the leader is cancelled, the call is
    abandoned and one of the waiters becomes the new leader, so nobody is left without a load.
    ``fn`` must not raise ``Exception``: failures are results (``None``), shared like any other
    with the callers in flight, but never cached.

    Leaders hold a slot of ``limiter``, a fair (FIFO) semaphore, while their call runs, so at
    most its initial value of calls run at once however many keys are loading.
    """

    def __init__(self, *, limiter: anyio.Semaphore, ttl: float | None = None) -> None:
        self._flights: dict[Hashable, _Flight[T]] = {}
        self._limiter = limiter
        self._ttl = ttl

    @property
    def in_flight(self) -> int:
        """Keys being loaded (or cached) now."""
        return len(self._flights)

    async def run(
        self, key: Hashable, fn: Callable[[], Awaitable[T | None]], *, use_cache: bool = True
    ) -> tuple[T | None, str]:
        """Return ``fn()``'s result for ``key`` and how it was obtained.

        The second item is ``"loaded"`` (this caller ran ``fn``), ``"coalesced"`` (it shared
        another caller's run) or ``"cached"`` (a finished run within ``ttl``).
        """
        while True:
            flight = self._flights.get(key)
            if flight is not None and flight.finished and flight.expires <= anyio.current_time():
                del self._flights[key]
                flight = None
            if flight is None:
                return await self._lead(key, fn), "loaded"
            if flight.finished:
                if use_cache:
                    return flight.result, "cached"
                return await self._lead(key, fn), "loaded"
            await flight.wait()
            if flight.finished:
                return flight.result, "coalesced"

    async def _lead(self, key: Hashable, fn: Callable[[], Awaitable[T | None]]) -> T | None:
        flight: _Flight[T] = _Flight()
        if len(self._flights) >= _SWEEP_AT:
            self._sweep()
        self._flights[key] = flight
        try:
            async with self._limiter:
                flight.result = await fn()
            flight.finished = True
            if self._ttl is not None and flight.result is not None:
                flight.expires = anyio.current_time() + self._ttl
        finally:
            cached = flight.finished and flight.expires != math.inf
            if not cached and self._flights.get(key) is flight:
                del self._flights[key]
            flight.ended = True
            if flight.done is not None:
                flight.done.set()
        return flight.result

    def _sweep(self) -> None:
        now = anyio.current_time()
        for key in [k for k, f in self._flights.items() if f.finished and f.expires <= now]:
            del self._flights[key]
