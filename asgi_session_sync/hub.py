"""Fan-out per process: one broker subscription per session, each message parsed once.

A :class:`Hub` sits between a broker (a :class:`Backend`: NATS is one) and the WebSockets of
one process. The first socket that watches a session subscribes to the session's subject; the
others share that subscription. Each message is parsed once, checked against the session it
arrived for, and offered to every watching socket's :class:`SessionStream`, whose queue is
bounded in bytes. A socket judges each frame with its own :class:`~asgi_session_sync.cursor.Cursor`
and repairs itself with a fresh snapshot (a resync) when the cursor says so.

**Slow consumers.** A stream whose queued and held frames would pass ``max_socket_bytes``, or
the process's streams together ``max_process_bytes``, stops buffering: its queue is emptied,
the event is counted (``slow_consumers``), and the socket is resynced when it reads again. A
resync's snapshot supersedes every frame it dropped, so nothing is lost, and a socket that
stops reading costs at most its bound.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from .cursor import Cursor, Verdict
from .protocol import HEARTBEAT, Frame, Kind, parse_frame
from .stats import BridgeStats

if TYPE_CHECKING:
    from .sync import SessionSocket

__all__ = ["RESYNC_RETRY_DELAYS", "Backend", "Hub", "Resync", "SessionStream"]

logger = logging.getLogger("asgi_session_sync")

RESYNC_RETRY_DELAYS: tuple[float, ...] = (0.25, 1.0, 4.0)
"""Seconds to wait before each retry of a failed resync: four attempts, 5.25 s of waits between
them (each attempt's load is bounded on its own: ``queue_timeout``, then ``timeout``)."""

_HEARTBEAT_FRAME = Frame(HEARTBEAT, Kind.OTHER, size=len(HEARTBEAT))
_DISCONNECTS = frozenset({"websocket.disconnect", "http.disconnect"})
_HEARTBEAT_LOOKS = 4
"""How often per heartbeat period ``forward`` looks whether a frame was sent."""

# Bounds on clean-up work that must finish even when the caller is cancelled.
_UNSUBSCRIBE_TIMEOUT = 2.0

Resync = Callable[[], Awaitable["Frame | str | None"]]
"""Loads a fresh snapshot of the socket's session: its frame (parsed, or JSON text), or
``None`` when there is nothing to send. :meth:`SessionSocket.resync` is one."""

Unsubscribe = Callable[[], Awaitable[None]]


class Backend(Protocol):
    """What a hub needs of a broker: one subscription per session subject, and a way to ask
    a session's producer for what a socket missed."""

    async def subscribe_subject(
        self, session_id: str, deliver: Callable[[bytes], None]
    ) -> Unsubscribe:
        """Subscribe to the session's subject; return once the broker has the subscription.

        ``deliver`` is called with each message's payload, in order, and must not block.
        Returns the coroutine function that unsubscribes.
        """
        ...

    async def catch_up(self, session_id: str, version: int) -> bytes | None:
        """Ask the producer streaming into the session for a patch from ``version`` to its own.

        Returns the ``session_patch`` frame's JSON (from
        :class:`~asgi_session_sync.streaming.AnswerStream`), or ``None`` when no producer
        answers for that version within about a second: the caller then loads a snapshot.
        """
        ...


class _Channel:
    """The sockets of one process that watch one session, and their shared subscription."""

    __slots__ = ("failed", "ready", "resync_reason", "streams", "texts", "unsubscribe")

    def __init__(self) -> None:
        self.streams: set[SessionStream] = set()
        self.ready = anyio.Event()
        self.failed = False
        self.unsubscribe: Unsubscribe | None = None
        self.resync_reason: str | None = None
        """Set when the broker did not confirm the subscription: every socket that joins is
        resynced, since an update may have been published before the broker took it."""
        self.texts: dict[str, tuple[int, int]] = {}
        """For each string that patches append to: the version after the last append seen,
        and the string's length then (UTF-16 units). See :meth:`Hub.deliver`."""

    def append_problem(self, frame: Frame) -> str | None:
        """Why ``frame``'s appends cannot follow the ones seen before it, or ``None``.

        A patch that chains from the version of the last append to a string must append at
        that string's end: an ``offset`` past it (or short of it) would fail in every client,
        and so is refused here instead. Strings that no append has reached yet, and patches
        that do not chain from the last one seen, are left to the clients' own check.
        """
        texts = self.texts
        if frame.touched and texts:
            # Another operation may have replaced, moved or removed a string, or shifted the
            # array items after one it added or removed: forget every string under its parent.
            for path in frame.touched:
                parent = path.rpartition("/")[0]
                for known in [k for k in texts if _overlaps(k, parent)]:
                    del texts[known]
        if not frame.appends:
            return None
        assert frame.version is not None
        lengths: dict[str, int] = {}
        for append in frame.appends:
            length = lengths.get(append.path)
            if length is None:
                seen = texts.get(append.path)
                if seen is not None and seen[0] == frame.base_version:
                    length = seen[1]
            if length is not None and append.offset != length:
                return (
                    f"an append at offset {append.offset} to {append.path!r}, whose text is "
                    f"{length} UTF-16 units long"
                )
            lengths[append.path] = append.offset + append.length
        for path, length in lengths.items():
            texts[path] = (frame.version, length)
        return None


class Hub:
    """Fans the updates of each session out to the process's sockets that watch it.

    Args:
        backend: The broker.
        stats: Where to count what happened.
        max_socket_bytes: Bytes each socket may have queued and held, at most.
        max_process_bytes: Bytes every socket of this hub may have queued, together.
        max_concurrent_resyncs: Resyncs that may load at once; the rest wait their turn.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        stats: BridgeStats,
        max_socket_bytes: int,
        max_process_bytes: int,
        max_concurrent_resyncs: int,
    ) -> None:
        self.backend = backend
        self.stats = stats
        self.max_socket_bytes = max_socket_bytes
        self.max_process_bytes = max_process_bytes
        self.queued_bytes = 0
        """Bytes queued in every stream of this hub."""
        self.resync_limiter = anyio.CapacityLimiter(max_concurrent_resyncs)
        self._channels: dict[str, _Channel] = {}

    @asynccontextmanager
    async def subscribe(self, session_id: str) -> AsyncIterator[SessionStream]:
        """Watch ``session_id`` until the block ends; the broker has the subscription on entry."""
        channel = await self._join(session_id)
        stream = SessionStream(self, session_id)
        channel.streams.add(stream)
        self.stats.incr("subscriptions")
        if channel.resync_reason is not None:
            stream.request_resync(channel.resync_reason)
        try:
            yield stream
        finally:
            stream.end()
            stream.discard()
            channel.streams.discard(stream)
            if not channel.streams and self._channels.get(session_id) is channel:
                del self._channels[session_id]
                if channel.unsubscribe is not None:
                    # Shielded and bounded: the broker must hear it even when this task is
                    # being cancelled, or it keeps sending the session's updates here.
                    with anyio.move_on_after(_UNSUBSCRIBE_TIMEOUT, shield=True):
                        await channel.unsubscribe()

    async def _join(self, session_id: str) -> _Channel:
        while True:
            channel = self._channels.get(session_id)
            if channel is None:
                channel = self._channels[session_id] = _Channel()
                try:
                    channel.unsubscribe = await self.backend.subscribe_subject(
                        session_id, lambda data: self.deliver(session_id, data)
                    )
                except BaseException:
                    channel.failed = True
                    if self._channels.get(session_id) is channel:
                        del self._channels[session_id]
                    raise
                finally:
                    channel.ready.set()
                return channel
            await channel.ready.wait()
            # Still the session's channel: its last socket may have left (and unsubscribed)
            # before this task ran again.
            if not channel.failed and self._channels.get(session_id) is channel:
                return channel

    def deliver(self, session_id: str, data: bytes) -> None:
        """Parse one message of ``session_id``'s subject once and offer it to its streams."""
        channel = self._channels.get(session_id)
        if channel is None or not channel.streams:
            return
        self.stats.incr("frames_parsed")
        try:
            parsed = parse_frame(data.decode(), size=len(data))
        except UnicodeDecodeError:
            parsed = "not UTF-8"
        if isinstance(parsed, str):
            self.stats.incr("invalid_messages")
            logger.warning(
                "dropped an invalid message, resyncing the session's sockets reason=%s "
                "session_id=%s bytes=%d",
                parsed,
                session_id,
                len(data),
            )
            # It may have been an update no socket can read: as good as lost.
            for stream in channel.streams:
                stream.request_resync("an unreadable message")
            return
        problem = _misdirected(parsed, session_id)
        if problem is None and parsed.kind is Kind.PATCH:
            problem = channel.append_problem(parsed)
        if problem is not None:
            self.refuse(session_id, problem)
            return
        for stream in channel.streams:
            stream.offer(parsed)

    def make_room(self, size: int) -> bool:
        """Free ``size`` bytes under ``max_process_bytes`` by resyncing the streams holding the
        most (the slowest consumers), largest first; ``False`` if that cannot be done."""
        streams = sorted(
            (stream for channel in self._channels.values() for stream in channel.streams),
            key=lambda stream: stream.buffered_bytes,
            reverse=True,
        )
        for stream in streams:
            if self.queued_bytes + size <= self.max_process_bytes:
                break
            if stream.buffered_bytes:
                stream.overflow()
        return self.queued_bytes + size <= self.max_process_bytes

    def refuse(self, session_id: str, problem: str) -> None:
        """Count and log a frame that must reach no socket of ``session_id``."""
        self.stats.incr("refused_frames")
        logger.warning("refused a frame session_id=%s reason=%s", session_id, problem)

    def resync_all(self, reason: str) -> None:
        """Resync every socket (the broker may have lost messages: a reconnect)."""
        for channel in list(self._channels.values()):
            # The client subscribed again on reconnecting, confirmed by this very resync.
            channel.resync_reason = None
            for stream in channel.streams:
                stream.request_resync(reason)

    def resync(self, session_id: str, reason: str) -> None:
        """Resync the sockets of one session (the broker dropped some of its messages).

        Before its subscription is ready, the session's sockets are still joining: each of
        them is resynced as it joins, until the next reconnect.
        """
        channel = self._channels.get(session_id)
        if channel is None:
            return
        if not channel.ready.is_set():
            channel.resync_reason = reason
        for stream in channel.streams:
            stream.request_resync(reason)

    def end_all(self) -> None:
        """End every stream's iteration once its buffer is read (the broker is gone)."""
        for channel in list(self._channels.values()):
            for stream in channel.streams:
                stream.end()

    @property
    def sessions(self) -> int:
        """Sessions with a broker subscription in this process."""
        return len(self._channels)


def _overlaps(path: str, other: str) -> bool:
    """Whether one JSON Pointer is the other or inside it (RFC 6901 tokens, not characters)."""
    if len(path) > len(other):
        path, other = other, path
    return other == path or other.startswith(path + "/") or path == ""


def _misdirected(frame: Frame, session_id: str) -> str | None:
    """Why a frame on ``session_id``'s subject must not reach its sockets, or ``None``."""
    if frame.session_id is not None and frame.session_id != session_id:
        return "it names another session"
    if frame.kind is Kind.OTHER:
        return None
    if frame.session_id is None:
        return "a session event that names no session"
    if frame.reset:
        return "reset is sent only with a snapshot from the loader"
    if frame.kind is Kind.SYNCED:
        return "session_synced is sent only by the middleware"
    return None


def _as_reset(text: str) -> Frame | None:
    """A resync's JSON text as the snapshot frame it is, marked ``reset``; ``None`` if it is not
    a ``session_update``."""
    frame = parse_frame(text)
    if isinstance(frame, str) or frame.kind is not Kind.UPDATE:
        return None
    if frame.reset:
        return frame
    # The client must take it even when older than what it has: the member goes last, so it
    # wins over a "reset" the text may already hold (RFC 8259 leaves duplicates to the reader;
    # JavaScript's JSON.parse keeps the last).
    text = text.rstrip()[:-1] + ',"reset":true}'
    return Frame(
        text,
        frame.kind,
        frame.session_id,
        frame.owner,
        frame.version,
        reset=True,
        size=frame.size + 14,
    )


class SessionStream:
    """The frames bound for one socket: queued in bytes, judged by its cursor, repaired.

    Made by :meth:`Hub.subscribe` (through :meth:`asgi_session_sync.nats.NatsBridge.subscribe`).
    Iterate it for the JSON text of each frame to send, or hand the whole loop to
    :meth:`forward`. Until :meth:`attach` (which :meth:`forward` calls) tells it the socket's
    state, frames wait in its queue; a patch judged while the socket's state is unknown asks
    for a resync.
    """

    def __init__(self, hub: Hub, session_id: str) -> None:
        self.hub = hub
        self.session_id = session_id
        self.stats = hub.stats
        self.cursor = Cursor(max_held_bytes=hub.max_socket_bytes)
        """Judges every frame against the state the socket has."""
        self.owner: str | None = None
        """The session's owner, when the snapshot named one: frames naming another are refused."""
        self._resync: Resync | None = None
        self._queue: deque[Frame] = deque()
        self._queued_bytes = 0
        # The consuming task's wake-up: a semaphore used as a reusable event, released when
        # something is due and no wake-up is unread. A new Event per wait cost a backend
        # lookup and two objects per socket and frame. (No max_value: a consumer cancelled
        # just as it was woken gives its wake-up back, which may make two.)
        self._wakeup = anyio.Semaphore(0, fast_acquire=True)
        self._resync_reason: str | None = None
        self._ready: deque[Frame] = deque()
        """Frames judged and due to be sent, in order (a repair releases several at once)."""
        self._ready_bytes = 0
        self._ended = False
        self._warned_no_resync = False

    # The socket's state.

    def attach(self, socket: SessionSocket) -> None:
        """Follow ``socket``: its snapshot's version and owner, and its resync."""
        self.cursor = Cursor(
            socket.version, known=socket.known, max_held_bytes=self.hub.max_socket_bytes
        )
        self.owner = socket.owner
        self._resync = socket.resync

    @property
    def version(self) -> int | None:
        """The version of the state the socket has, as far as the stream knows."""
        return self.cursor.version

    @version.setter
    def version(self, version: int | None) -> None:
        # Set by an app that sent its own snapshot: that state is the database's.
        self.cursor = Cursor(version, known=True, max_held_bytes=self.hub.max_socket_bytes)

    def set_resync(self, resync: Resync | None) -> None:
        """Load snapshots with ``resync`` when the socket must be repaired."""
        self._resync = resync

    # Producing (the hub, synchronously, in the broker's task).

    def offer(self, frame: Frame) -> None:
        """Queue ``frame`` unless it is refused or the byte bounds say the socket is too slow."""
        if self._ended:
            return
        if self.owner is not None and frame.owner is not None and frame.owner != self.owner:
            self.hub.refuse(self.session_id, "it names another owner")
            return
        hub = self.hub
        size = frame.size
        if size > hub.max_socket_bytes:
            # Never queued, however fast the socket: the database's snapshot stands in for it.
            logger.warning(
                "a frame of %d bytes is over max_socket_bytes=%d: resyncing instead session_id=%s",
                size,
                hub.max_socket_bytes,
                self.session_id,
            )
            self.discard()
            self.request_resync("a frame over max_socket_bytes")
            return
        queued = self._queued_bytes + size
        # buffered_bytes, spelt out: this runs for every frame and every socket.
        if queued + self.cursor.held_bytes + self._ready_bytes > hub.max_socket_bytes or (
            hub.queued_bytes + size > hub.max_process_bytes and not hub.make_room(size)
        ):
            self.overflow()
            return
        self._queue.append(frame)
        self._queued_bytes = queued
        hub.queued_bytes += size
        self._wake()

    @property
    def buffered_bytes(self) -> int:
        """Bytes of frames this socket has queued, held for a repair, or due to send."""
        return self._queued_bytes + self.cursor.held_bytes + self._ready_bytes

    def overflow(self) -> None:
        """The socket fell too far behind: drop what it buffered and resync it instead."""
        if self._resync_reason != "slow consumer":
            self.stats.incr("slow_consumers")
            logger.warning(
                "slow consumer: dropped %d buffered bytes, resyncing session_id=%s",
                self.buffered_bytes,
                self.session_id,
            )
        self.discard()
        self.request_resync("slow consumer")

    def request_resync(self, reason: str) -> None:
        """Repair the socket with a fresh snapshot before the next frame it is sent."""
        self._resync_reason = reason
        self._wake()

    def discard(self) -> None:
        """Drop every frame queued, held or due to send: a resync supersedes them all."""
        self.hub.queued_bytes -= self._queued_bytes + self._ready_bytes
        self._queued_bytes = self._ready_bytes = 0
        self._queue.clear()
        self._ready.clear()
        self.cursor.give_up()

    def end(self) -> None:
        """End the iteration once the queued frames are read."""
        self._ended = True
        self._wake()

    def _wake(self) -> None:
        """Wake the consuming task, or make its next wait return at once."""
        if self._wakeup.value == 0:
            self._wakeup.release()

    # Consuming (the socket's task).

    def __aiter__(self) -> SessionStream:
        """Iterate over the JSON texts to send."""
        return self

    async def __anext__(self) -> str:
        """Return the next frame to send: a snapshot, a newer update or a chained patch."""
        return (await self._next_frame()).text

    async def _next_frame(self) -> Frame:
        while not self._ready:
            if self._resync_reason is not None:
                await self._repair()
                continue
            if self._queue:
                frame = self._queue.popleft()
                self._queued_bytes -= frame.size
                self.hub.queued_bytes -= frame.size
                if self._judge(frame):
                    return frame  # nothing else is due before it: sent as it is judged
                continue
            if self._ended:
                raise StopAsyncIteration
            await self._wakeup.acquire()  # may wake once more than needed: the loop looks again
        frame = self._ready.popleft()
        self._ready_bytes -= frame.size
        self.hub.queued_bytes -= frame.size
        return frame

    def _release(self, frame: Frame) -> None:
        """Make ``frame`` the next to send after those already due."""
        self._ready.append(frame)
        self._ready_bytes += frame.size
        self.hub.queued_bytes += frame.size

    def _judge(self, frame: Frame) -> bool:
        """Judge a queued frame with the cursor; whether it is to be sent now."""
        verdict = self.cursor.offer(frame)
        if verdict is Verdict.EMIT:
            self.stats.incr(
                "patches_forwarded" if frame.kind is Kind.PATCH else "updates_forwarded"
            )
            return True
        if verdict is Verdict.DROP:
            self.stats.incr("stale_dropped")
        elif verdict is Verdict.VERIFY:
            self.stats.incr("stale_dropped")
            self.request_resync(f"a frame older than the live version {self.cursor.version}")
        else:
            self.stats.incr("gaps")
            if self._resync_reason is None:
                self.request_resync(
                    f"a patch that does not chain base_version={frame.base_version} "
                    f"socket_version={self.cursor.version}"
                )
        return False

    async def _repair(self) -> None:
        """Load snapshots until one makes the socket current, or end the stream.

        A load that fails, or whose snapshot does not reach the patches held for it (the
        loader is behind the publisher), is tried again after each of
        :data:`RESYNC_RETRY_DELAYS`. When none succeeds the stream ends, whatever asked for
        the repair: the socket closes and the client reconnects for a fresh snapshot, rather
        than stay on a state that may be old with nothing coming to fix it.
        """
        reason, self._resync_reason = self._resync_reason, None
        if self.cursor.gap and await self._catch_up():
            return
        if self._resync is None:
            dropped = self.cursor.give_up()
            self.stats.incr("patches_unrepaired", dropped)
            # Once per stream at WARNING: a stream without a resync has this on every gap.
            log = logger.debug if self._warned_no_resync else logger.warning
            self._warned_no_resync = True
            log(
                "updates may have been missed and there is no resync session_id=%s reason=%s",
                self.session_id,
                reason,
            )
            return
        logger.info("resyncing session_id=%s reason=%s", self.session_id, reason)
        for delay in (*RESYNC_RETRY_DELAYS, None):
            snapshot = await self._load()
            if snapshot is not None:
                self._reset(snapshot)
                if not self.cursor.repairing:
                    return
                # A streamed answer is ahead of its last checkpoint: its producer has the rest.
                if self.cursor.gap and await self._catch_up():
                    return
                logger.info(
                    "the snapshot at version %s does not reach the patches held for it; "
                    "loading again session_id=%s",
                    snapshot.version,
                    self.session_id,
                )
            if delay is not None:
                await anyio.sleep(delay)
        self.stats.incr("patches_unrepaired", self.cursor.give_up())
        logger.error(
            "the socket could not be repaired: no resync made it current; ending the stream so "
            "the client reconnects session_id=%s reason=%s",
            self.session_id,
            reason,
        )
        self.discard()
        self.end()

    async def _catch_up(self) -> bool:
        """Ask the session's producer to fill the gap; whether the socket is current after.

        One round trip, and no database load: a streamed answer's producer holds the text
        since its last checkpoint (:class:`~asgi_session_sync.streaming.AnswerStream`).
        """
        version = self.cursor.version
        assert version is not None
        self.stats.incr("catch_ups")
        try:
            data = await self.hub.backend.catch_up(self.session_id, version)
        except Exception:
            logger.exception("catch-up failed session_id=%s", self.session_id)
            data = None
        if data is None:
            self.stats.incr("catch_up_failures")
            return False
        try:
            parsed = parse_frame(data.decode(), size=len(data))
        except UnicodeDecodeError:
            parsed = "not UTF-8"
        emitted = None
        if isinstance(parsed, str):
            problem: str | None = parsed
        else:
            problem = _misdirected(parsed, self.session_id)
            if self.owner is not None and parsed.owner not in (None, self.owner):
                problem = "it names another owner"
            if problem is None:
                emitted = self.cursor.catch_up(parsed)
        if emitted is None:
            self.stats.incr("catch_up_failures")
            logger.warning(
                "a producer's catch-up was not used session_id=%s version=%s reason=%s",
                self.session_id,
                version,
                problem or "it does not chain from the socket's version",
            )
            return False
        for frame in emitted:
            self._release(frame)
        self.stats.incr("patches_forwarded", len(emitted))
        return not self.cursor.repairing

    def _reset(self, snapshot: Frame) -> None:
        if snapshot.owner is not None:
            self.owner = snapshot.owner
        emitted = self.cursor.reset(snapshot)
        self.stats.incr("snapshots_forwarded")
        for frame in emitted:
            self._release(frame)
        if len(emitted) > 1:
            self.stats.incr("patches_forwarded", len(emitted) - 1)

    async def _load(self) -> Frame | None:
        assert self._resync is not None
        self.stats.incr("resyncs")
        try:
            async with self.hub.resync_limiter:
                result = await self._resync()
        except Exception:
            logger.exception("resync failed session_id=%s", self.session_id)
            result = None
        if isinstance(result, str):
            result = _as_reset(result)
            if result is None:
                logger.error(
                    "resync returned text that is not a snapshot session_id=%s", self.session_id
                )
        if result is None:
            self.stats.incr("resync_failures")
        return result

    async def forward(
        self,
        socket: SessionSocket,
        receive: Callable[[], Awaitable[Mapping[str, Any]]],
        *,
        on_message: Callable[[Mapping[str, Any]], Awaitable[object]] | None = None,
        heartbeat: float | None = None,
    ) -> None:
        """Send every frame to ``socket`` until the client disconnects.

        The loop every WebSocket or event-stream handler needs: one task sends the frames, this
        one reads ``receive``, since reading is how an app learns that the client left. Client
        messages go to ``on_message`` (or are dropped). Returns on ``websocket.disconnect`` or
        ``http.disconnect``, or when the stream ends (the bridge closed, or a repair failed for
        good: the client then reconnects; an event stream's response is ended for it). An
        exception from the socket's send (the client left mid-send: the framework's disconnect
        error) propagates as it is.

        Args:
            socket: The socket :meth:`asgi_session_sync.SessionSync.accept` (or
                :meth:`~asgi_session_sync.SessionSync.accept_sse`) returned.
            receive: The raw ASGI receive of the connection: ``websocket.receive`` (Starlette,
                FastAPI), ``socket.receive`` (Litestar), ``request.receive`` for an event
                stream.
            on_message: Called with each ``websocket.receive`` message the client sends.
            heartbeat: Seconds of quiet after which a ``{"type": "heartbeat"}`` frame is sent
                (within 1.25 times this), so the client receives something at least that often
                and can tell a dead socket from a quiet session. ``None`` (the default) sends
                none.

        Raises:
            ValueError: ``heartbeat`` is not a positive number.
        """
        if heartbeat is not None and not heartbeat > 0:
            raise ValueError(f"heartbeat must be positive seconds or None: got {heartbeat!r}")
        if socket.transport == "sse" and socket.refused:
            return  # answered with its refused status: there is no stream to feed
        self.attach(socket)
        failure: Exception | None = None
        sent = 0  # frames sent, for the heartbeat task to tell quiet from busy
        ended = False  # the stream ended (not the client)

        async with anyio.create_task_group() as tg:

            async def sending(produce: Callable[[], Awaitable[None]]) -> None:
                nonlocal failure
                try:
                    await produce()
                except Exception as exc:  # re-raised below, outside the task group
                    failure = exc
                tg.cancel_scope.cancel()  # failed, or the stream ended: nothing more to send

            async def send_frames() -> None:
                # The only task that sends, so frames and heartbeats never interleave and a
                # frame costs no lock and no clock read.
                nonlocal sent, ended
                while True:
                    try:
                        frame = await self._next_frame()
                    except StopAsyncIteration:
                        ended = True
                        return
                    await socket.send_frame(frame)
                    sent += 1

            async def send_heartbeats() -> None:
                # Looks four times a period: a heartbeat goes into the stream after a whole
                # period without a frame, between 1 and 1.25 periods after the last one.
                assert heartbeat is not None
                seen, quiet = sent, 0
                while True:
                    await anyio.sleep(heartbeat / _HEARTBEAT_LOOKS)
                    if sent != seen:
                        seen, quiet = sent, 0
                        continue
                    quiet += 1
                    if quiet == _HEARTBEAT_LOOKS:
                        quiet = 0
                        # None while frames wait to be sent (a send blocked on a slow client):
                        # they are the sign of life, and heartbeats must not pile up.
                        if not self._ready:
                            self._release(_HEARTBEAT_FRAME)
                            self._wake()
                            self.stats.incr("heartbeats")

            tg.start_soon(sending, send_frames)
            if heartbeat is not None:
                tg.start_soon(sending, send_heartbeats)
            while True:
                message = await receive()
                if message["type"] in _DISCONNECTS:
                    break
                if on_message is not None and message["type"] == "websocket.receive":
                    await on_message(message)
            tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if ended and socket.transport == "sse":
            # The client reconnects (EventSource does by itself) for a fresh snapshot.
            await socket.end_stream()
