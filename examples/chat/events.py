"""A session live over Server-Sent Events: the ASGI app both examples' SSE routes return.

The route authenticates the user and checks that the session is theirs, answering 401 or 404
as any endpoint does: an HTTP status cannot change once the stream has started, so a refusal
must come before it. It then returns :class:`SessionEvents`, which the framework calls with the
request's raw ``scope``, ``receive`` and ``send``, as it calls any response.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from asgi_session_sync import SessionSync
from asgi_session_sync.nats import NatsBridge

from .live import HEARTBEAT

__all__ = ["SessionEvents"]

logger = logging.getLogger("examples.chat")

Message = MutableMapping[str, Any]


class SessionEvents:
    """One session's event stream, as an ASGI app: its snapshot first, then every update.

    The first event is the session as the loader returns it (``event: session_update``, ``id:``
    its version), or nothing for a client that resumes with ``?since=`` (or
    ``Last-Event-ID``) and is current. Each update published after it follows as an event with
    its version as ``id:``, and a comment after :data:`~examples.chat.live.HEARTBEAT` seconds
    of quiet keeps proxies from closing the stream, until the client leaves. When the loader
    sends no snapshot (it failed, or the session is gone since the route's owner check), or the
    bridge ends the stream, the response ends: the browser client reopens it, with the backoff
    and ``?since=`` its version.

    Args:
        sync: The snapshot service; its loader checks the owner again, against ``user``.
        bridge: The NATS bridge the updates come from.
        session_id: The session, checked by the route: it exists and ``user`` owns it.
        user: The authenticated user.
        heartbeat: Seconds of quiet after which a comment is sent.
    """

    def __init__(
        self,
        sync: SessionSync,
        bridge: NatsBridge,
        session_id: str,
        user: str,
        *,
        heartbeat: float = HEARTBEAT,
    ) -> None:
        self.sync = sync
        self.bridge = bridge
        self.session_id = session_id
        self.user = user
        self.heartbeat = heartbeat

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        """Stream the session until the client leaves or the stream ends."""
        # Subscribe BEFORE starting the response: the snapshot is loaded by accept_sse, so any
        # update published after that load is already on its way to this subscription.
        async with self.bridge.subscribe(self.session_id) as updates:
            try:
                stream = await self.sync.accept_sse(scope, send, self.session_id, user=self.user)
                if not stream.known:
                    # The response has started (200) and cannot become an error now; ending
                    # it makes the client retry, and the route answers its next try.
                    logger.info(
                        "event stream ended without a snapshot session_id=%s failed=%s",
                        self.session_id,
                        stream.failed,
                    )
                    await stream.end_stream()
                    return
                await updates.forward(stream, receive, heartbeat=self.heartbeat)
            except OSError:
                return  # the client left while an event was being sent (ASGI 2.4 servers)
