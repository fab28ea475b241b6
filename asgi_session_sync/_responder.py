"""One served WebSocket: holds the app's accept until the snapshot is loaded, then sends both."""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable
from dataclasses import dataclass

import anyio

from ._fetcher import FirstFrame, SnapshotFetcher
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
    """The app is in ``send(accept)``, held while the first frame loads; other sends wait."""
    FENCING = "fencing"
    """Accepted with a versioned first frame: stale event frames are dropped."""
    SETTLED = "settled"
    """Everything passes to the server's ``send`` unchanged."""


_SETTLED = Phase.SETTLED
_NOTHING = FirstFrame(None, None)


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
        "_accepted",
        "_ctx",
        "_fence",
        "_fetcher",
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
        self._accepted: anyio.Event | None = None  # made only if an app task must wait
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
            if message["type"] == "websocket.send" and not self._admit(message):
                return
        elif phase is Phase.LOADING:
            # Another of the app's tasks sends while the accept is held: nothing may overtake
            # the accept and the snapshot, so it waits and then goes through the new phase.
            if self._accepted is None:
                self._accepted = anyio.Event()
            await self._accepted.wait()
            await self.send_with_snapshot(message)
            return
        elif message["type"] == "websocket.accept":
            await self._accept(message)
            return
        elif message["type"] in ("websocket.close", "websocket.http.response.start"):
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
            self._settle(first.version)
        finally:
            if self.phase is Phase.LOADING:  # the load or the accept raised, or was cancelled
                self.phase = _SETTLED
            if self._accepted is not None:
                self._accepted.set()

    async def _first_frame(self) -> FirstFrame:
        ctx = await self._context()
        if ctx is None:
            return _NOTHING
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

    def _settle(self, version: Version | None) -> None:
        self.version = version
        settings = self._settings
        if version is None or settings.fence_max_frames == 0:
            self.phase = _SETTLED
            return
        self._fence = VersionFence(
            self.session_id,
            version,
            event_types=settings.fence_event_types,
            max_frames=settings.fence_max_frames,
            max_seconds=settings.fence_max_seconds,
        )
        self.phase = Phase.FENCING

    def _admit(self, message: Message) -> bool:
        text = message.get("text")
        if text is None:
            return True
        assert self._fence is not None
        verdict = self._fence.admit(text)
        if verdict is None:
            self._fence = None  # caught up or out of the window: stop reading frames
            self.phase = _SETTLED
            return True
        if not verdict:
            self._fetcher.stats.incr("fenced_frames")
        return verdict

    async def resync(self) -> str | None:
        """Load the session afresh for this connection and return the snapshot frame's text.

        For code that must resend the current state on a live connection (the NATS bridge
        after a broker restart or a lost update): same loader, user, timeout and limits as
        the first snapshot, never the TTL cache, and never a load that started before this
        call. Returns ``None`` when there is nothing to send; the reason is logged.
        """
        ctx = await self._context()
        if ctx is None:
            return None
        frame = await self._fetcher.snapshot(ctx, fresh=True)
        return None if frame is None or frame.data is None else frame.data.decode()

    async def _context(self) -> SessionContext | None:
        """The loader's context, authenticated once per connection; ``None`` if that failed."""
        if self._ctx is None:
            ctx = SessionContext(self.session_id, self.scope, self.scope.get("user"), self._since())
            self._ctx = await self._fetcher.context(ctx)
        return self._ctx

    def _since(self) -> Version | None:
        values = query_values(self.scope, self._settings.since_param)
        if len(values) != 1:
            return None
        since = parse_version(values[0])
        if since is None:
            logger.debug("ignored since: not a version session_id=%s", self.session_id)
        return since
