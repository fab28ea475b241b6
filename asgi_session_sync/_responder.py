"""One served WebSocket: holds the app's accept until the snapshot is loaded, then sends both."""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass

import anyio

from ._fetcher import NOTHING, FirstFrame, SnapshotFetcher
from ._paths import clip_for_log, query_values
from ._types import Message, Scope, Send
from .events import Version
from .fence import VersionFence
from .snapshot import SessionContext
from .versions import parse_version

__all__ = ["ConnectionSettings", "Phase", "SnapshotResponder"]

logger = logging.getLogger("asgi_session_sync")


class Phase(enum.Enum):
    """Where a served connection is; each phase says what the app's ``send`` does."""

    AWAITING_ACCEPT = "awaiting accept"
    """The app has not accepted: messages pass; an accept starts the load."""
    LOADING = "loading"
    """The app is in ``send(accept)``, held while the first frame loads; other sends queue."""
    FENCING = "fencing"
    """Accepted with a versioned first frame: stale event frames are dropped."""
    SETTLED = "settled"
    """Everything passes to the server's ``send`` unchanged."""
    CLOSED = "closed"
    """The app returned: frames pass unchanged, and a resync sends nothing."""


_SETTLED = Phase.SETTLED
_REJECTIONS = frozenset({"websocket.close", "websocket.http.response.start"})


@dataclass(frozen=True)
class ConnectionSettings:
    """What every served connection of one middleware shares: made once, at construction."""

    fetcher: SnapshotFetcher
    since_param: str
    fence_event_types: frozenset[str]
    fence_max_frames: int
    fence_max_seconds: float


class SnapshotResponder:
    """Wraps one connection's ``send`` so the snapshot is the first frame after the accept.

    The middleware never reads ``receive``: the accept is held while loading, so the client
    cannot send anything before the app can read it, and there is only ever one reader.
    """

    __slots__ = (
        "_authenticating",
        "_ctx",
        "_fence",
        "_fetcher",
        "_queue",
        "_send",
        "_settings",
        "phase",
        "scope",
        "session_id",
        "version",
    )

    def __init__(
        self, settings: ConnectionSettings, scope: Scope, send: Send, session_id: str
    ) -> None:
        self._settings = settings
        self._fetcher = settings.fetcher
        self._send = send
        self.scope = scope
        self.session_id = session_id
        self.phase = Phase.AWAITING_ACCEPT
        self.version: Version | None = None
        """The version the first frame gave the client (see ``get_snapshot_version``)."""
        # App tasks that send while the accept is held wait here for their turn, in order.
        self._queue: deque[anyio.Event] | None = None  # made only if one must wait
        self._authenticating: anyio.Event | None = None
        self._ctx: SessionContext | None = None
        self._fence: VersionFence | None = None

    def send_with_snapshot(self, message: Message) -> Awaitable[None]:
        """The app's ``send``: the accept and the snapshot together, then fenced frames."""
        if self.phase is _SETTLED:
            return self._send(message)  # the server's send itself: no extra coroutine
        return self._send_unsettled(message)

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
        try:
            first = await self._first_frame()
            # Only now does the client learn it is connected. Whatever the app does once its
            # send(accept) returns (register for broadcasts, subscribe) comes after the
            # snapshot, so nothing published in between is lost to the client.
            await self._send(accept)
            if first.data is not None:
                await self._send_snapshot(first.data)
            self._arm_fence(first.version)
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
            self.phase = _SETTLED if self._fence is None else Phase.FENCING

    async def _send_accepted(self, message: Message) -> None:
        """Send after the accept: dropped if the fence says it is stale."""
        if self._fence is not None and message["type"] == "websocket.send":
            text = message.get("text")
            if text is not None and not self._admit(text):
                return
        await self._send(message)

    async def _first_frame(self) -> FirstFrame:
        ctx = await self._context()
        if ctx is None:
            return NOTHING
        return await self._fetcher.first_frame(ctx)

    async def _send_snapshot(self, data: bytes) -> None:
        try:
            await self._send({"type": "websocket.send", "text": data.decode()})
        except OSError:
            # The client left during the load; the app learns it from receive(), as usual.
            logger.debug("no snapshot: client gone before send session_id=%s", self.session_id)
            return
        except Exception as exc:
            # Servers raise their own types too (hypercorn): a snapshot never breaks the app.
            ctx = self._ctx or SessionContext(self.session_id, self.scope)
            self._fetcher.stats.incr("errors")
            logger.error(
                "no snapshot: the server's send raised session_id=%s path=%r",
                self.session_id,
                clip_for_log(self.scope["path"]),
                exc_info=exc,
            )
            self._fetcher.report(ctx, exc)
            return
        self._fetcher.stats.incr("snapshots_sent")

    def _arm_fence(self, version: Version | None) -> None:
        self.version = version
        settings = self._settings
        if version is None or settings.fence_max_frames == 0:
            return
        self._fence = VersionFence(
            self.session_id,
            version,
            event_types=settings.fence_event_types,
            max_frames=settings.fence_max_frames,
            max_seconds=settings.fence_max_seconds,
        )

    def _admit(self, text: str) -> bool:
        assert self._fence is not None
        verdict = self._fence.admit(text)
        if verdict is None:
            self._fence = None  # caught up or out of the window: stop reading frames
            if self.phase is Phase.FENCING:
                self.phase = _SETTLED
            return True
        if not verdict:
            self._fetcher.stats.incr("fenced_frames")
        return verdict

    def close(self) -> None:
        """Mark the connection over (the app returned): a late resync then sends nothing."""
        self.phase = Phase.CLOSED

    async def resync(self) -> str | None:
        """Load the session afresh for this connection and return the snapshot frame's text.

        For code that must resend the current state on a live connection (the NATS bridge
        after a broker restart or a lost update): same loader, user, timeout and limits as
        the first snapshot, never the TTL cache, and never a load that started before this
        call. Returns ``None`` when there is nothing to send (the reason is logged) and once
        the connection is over.
        """
        ctx = await self._context()
        if ctx is None or self.phase is Phase.CLOSED:
            return None
        frame = await self._fetcher.snapshot(ctx, fresh=True)
        return None if frame is None or frame.data is None else frame.data.decode()

    async def _context(self) -> SessionContext | None:
        """The loader's context, authenticated once per connection; ``None`` if that failed.

        A resync that starts while the first load authenticates shares that call: one-time
        credentials are used once.
        """
        if self._ctx is not None:
            return self._ctx
        if self._authenticating is not None:
            await self._authenticating.wait()
            return self._ctx
        ctx = SessionContext(self.session_id, self.scope, self.scope.get("user"), self._since())
        if self._fetcher.authenticate is None:
            self._ctx = ctx
            return ctx
        authenticating = self._authenticating = anyio.Event()
        try:
            self._ctx = await self._fetcher.context(ctx)
        finally:
            self._authenticating = None
            authenticating.set()
        return self._ctx

    def _since(self) -> Version | None:
        values = query_values(self.scope, self._settings.since_param)
        if len(values) != 1:
            return None
        since = parse_version(values[0])
        if since is None:
            logger.debug("ignored since: not a version session_id=%s", self.session_id)
        return since
