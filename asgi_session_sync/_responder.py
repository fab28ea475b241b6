"""One served WebSocket: holds the app's accept until the snapshot is loaded, then sends both."""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass

import anyio

from ._fetcher import FAILED
from ._types import Message, Scope, Send
from .cursor import Cursor, Verdict
from .protocol import Frame, Kind, Version, parse_frame
from .sync import _FROM_SCOPE, SessionSocket, SessionSync

__all__ = ["ConnectionSettings", "Phase", "SnapshotResponder"]

logger = logging.getLogger("asgi_session_sync")


class Phase(enum.Enum):
    """Where a served connection is; each phase says what the app's ``send`` does."""

    AWAITING_ACCEPT = "awaiting accept"
    """The app has not accepted: messages pass; an accept starts the load."""
    LOADING = "loading"
    """The app is in ``send(accept)``, held while the first frame loads; other sends queue."""
    FENCING = "fencing"
    """Accepted with a versioned first frame: the app's session events are judged by the
    cursor until one moves the client forward or the window ends."""
    SETTLED = "settled"
    """Everything passes to the server's ``send`` unchanged."""
    CLOSED = "closed"
    """The app returned: frames pass unchanged."""


_SETTLED = Phase.SETTLED
_FENCING = Phase.FENCING
_NO_LOCK = anyio.Lock()  # never taken: replaced by a lock of the connection's own when it fences
_REJECTIONS = frozenset({"websocket.close", "websocket.http.response.start"})


def _may_be_session_event(text: str) -> bool:
    """Whether ``text`` could be a session event the fence judges: it names one of their types,
    or holds a JSON escape, which could spell one."""
    return (
        '"session_patch"' in text
        or '"session_update"' in text
        or '"session_synced"' in text
        or "\\u" in text
    )


@dataclass(frozen=True)
class ConnectionSettings:
    """What every served connection of one middleware shares: made once, at construction."""

    sync: SessionSync
    fence_max_frames: int
    fence_max_seconds: float
    max_held_bytes: int


class SnapshotResponder:
    """Wraps one connection's ``send`` so the snapshot is the first frame after the accept.

    The middleware never reads ``receive``: the accept is held while loading, so the client
    cannot send anything before the app can read it, and there is only ever one reader.
    """

    __slots__ = (
        "_cursor",
        "_deadline",
        "_fence_lock",
        "_frames_left",
        "_queue",
        "_send",
        "_settings",
        "_socket",
        "phase",
        "scope",
        "session_id",
    )

    def __init__(
        self, settings: ConnectionSettings, scope: Scope, send: Send, session_id: str
    ) -> None:
        self._settings = settings
        self._send = send
        self.scope = scope
        self.session_id = session_id
        self.phase = Phase.AWAITING_ACCEPT
        # App tasks that send while the accept is held wait here for their turn, in order.
        self._queue: deque[anyio.Event] | None = None  # made only if one must wait
        self._socket: SessionSocket | None = None
        self._cursor: Cursor | None = None
        self._frames_left = 0
        self._deadline = 0.0
        self._fence_lock = _NO_LOCK

    @property
    def version(self) -> Version | None:
        """The version the first frame gave the client; ``None`` before or without one."""
        return None if self._socket is None else self._socket.version

    def send_with_snapshot(self, message: Message) -> Awaitable[None]:
        """The app's ``send``: the accept and the snapshot together, then fenced frames."""
        phase = self.phase
        if phase is _SETTLED:
            return self._send(message)  # the server's send itself: no extra coroutine
        if phase is _FENCING and self._passes(message):
            return self._send(message)  # and here, for what the fence lets pass as it is
        return self._send_unsettled(message)

    def _passes(self, message: Message) -> bool:
        """Whether ``message`` goes out as it is while fencing, judged without a coroutine:
        anything but a text frame, or a text frame that cannot be a session event, while no
        session event is being judged; counted against the window."""
        fence_lock = self._fence_lock
        if fence_lock is not _NO_LOCK and fence_lock.locked():
            return False  # a repair may be sending: every frame waits its turn
        text = message.get("text")
        if text is not None and _may_be_session_event(text):
            return False
        self._frames_left -= 1
        if self._frames_left < 0:
            self._settle()
        return True

    async def _send_unsettled(self, message: Message) -> None:
        phase = self.phase
        if phase is Phase.FENCING:
            await self._send_accepted(message)
        elif phase is Phase.LOADING:
            await self._send_in_turn(message)
        elif phase is Phase.AWAITING_ACCEPT and message["type"] == "websocket.accept":
            await self._accept(message)
        else:
            if phase is Phase.AWAITING_ACCEPT and message["type"] in _REJECTIONS:
                self.phase = _SETTLED  # rejected before accepting: no one to send a snapshot to
            await self._send(message)

    async def _accept(self, accept: Message) -> None:
        self.phase = Phase.LOADING
        sync = self._settings.sync
        try:
            ctx = await sync.context(self.scope, self.session_id, _FROM_SCOPE)
            first = FAILED if ctx is None else await sync.fetcher.first_frame(ctx)
            # Only now does the client learn it is connected. Whatever the app does once its
            # send(accept) returns (register for broadcasts, subscribe) comes after the
            # snapshot, so nothing published in between is lost to the client.
            await self._send(accept)
            socket = self._socket = SessionSocket(
                sync, self.scope, self._send, self.session_id, ctx, first
            )
            if first.data is not None:
                await socket.send_snapshot(first.data)
            self._arm_fence(socket)
        finally:
            # Also when the load or the accept raised or was cancelled: queued sends go on.
            self._next_turn()

    async def _send_in_turn(self, message: Message) -> None:
        """Send ``message`` once the accept and the snapshot are out and every send queued
        before it has gone: concurrent app tasks keep their order on every backend."""
        turn = anyio.Event()
        if self._queue is None:
            self._queue = deque()
        self._queue.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():
                self._next_turn()  # cancelled as its turn came: hand the turn on
            else:
                self._queue.remove(turn)
            raise
        try:
            await self._send_accepted(message)
        finally:
            self._next_turn()

    def _next_turn(self) -> None:
        """Wake the next queued send, or leave the loading phase when none is left."""
        if self._queue:
            self._queue.popleft().set()
        elif self.phase is Phase.LOADING:
            self.phase = _SETTLED if self._cursor is None else Phase.FENCING

    def _arm_fence(self, socket: SessionSocket) -> None:
        settings = self._settings
        if socket.version is None or settings.fence_max_frames == 0:
            return
        self._cursor = Cursor(socket.version, known=True, max_held_bytes=settings.max_held_bytes)
        self._frames_left = settings.fence_max_frames
        # The monotonic clock, not the event loop's: the same instant on every backend, and
        # no backend lookup per connection.
        self._deadline = time.monotonic() + settings.fence_max_seconds

    async def _send_accepted(self, message: Message) -> None:
        """Send after the accept, judged by the cursor while the fence is up."""
        fence_lock = self._fence_lock
        if (self._cursor is None and not fence_lock.locked()) or self._passes(message):
            await self._send(message)
            return
        # One frame at a time while fencing: a repair's snapshot and the frames it releases
        # go out together, and a second app task cannot start a second, older repair. The lock
        # is made when the app first sends a session event while fencing.
        if fence_lock is _NO_LOCK:
            fence_lock = self._fence_lock = anyio.Lock(fast_acquire=True)
        async with fence_lock:
            await self._send_fenced(message)
        if self._cursor is None:
            # The fence ended while this frame held the lock: settle now, unless another frame
            # waits for the lock (none may overtake it; the last one out settles).
            self._settle()

    async def _send_fenced(self, message: Message) -> None:
        cursor = self._cursor
        text = message.get("text")
        frame = None if cursor is None or text is None else self._session_event(text)
        if cursor is None or frame is None:
            await self._send(message)
            return
        verdict = cursor.offer(frame)
        if verdict is Verdict.EMIT:
            self._settle()  # the app's stream has moved the client forward: caught up
            await self._send(message)
        elif verdict is Verdict.DROP:
            self._settings.sync.stats.incr("fenced_frames")
            logger.debug(
                "fenced a stale frame session_id=%s version=%r snapshot_version=%r",
                self.session_id,
                frame.version,
                cursor.version,
            )
        else:
            await self._repair(cursor)

    def _session_event(self, text: str) -> Frame | None:
        """``text`` as a frame the cursor judges, while the fence window is open; else None."""
        self._frames_left -= 1
        if self._frames_left < 0:
            self._settle()
            return None
        # Cheap tests first: most frames on a busy socket are not session events. A JSON
        # escape can spell the type another way (session\u005fpatch): such text is parsed.
        if not _may_be_session_event(text):
            return None
        frame = parse_frame(text)
        if isinstance(frame, str) or frame.kind is Kind.OTHER:
            return None
        if frame.session_id not in (None, self.session_id):
            return None  # another session's event: not this snapshot's to judge
        if time.monotonic() >= self._deadline:  # read only for frames it could drop
            self._settle()
            return None
        return frame

    async def _repair(self, cursor: Cursor) -> None:
        """The app sent a frame the client cannot apply: send a fresh snapshot first."""
        assert self._socket is not None
        snapshot = await self._socket.resync()
        if snapshot is None:
            cursor.give_up()
            self._settle()
            return
        emitted = cursor.reset(snapshot)
        if cursor.repairing:
            # The loader is behind the app: the app's send is no place to wait and load again,
            # so the frames the snapshot does not reach are dropped and the fence judges on.
            cursor.give_up()
        for frame in emitted:
            await self._send({"type": "websocket.send", "text": frame.text})

    def _settle(self) -> None:
        """End the fence. While a frame holds its lock, others may wait for it: the phase
        stays fencing, so later frames queue behind them, until the lock is let go."""
        self._cursor = None
        if self.phase is _FENCING and not self._fence_lock.locked():
            self.phase = _SETTLED

    def close(self) -> None:
        """Mark the connection over (the app returned)."""
        self.phase = Phase.CLOSED
