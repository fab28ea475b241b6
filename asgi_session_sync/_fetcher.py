"""What a connection's first frame is: the one owner of loading a snapshot.

:class:`SnapshotFetcher` authenticates the connection, asks the version loader when a client
resumes, shares loads between connections (single-flight, the load bound, the opt-in cache),
encodes the result as a ``session_update`` event and reports every failure: counted, passed to
``on_error`` and logged once with its cause. Nothing it does raises ``Exception`` into the app.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import NamedTuple, TypeVar

import anyio
from pydantic import BaseModel

from ._flights import SingleFlight
from ._paths import clip_for_log
from .config import SyncConfig
from .protocol import Frame, Kind, SessionSynced, Version, as_version, session_update_json
from .snapshot import SessionContext, Snapshot
from .stats import SessionSyncStats

__all__ = ["FAILED", "NOTHING", "FirstFrame", "SnapshotFetcher"]

logger = logging.getLogger("asgi_session_sync")

T = TypeVar("T")


class FirstFrame(NamedTuple):
    """What to send right after the accept, and the version of the state the client then has.

    ``data`` is ``None`` when nothing is sent (no session, a failure, or a current resume
    without ``send_synced``); ``version`` is ``None`` when the client's version is unknown.
    """

    data: bytes | None
    version: Version | None
    owner: str | None = None
    known: bool = False
    """Whether the client's state is known after it: a snapshot was sent, or resume said it
    is current."""
    failed: bool = False
    """Whether nothing is sent because something failed (raised, timed out, could not be
    encoded), rather than because there is no such session for this user."""

    def snapshot_frame(self) -> Frame | None:
        """The snapshot as a resync frame (``"reset": true``), parsed; ``None`` without one."""
        if self.data is None:
            return None
        # The encoded event is a JSON object: the member goes first, with no second encoding.
        text = '{"reset":true,' + self.data.decode()[1:]
        return Frame(
            text,
            Kind.UPDATE,
            version=self.version,
            owner=self.owner,
            reset=True,
            size=len(text) if text.isascii() else len(text.encode()),
        )


NOTHING = FirstFrame(None, None)
"""Nothing to send, and the client's version unknown."""

FAILED = FirstFrame(None, None, failed=True)
"""Nothing to send because something failed (logged, counted and reported already)."""


class SnapshotFetcher:
    """Loads snapshots for the connections of one middleware; holds its loads and counters.

    Every call (``authenticate``, the version loader, the loader) is bounded by ``timeout``
    seconds, and a load's wait for one of ``max_concurrent_loads`` slots by ``queue_timeout``.
    A load shared by several connections is bounded once, for all of them: its timeout is one
    failure, counted, logged and reported once, as a loader that raises is.
    """

    def __init__(self, config: SyncConfig, stats: SessionSyncStats) -> None:
        self.config = config
        self.stats = stats
        # A fair (FIFO) semaphore: at most max_concurrent_loads calls run at once, over every
        # key, and the rest start in the order they asked.
        self._slots = anyio.Semaphore(config.max_concurrent_loads, fast_acquire=True)
        self._snapshots: SingleFlight[FirstFrame] = SingleFlight(
            ttl=config.cache_ttl, keep=lambda frame: not frame.failed
        )
        self._versions: SingleFlight[Version] = SingleFlight()
        self._flight_key = config.shared_key

    async def context(self, ctx: SessionContext) -> SessionContext | None:
        """Return ``ctx`` with the user ``authenticate`` names; ``None`` if that failed."""
        if self.config.authenticate is None:
            return ctx
        try:
            with anyio.fail_after(self.config.timeout):
                user = await self.config.authenticate(ctx.scope)
        except Exception as exc:
            self._fail(ctx, exc, "no snapshot: authenticate failed")
            return None
        return SessionContext(ctx.session_id, ctx.scope, user, ctx.since)

    async def first_frame(self, ctx: SessionContext) -> FirstFrame:
        """The frame to send after the accept: a snapshot, a ``session_synced`` or nothing."""
        if ctx.since is not None and self.config.version_loader is not None:
            current = await self._fetch(ctx, self._versions, self._load_version, "version load")
            if current is not None and current == ctx.since:
                return self._resumed(ctx)
        loaded = await self.snapshot(ctx)
        if loaded is None:
            return NOTHING
        if loaded.failed:
            return loaded
        if ctx.since is not None and loaded.version == ctx.since:
            return self._resumed(ctx)
        return loaded

    async def snapshot(self, ctx: SessionContext, *, fresh: bool = False) -> FirstFrame | None:
        """The ``session_update`` frame for ``ctx``; ``None`` when the loader said there is
        none, :data:`FAILED` (logged, counted, reported) when loading failed.

        ``fresh`` is for resyncs after a lost update: it skips the cache and shares only loads
        that started after it was asked for, so the state read is never older than the ask.
        """
        return await self._fetch(
            ctx, self._snapshots, self._load_snapshot, "snapshot load", fresh, failure=FAILED
        )

    async def _fetch(
        self,
        ctx: SessionContext,
        flights: SingleFlight[T],
        load: Callable[[SessionContext], Awaitable[T | None]],
        what: str,
        fresh: bool = False,
        *,
        failure: T | None = None,
    ) -> T | None:
        try:
            key = self._flight_key(ctx)
            hash(key)  # an unhashable key (a list inside) fails here, not in the flight table
        except Exception as exc:
            self._fail(ctx, exc, "no snapshot: flight_key raised")
            return failure
        result, how = await flights.run(
            key, lambda since: self._call(ctx, load, what, failure, since), fresh=fresh
        )
        if how != "loaded":
            self.stats.incr("coalesced" if how == "coalesced" else "cache_hits")
        return result

    async def _call(
        self,
        ctx: SessionContext,
        load: Callable[[SessionContext], Awaitable[T | None]],
        what: str,
        failure: T | None,
        since: float | None,
    ) -> T | None:
        """One call of ``load``, for every connection sharing it: a slot within
        ``queue_timeout`` of ``since`` (when the caller began to wait on shared loads; else
        now), then the call within ``timeout``; either bound passed is ``failure``.

        The timeout bounds the work, not the wait for a turn: in a reconnect storm the queue is
        long because the process is busy, and a late snapshot beats none. A hung loader still
        holds a slot for ``timeout`` at most, and fails every connection sharing its call.
        """
        config = self.config
        slots = self._slots
        try:
            slots.acquire_nowait()  # at once when a slot is free: no event loop turn
        except anyio.WouldBlock:
            if config.queue_timeout is None:
                deadline = math.inf
            else:
                deadline = (anyio.current_time() if since is None else since) + config.queue_timeout
            with anyio.CancelScope(deadline=deadline) as queued:
                await slots.acquire()
            if queued.cancelled_caught:
                return self._timed_out(
                    ctx,
                    failure,
                    f"{what} not started: no free slot of max_concurrent_loads="
                    f"{config.max_concurrent_loads} within queue_timeout={config.queue_timeout}s",
                )
        try:
            with anyio.move_on_after(config.timeout):
                return await load(ctx)
        finally:
            slots.release()
        return self._timed_out(ctx, failure, f"{what} timed out after {config.timeout}s")

    def _timed_out(self, ctx: SessionContext, failure: T | None, problem: str) -> T | None:
        self.stats.incr("timeouts")
        logger.warning(
            "%s%s session_id=%s path=%r",
            problem,
            # Only a version load fails with None: the full load runs instead.
            ", loading in full" if failure is None else "",
            ctx.session_id,
            clip_for_log(ctx.scope["path"]),
        )
        self.report(ctx, TimeoutError(problem))
        return failure

    async def _load_snapshot(self, ctx: SessionContext) -> FirstFrame | None:
        started = time.perf_counter()
        self.stats.incr("loads")
        try:
            result = await self.config.loader(ctx)
        except Exception as exc:
            self._fail(ctx, exc, "no snapshot: loader raised")
            return FAILED
        except BaseException as exc:
            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                logger.error(
                    "loader raised %s, re-raised session_id=%s", type(exc).__name__, ctx.session_id
                )
            raise
        finally:
            self.stats.observe_load(time.perf_counter() - started)
        return self._encode(ctx, result)

    async def _load_version(self, ctx: SessionContext) -> Version | None:
        assert self.config.version_loader is not None
        self.stats.incr("version_loads")
        try:
            current = await self.config.version_loader(ctx)
        except Exception as exc:
            self._fail(ctx, exc, "version_loader raised, loading in full")
            return None
        version = as_version(current)
        if current is not None and version is None:
            self.stats.incr("errors")
            logger.error(
                "version_loader returned %s, not a version (a whole number from 0 to 2**53 - 1), "
                "loading in full session_id=%s",
                type(current).__name__,
                ctx.session_id,
            )
        return version

    def _encode(self, ctx: SessionContext, result: object) -> FirstFrame | None:
        if result is None:
            logger.debug("no snapshot: loader returned None session_id=%s", ctx.session_id)
            return None
        if isinstance(result, Snapshot):
            session, owner, version = result.session, result.owner, result.version
        elif isinstance(result, (Mapping, BaseModel)):
            session, owner, version = result, None, None
        else:
            self.stats.incr("errors")
            logger.error(
                "no snapshot: loader returned %s, expected a mapping, a pydantic model, "
                "a Snapshot or None session_id=%s",
                type(result).__name__,
                ctx.session_id,
            )
            return FAILED
        try:
            data = session_update_json(ctx.session_id, session, owner=owner, version=version)
        except Exception as exc:
            self._fail(ctx, exc, "no snapshot: cannot serialise the session")
            return FAILED
        if self.config.max_bytes is not None and len(data) > self.config.max_bytes:
            self.stats.incr("oversize")
            logger.warning(
                "no snapshot: frame of %d bytes exceeds max_bytes=%d session_id=%s",
                len(data),
                self.config.max_bytes,
                ctx.session_id,
            )
            return FAILED
        return FirstFrame(data, as_version(version), owner, known=True)

    def _resumed(self, ctx: SessionContext) -> FirstFrame:
        self.stats.incr("skipped_by_resume")
        logger.debug("snapshot skipped: client is current session_id=%s", ctx.session_id)
        if not self.config.send_synced:
            return FirstFrame(None, ctx.since, known=True)
        assert ctx.since is not None
        synced = SessionSynced(session_id=ctx.session_id, version=ctx.since)
        return FirstFrame(synced.to_json(), ctx.since, known=True)

    def _fail(self, ctx: SessionContext, exc: Exception, what: str) -> None:
        """Count a failure, log it once with its cause, and report it to ``on_error``."""
        self.stats.incr("errors")
        logger.error(
            "%s session_id=%s path=%r",
            what,
            ctx.session_id,
            clip_for_log(ctx.scope["path"]),
            exc_info=exc,
        )
        self.report(ctx, exc)

    def report(self, ctx: SessionContext, exc: Exception) -> None:
        """Pass ``exc`` to ``on_error``; a hook that raises is logged, never raised."""
        if self.config.on_error is None:
            return
        try:
            self.config.on_error(ctx, exc)
        except Exception:
            logger.exception("on_error hook raised session_id=%s", ctx.session_id)
