"""The frames bound for one WebSocket: in version order, patches chained, gaps repaired.

A :class:`SessionFeed` sits between a source of live frames (the NATS bridge's subscription)
and one socket. It knows the version of the state the socket has: the snapshot's, then that
of every frame it handed out. Each frame is judged against it:

* a full state (``session_update``) newer than the socket's version is handed out and becomes
  the socket's version; one not newer is dropped;
* a patch (``session_patch``) is handed out only when its ``base_version`` is the socket's
  version; one whose ``version`` is not newer is dropped; any other (its base is ahead, it
  overlaps, or the socket's version is unknown) is a gap: it is held, and the socket is resynced
  with a fresh snapshot. When the snapshot arrives the held patches that chain from it are
  handed out after it and the rest dropped; a patch the snapshot still does not reach is dropped
  too (the next one that does not chain asks for another resync).

A resync that fails (the loader raised, timed out or returned nothing) is retried with backoff
(:data:`RESYNC_RETRY_DELAYS`). When every retry failed while patches wait for it, the socket
cannot be repaired in place: the iteration ends, so the endpoint returns, the socket closes,
and the client reconnects with ``since``. Patches that can never chain on this socket, because
its state has no version or one of another kind even after a resync, are dropped with one
warning instead of reloading the session for each of them.

Resyncs run in the feed's task group while frames keep arriving; their snapshots join the
stream in order, so one loop sends everything. Backend neutral (anyio): the NATS-specific
part lives in :mod:`asgi_session_sync.nats`.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, NamedTuple

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pydantic_core import from_json

from .middleware import Resync, get_snapshot_version
from .stats import BridgeStats
from .versions import PatchFit, classify_patch, is_newer, version_key

__all__ = ["HEARTBEAT", "RESYNC_RETRY_DELAYS", "SessionFeed"]

logger = logging.getLogger("asgi_session_sync")

HEARTBEAT = '{"type":"heartbeat"}'
"""The heartbeat frame: ``{"type": "heartbeat"}``, for clients that detect dead sockets."""

PATCH_TYPE = "session_patch"

RESYNC_RETRY_DELAYS: tuple[float, ...] = (0.25, 1.0, 4.0)
"""Seconds to wait before each retry of a failed resync: four attempts in about 5 s."""

_NO_VERSION = object()
_LIVE = 0  # the ``run`` of a frame that did not come from a resync


class Frame(NamedTuple):
    """One frame in the feed, parsed once."""

    text: str | None
    """The JSON text to send; ``None`` for a resync that produced nothing."""
    version: object
    base_version: object
    """The patch's base; ``_NO_VERSION`` for a frame that is not a patch."""
    run: int = _LIVE
    """The resync run that produced it; ``_LIVE`` for a live frame."""

    @property
    def is_patch(self) -> bool:
        return self.base_version is not _NO_VERSION


class _Held(NamedTuple):
    frame: Frame
    needs_run: int  # a resync run numbered this or later started after the patch was seen


def parse_frame(text: str) -> Frame | str:
    """The frame with its versions, or why it is not one (for the log line)."""
    try:
        event = from_json(text, cache_strings=False)
    except ValueError:
        return "not JSON"
    if not isinstance(event, dict):
        return "not a JSON object"
    version = event.get("version", _NO_VERSION)
    if event.get("type") != PATCH_TYPE and "base_version" not in event:
        return Frame(text, version, _NO_VERSION)
    base_version = event.get("base_version")
    if version_key(base_version) is None or version_key(version) is None:
        return "a patch without a base_version and a version"
    if not isinstance(event.get("patch"), list):
        return "a patch whose operations are not a list"
    return Frame(text, version, base_version)


class SessionFeed:
    """The frames for one socket, ordered by version, with patches chained from its state.

    An async context manager (it owns the task group its resyncs run in) and an async
    iterator of JSON texts. :meth:`put` adds a live frame; :meth:`request_resync` loads a
    fresh snapshot into the stream; :meth:`end` ends the iteration once the buffer is read.

    Args:
        session_id: The session, for log lines.
        resync: Loads a fresh snapshot frame (``get_resync(scope)``); without it, gaps and
            broker trouble are only logged.
        scope: The socket's ASGI scope: before the first frame is judged, the socket's version
            is read from it with :func:`~asgi_session_sync.get_snapshot_version`.
        max_queued: Frames buffered for a slow consumer, and patches held during a resync.
        stats: Where to count what happened.
        limiter: Bounds the resyncs loading at once, across feeds.
    """

    def __init__(
        self,
        session_id: str,
        *,
        resync: Resync | None,
        scope: Mapping[str, Any] | None,
        max_queued: int,
        stats: BridgeStats,
        limiter: anyio.CapacityLimiter | None = None,
    ) -> None:
        self.session_id = session_id
        self.stats = stats
        self._resync = resync
        self._scope = scope
        self._max_queued = max_queued
        self.limiter = limiter
        """Bounds the resyncs loading at once, across feeds; ``None`` for no bound."""
        self._send: MemoryObjectSendStream[Frame] | None = None
        self._receive: MemoryObjectReceiveStream[Frame] | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        # The state of the socket, as far as this feed knows.
        self._version: object = _NO_VERSION
        self._version_known = False  # set once read from the scope, given, or handed out
        self._ready: deque[str] = deque()
        self._held: deque[_Held] = deque()
        # Resync runs: at most one at a time; a request during one schedules one more.
        self._resyncing = False
        self._resync_again = False
        self._runs_started = 0
        self._results_pending = 0  # runs scheduled whose result the consumer has not judged
        self._warned_unrepairable = False
        self._gave_up = False  # a gap no resync could repair: the iteration ends

    # Lifetime.

    async def __aenter__(self) -> SessionFeed:
        """Open the stream and the task group resyncs run in."""
        self._send, self._receive = anyio.create_memory_object_stream[Frame](self._max_queued)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Cancel a running resync, wait for it, and close the stream."""
        try:
            if self._tg is not None:
                tg, self._tg = self._tg, None
                tg.cancel_scope.cancel()
                # The body's exception is not the task group's: passing None keeps anyio from
                # wrapping it (a WebSocketDisconnect, say) in an ExceptionGroup.
                await tg.__aexit__(None, None, None)
        finally:
            if self._send is not None:
                self._send.close()
            if self._receive is not None:
                self._receive.close()

    def end(self) -> None:
        """End the iteration once the buffered frames are read."""
        if self._send is not None:
            self._send.close()

    # The socket's version.

    @property
    def version(self) -> Any:
        """The version of the state the socket has, as far as the feed knows; ``None`` if not."""
        self._learn_version()
        return None if self._version is _NO_VERSION else self._version

    @version.setter
    def version(self, version: Any) -> None:
        self._version = _NO_VERSION if version is None else version
        self._version_known = True

    def _learn_version(self) -> None:
        # The middleware knows the snapshot's version once the app has accepted; frames are
        # judged only after that (the app forwards after accepting).
        if self._version_known or self._scope is None:
            return
        snapshot_version = get_snapshot_version(self._scope)
        if snapshot_version is not None:
            self._version = snapshot_version
            self._version_known = True

    # Producing.

    async def put(self, frame: Frame) -> None:
        """Queue a live frame, waiting while the buffer is full; dropped once the feed ended."""
        if self._send is None:
            return
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            await self._send.send(frame)

    def request_resync(self, reason: str) -> None:
        """Load a fresh snapshot into the stream; coalesced with a resync already running."""
        if self._tg is None:
            return
        if self._resync is None:
            logger.warning(
                "updates may have been missed and there is no resync session_id=%s reason=%s",
                self.session_id,
                reason,
            )
            return
        if self._resyncing:
            if not self._resync_again:  # else the run already queued serves this request too
                self._resync_again = True
                self._results_pending += 1
            return
        logger.info("resyncing session_id=%s reason=%s", self.session_id, reason)
        self._resyncing = True
        self._results_pending += 1
        self._tg.start_soon(self._run_resyncs, self._resync)

    async def _run_resyncs(self, resync: Resync) -> None:
        try:
            while True:
                self._runs_started += 1
                run = self._runs_started
                frame = await self._load(resync, run)
                for delay in RESYNC_RETRY_DELAYS:
                    if frame.text is not None:
                        break
                    await anyio.sleep(delay)
                    frame = await self._load(resync, run)
                if self._send is None:
                    return
                try:
                    await self._send.send(frame)
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    return
                if not self._resync_again:
                    return
                # Cleared here, not before loading: every request counted in _results_pending
                # gets a run (and a result) of its own.
                self._resync_again = False
        finally:
            self._resyncing = False

    async def _load(self, resync: Resync, run: int) -> Frame:
        self.stats.incr("resyncs")
        try:
            if self.limiter is None:
                text = await resync()
            else:
                async with self.limiter:
                    text = await resync()
        except Exception:
            logger.exception("resync failed session_id=%s", self.session_id)
            text = None
        if text is None:
            self.stats.incr("resync_failures")
            return Frame(None, _NO_VERSION, _NO_VERSION, run)
        parsed = parse_frame(text)
        if isinstance(parsed, str) or parsed.is_patch:
            self.stats.incr("resync_failures")
            logger.error(
                "resync returned text that is not a snapshot session_id=%s", self.session_id
            )
            return Frame(None, _NO_VERSION, _NO_VERSION, run)
        return parsed._replace(run=run)

    # Consuming.

    def __aiter__(self) -> SessionFeed:
        """Iterate over the frames to send."""
        return self

    async def __anext__(self) -> str:
        """Return the next frame's JSON text to send to the socket."""
        if self._receive is None:
            raise RuntimeError("enter the subscription with `async with` before iterating")
        while not self._ready:
            if self._gave_up:
                raise StopAsyncIteration
            try:
                frame = await self._receive.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                raise StopAsyncIteration from None
            self._learn_version()
            self._judge(frame)
        return self._ready.popleft()

    def _judge(self, frame: Frame) -> None:
        if frame.run != _LIVE:
            self._results_pending -= 1
            if frame.text is not None:
                self._full_state(frame)
            elif self._held:
                self._give_up()
                return
            self._replay_held(frame.run)
        elif frame.is_patch:
            self._patch(frame)
        else:
            self._full_state(frame)

    def _full_state(self, frame: Frame) -> None:
        assert frame.text is not None
        if is_newer(frame.version, self._version) is False:
            self.stats.incr("stale_dropped")
            logger.debug(
                "dropped a frame not newer than version=%r session_id=%s",
                self._version,
                self.session_id,
            )
            return
        # Newer, the first version, or one of another kind (a timestamp after ints): it passes
        # and becomes the socket's version. Frames without a version pass and leave it alone.
        self._ready.append(frame.text)
        self.stats.incr("snapshots_forwarded" if frame.run != _LIVE else "updates_forwarded")
        if version_key(frame.version) is not None:
            self._version = frame.version
            self._version_known = True
            if self._held and frame.run == _LIVE:
                self._replay_held(_LIVE)

    def _patch(self, frame: Frame) -> None:
        fit = self._fit(frame)
        if fit is PatchFit.CHAINS:
            self._hand_out_patch(frame)
            if self._held:
                self._replay_held(_LIVE)
        elif fit is PatchFit.STALE:
            self.stats.incr("stale_dropped")
        else:
            self._gap(frame, fit)

    def _fit(self, frame: Frame) -> PatchFit:
        current = None if self._version is _NO_VERSION else self._version
        return classify_patch(frame.base_version, frame.version, current)

    def _hand_out_patch(self, frame: Frame) -> None:
        assert frame.text is not None
        self._ready.append(frame.text)
        self._version = frame.version
        self._version_known = True
        self.stats.incr("patches_forwarded")

    def _give_up(self) -> None:
        self.stats.incr("patches_unrepaired", len(self._held))
        self._held.clear()
        self._gave_up = True
        logger.error(
            "a gap could not be repaired: every resync failed; ending the stream so the client "
            "reconnects session_id=%s socket_version=%r",
            self.session_id,
            self.version,
        )

    def _gap(self, frame: Frame, fit: PatchFit) -> None:
        self.stats.incr("gaps")
        never_chains = (
            self._runs_started > 0
            and self._results_pending == 0
            and (self._version is _NO_VERSION or fit is PatchFit.UNORDERED)
        )
        if self._resync is None or never_chains:
            self.stats.incr("patches_unrepaired")
            log = logger.debug if self._warned_unrepairable else logger.warning
            self._warned_unrepairable = True
            log(
                "dropped a patch that cannot chain here (no resync, or a resynced state whose "
                "version is unknown or of another kind) session_id=%s "
                "base_version=%r version=%r socket_version=%r",
                self.session_id,
                frame.base_version,
                frame.version,
                self.version,
            )
            return
        if len(self._held) >= self._max_queued:
            self._held.popleft()
            self.stats.incr("patches_unrepaired")
        self._held.append(_Held(frame, self._runs_started + 1))
        # A snapshot already loading usually reaches this patch (its base was committed before
        # it was published): wait for it, and ask again only if it does not.
        if self._results_pending == 0:
            self.request_resync(f"patch {fit.value} base_version={frame.base_version!r}")

    def _replay_held(self, run: int) -> None:
        """Hand out the held patches that now chain; drop the stale and, after ``run``, the lost."""
        progressed = True
        while progressed and self._held:
            progressed = False
            kept: deque[_Held] = deque()
            for held in self._held:
                fit = self._fit(held.frame)
                if fit is PatchFit.CHAINS:
                    self._hand_out_patch(held.frame)
                    progressed = True
                elif fit is PatchFit.STALE:
                    self.stats.incr("stale_dropped")
                elif run != _LIVE and (self._version is _NO_VERSION or fit is PatchFit.UNORDERED):
                    # After a resync the socket's state still has no version to chain from,
                    # or one of another kind: this patch can never chain here.
                    self.stats.incr("patches_unrepaired")
                elif run != _LIVE and run >= held.needs_run:
                    # A resync that started after this patch was seen does not reach its base:
                    # the loader is behind the publisher. The next patch asks again.
                    self.stats.incr("patches_unrepaired")
                    logger.warning(
                        "dropped a patch the resynced state does not reach session_id=%s "
                        "base_version=%r socket_version=%r",
                        self.session_id,
                        held.frame.base_version,
                        self.version,
                    )
                else:
                    kept.append(held)
            self._held = kept
        if run != _LIVE and self._held and self._results_pending == 0:
            self.request_resync("patches the snapshot did not reach")

    async def forward(
        self,
        send_text: Callable[[str], Awaitable[object]],
        receive: Callable[[], Awaitable[Mapping[str, Any]]],
        *,
        on_message: Callable[[Mapping[str, Any]], Awaitable[object]] | None = None,
        heartbeat: float | None = None,
    ) -> None:
        """Send every frame to the socket until the client disconnects.

        See :meth:`asgi_session_sync.nats.SessionSubscription.forward`.
        """
        if heartbeat is not None and not heartbeat > 0:
            raise ValueError(f"heartbeat must be positive seconds or None: got {heartbeat!r}")
        failure: Exception | None = None
        lock = anyio.Lock()
        last_sent = anyio.current_time()

        async def send(text: str) -> None:
            nonlocal last_sent
            # One sender at a time: a heartbeat never interleaves with a frame being sent.
            async with lock:
                await send_text(text)
                last_sent = anyio.current_time()

        async with anyio.create_task_group() as tg:

            async def sending(produce: Callable[[], Awaitable[None]]) -> None:
                nonlocal failure
                try:
                    await produce()
                except Exception as exc:  # re-raised below, outside the task group
                    failure = exc
                tg.cancel_scope.cancel()  # failed, or the feed ended: nothing more to send

            async def send_frames() -> None:
                async for frame in self:
                    await send(frame)

            async def send_heartbeats() -> None:
                assert heartbeat is not None
                nonlocal last_sent
                while True:
                    wait = last_sent + heartbeat - anyio.current_time()
                    if wait > 0:
                        await anyio.sleep(wait)
                        continue
                    async with lock:
                        # Re-checked under the lock: a frame sent meanwhile resets the quiet.
                        if anyio.current_time() >= last_sent + heartbeat:
                            await send_text(HEARTBEAT)
                            last_sent = anyio.current_time()
                            self.stats.incr("heartbeats")

            tg.start_soon(sending, send_frames)
            if heartbeat is not None:
                tg.start_soon(sending, send_heartbeats)
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    break
                if on_message is not None and message["type"] == "websocket.receive":
                    await on_message(message)
            tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
