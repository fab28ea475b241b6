"""One served event stream: holds the app's response start until the snapshot is loaded.

The Server-Sent Events counterpart of :mod:`asgi_session_sync._responder`. For an HTTP GET on a
served path, the app's ``http.response.start`` is looked at: a 200 whose ``content-type`` is
``text/event-stream`` is held while the snapshot loads, then sent with the snapshot as the
stream's first event (``event: session_update``, ``id:`` its version). Any other response
passes untouched, with no load. The app's events after it are fenced by the ordering cursor as
a WebSocket's frames are, until one moves the client forward or the window ends.
"""

from __future__ import annotations

import enum
import logging
import re
import time
from collections import deque

import anyio

from ._fetcher import FAILED
from ._paths import clip_for_log
from ._responder import ConnectionSettings
from ._types import Message, Scope, Send
from .cursor import Cursor, Verdict
from .protocol import Frame, Kind, parse_frame, sse_event
from .sync import _FROM_SCOPE, SessionSocket

__all__ = ["SseResponder", "StreamPhase"]

logger = logging.getLogger("asgi_session_sync")

# The end of an event: a blank line, whatever the line breaks (HTML's event stream grammar
# allows CRLF, LF and CR).
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_LINE = re.compile(rb"\r\n|\r|\n")
_MAX_PENDING = 1024 * 1024
"""Bytes of an unfinished event the fence holds, at most, before it stops judging."""


class StreamPhase(enum.Enum):
    """Where a served event stream is; each phase says what the app's ``send`` does."""

    AWAITING_START = "awaiting start"
    """The app has not started its response: ``http.response.start`` decides."""
    LOADING = "loading"
    """An event stream's start is held while the snapshot loads; other sends wait their turn."""
    FENCING = "fencing"
    """Started with a versioned snapshot: the app's events are judged by the cursor."""
    SETTLED = "settled"
    """Everything passes to the server's ``send`` unchanged."""


def _may_be_session_event(partial: bytes) -> bool:
    """Whether the start of an event could make it one the fence judges, so it is held: it
    names a session event (or escapes, which could spell one), it ends mid-line, or it has no
    ``data:`` line yet (a comment, an ``event:`` line), so it cannot tell yet."""
    if b"session_" in partial or b"\\u" in partial or not partial.endswith((b"\n", b"\r")):
        return True
    return not any(line.startswith(b"data") for line in _LINE.split(partial))


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


class SseResponder:
    """Wraps one HTTP response's ``send`` so the snapshot is the event stream's first event."""

    __slots__ = (
        "_cursor",
        "_deadline",
        "_events_left",
        "_pending",
        "_queue",
        "_send",
        "_sent",
        "_settings",
        "_socket",
        "_warned_id",
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
        self.phase = StreamPhase.AWAITING_START
        self._socket: SessionSocket | None = None
        self._cursor: Cursor | None = None
        self._pending = b""
        self._sent = 0  # bytes of _pending already sent unjudged
        self._warned_id = False
        self._events_left = 0
        self._deadline = 0.0
        self._queue: deque[anyio.Event] | None = None  # sends waiting while the start is held

    async def send_with_snapshot(self, message: Message) -> None:
        """The app's ``send``: the start and the snapshot together, then fenced events."""
        phase = self.phase
        if phase is StreamPhase.SETTLED:
            await self._send(message)
        elif phase is StreamPhase.FENCING:
            await self._send_fenced(message)
        elif phase is StreamPhase.LOADING:
            await self._send_in_turn(message)
        elif message["type"] == "http.response.start":
            self.phase = StreamPhase.LOADING
            try:
                await self._start(message)
            finally:
                # Also when the load or the start raised or was cancelled: queued sends go on.
                if self.phase is StreamPhase.LOADING:
                    self.phase = StreamPhase.SETTLED
                self._next_turn()
        else:
            # A body before the start breaks the ASGI spec: the server says so, not us.
            logger.warning(
                "no snapshot: the app sent %s before http.response.start session_id=%s",
                message["type"],
                self.session_id,
            )
            self.phase = StreamPhase.SETTLED
            await self._send(message)

    async def _send_in_turn(self, message: Message) -> None:
        """Send ``message`` once the start and the snapshot are out and every send queued
        before it has gone (sse-starlette's pings run in a task of their own)."""
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
            await self.send_with_snapshot(message)
        finally:
            self._next_turn()

    def _next_turn(self) -> None:
        if self._queue:
            self._queue.popleft().set()

    async def _start(self, start: Message) -> None:
        headers = list(start.get("headers", ()))
        content_type = (_header(headers, b"content-type") or b"").split(b";")[0].strip().lower()
        if start.get("status") != 200 or content_type != b"text/event-stream":
            logger.debug(
                "no snapshot: not an event stream status=%s content_type=%r session_id=%s",
                start.get("status"),
                content_type.decode("latin-1")[:64],
                clip_for_log(self.session_id),
            )
            self.phase = StreamPhase.SETTLED  # not an event stream: no load, untouched
            await self._send(start)
            return
        if _header(headers, b"content-encoding") is not None:
            # Compressed inside the app: an event written here would corrupt the stream.
            logger.warning(
                "no snapshot: the event stream is compressed by the app (put compression "
                "middleware outside this one) session_id=%s",
                self.session_id,
            )
            self.phase = StreamPhase.SETTLED
            await self._send(start)
            return
        if _header(headers, b"content-length") is not None:
            # A length the app computed would be wrong once the snapshot is in the body.
            logger.warning(
                "no snapshot: the event stream has a content-length session_id=%s",
                self.session_id,
            )
            self.phase = StreamPhase.SETTLED
            await self._send(start)
            return
        sync = self._settings.sync
        sync.stats.incr("connections")
        ctx = await sync.context(self.scope, self.session_id, _FROM_SCOPE)
        first = FAILED if ctx is None else await sync.fetcher.first_frame(ctx)
        await self._send(start)
        socket = self._socket = SessionSocket(
            sync, self.scope, self._send, self.session_id, ctx, first, transport="sse"
        )
        if first.data is not None:
            await socket.send_snapshot(first.data)
        settings = self._settings
        if socket.version is None or settings.fence_max_frames == 0:
            self.phase = StreamPhase.SETTLED
            return
        self._cursor = Cursor(socket.version, known=True, max_held_bytes=settings.max_held_bytes)
        self._events_left = settings.fence_max_frames
        self._deadline = time.monotonic() + settings.fence_max_seconds
        self.phase = StreamPhase.FENCING

    async def _send_fenced(self, message: Message) -> None:
        if message["type"] != "http.response.body":
            await self._send(message)
            return
        # _pending: the start of an event not yet ended; _sent: how much of it went out
        # unjudged already (an event the fence could not drop is not held back).
        held, sent = self._pending, self._sent
        data = held + bytes(message.get("body", b""))
        self._pending, self._sent = b"", 0
        more = message.get("more_body", False)
        if time.monotonic() >= self._deadline:
            self._settle()  # the window is over: whatever was held goes out now
        start = 0
        passed = bytearray()
        # The held bytes hold no event's end: look from their last three on (a line break
        # can be split between two messages).
        for end in _EVENT_END.finditer(data, max(0, len(held) - 3)):
            block = data[start : end.end()]
            start = end.end()
            if sent:
                passed += block[sent:]  # the rest of an event whose start went out
                sent = 0
                continue
            if self._cursor is None:
                passed += block
                continue
            verdict = self._judge(block)
            if verdict is None or verdict is Verdict.EMIT:
                passed += block
            elif verdict is Verdict.DROP:
                self._settings.sync.stats.incr("fenced_frames")
            else:
                passed += await self._repair()
        rest = data[start:]
        if not sent and rest and not rest.strip(b"\r\n"):
            # Blank lines where an event would start end an empty event: they are not the
            # start of the next one.
            passed += rest
            rest = b""
        if self._cursor is None or not more or len(rest) > _MAX_PENDING:
            passed += rest[sent:]  # settled, the body ends, or an event too large to judge
            self._settle()
        elif sent or (rest and not _may_be_session_event(rest)):
            # Not an event the fence could drop (a body without blank lines, text): sent at
            # once, and the rest of it as it comes; its end is still looked for.
            passed += rest[sent:]
            self._pending, self._sent = rest, len(rest)
        else:
            self._pending = rest
        if passed or not more:
            body = bytes(passed)
            await self._send({"type": "http.response.body", "body": body, "more_body": more})

    def _judge(self, block: bytes) -> Verdict | None:
        """The cursor's verdict on one event, or ``None`` when it is not the fence's to judge."""
        cursor = self._cursor
        assert cursor is not None
        self._events_left -= 1
        if self._events_left < 0 or time.monotonic() >= self._deadline:
            self._settle()
            return None
        frame = self._frame(block)
        if frame is None:
            return None
        verdict = cursor.offer(frame)
        if verdict is Verdict.EMIT:
            self._settle()  # the app's stream has moved the client forward: caught up
        return verdict

    def _frame(self, block: bytes) -> Frame | None:
        """The session event in one event's ``data:`` (or versioned by its ``id:``), if any."""
        data: list[bytes] = []
        event_id: bytes | None = None
        for line in _LINE.split(block):
            field, _, value = line.partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if field == b"data":
                data.append(value)
            elif field == b"id":
                event_id = value
        if data:
            try:
                parsed = parse_frame(b"\n".join(data).decode())
            except UnicodeDecodeError:
                parsed = "not UTF-8"
            if not isinstance(parsed, str) and parsed.kind is not Kind.OTHER:
                if parsed.session_id not in (None, self.session_id):
                    return None  # another session's event: not this snapshot's to judge
                return parsed
        if event_id and not self._warned_id:
            # The browser sends the last id back as Last-Event-ID, read as the session's
            # version: an app's own numbering would be taken for one.
            self._warned_id = True
            logger.warning(
                "an event with its own id on a served event stream: its id comes back as "
                "Last-Event-ID and is read as the session's version; leave ids to session "
                "events session_id=%s id=%r",
                clip_for_log(self.session_id),
                event_id[:32].decode("latin-1"),
            )
        return None

    async def _repair(self) -> bytes:
        """The app sent an event the client cannot apply: a fresh snapshot goes first."""
        assert self._socket is not None
        assert self._cursor is not None
        cursor = self._cursor
        snapshot = await self._socket.resync()
        if snapshot is None:
            cursor.give_up()
            self._settle()
            return b""
        emitted = cursor.reset(snapshot)
        if cursor.repairing:
            cursor.give_up()
        return b"".join(sse_event(frame) for frame in emitted if frame.text)

    def _settle(self) -> None:
        self._cursor = None
        self.phase = StreamPhase.SETTLED
        logger.debug("event stream settled session_id=%s", clip_for_log(self.session_id))
