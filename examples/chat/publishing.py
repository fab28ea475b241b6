"""Publishing committed changes to the session's WebSockets, over the NATS bridge."""

from __future__ import annotations

import logging

from asgi_session_sync.nats import NatsBridge

from .models import SessionView
from .store import ChatStore, Claim, Interruption, TokenCommit

__all__ = ["SessionPublisher"]

logger = logging.getLogger("examples.chat")


class SessionPublisher:
    """Publishes each committed change with its version, after the commit.

    A failed publish is logged, never raised: the database already has the change, and
    clients get it with the next one, or with the resync after broker trouble, or with their
    next snapshot.

    Today every change is published as the session's full state, loaded after the commit.
    Streaming as patches (issue 11) replaces only :meth:`publish_token` and
    :meth:`publish_interruption`: each then sends the one changed field of the interaction at
    ``claim.position``, chained from ``version - 1``, instead of loading the session.

    Args:
        bridge: An open bridge.
        store: Where the published state is read from.
    """

    def __init__(self, bridge: NatsBridge, store: ChatStore) -> None:
        self._bridge = bridge
        self._store = store

    async def publish_state(self, view: SessionView) -> None:
        """Publish a state as committed (the API's answer to a change)."""
        try:
            await self._bridge.publish(
                view["id"], view, owner=view["owner"], version=view["version"]
            )
        except Exception:
            logger.warning(
                "publish failed session_id=%s version=%s",
                view["id"],
                view["version"],
                exc_info=True,
            )

    async def publish_token(self, claim: Claim, commit: TokenCommit) -> None:
        """Publish the state after one committed token."""
        await self._publish_current(claim.session_id)

    async def publish_interruption(self, interruption: Interruption) -> None:
        """Publish the state after an interaction was marked interrupted."""
        await self._publish_current(interruption.session_id)

    async def _publish_current(self, session_id: str) -> None:
        try:
            view = await self._store.get_view(session_id)
        except Exception:
            logger.warning("loading to publish failed session_id=%s", session_id, exc_info=True)
            return
        if view is not None:
            await self.publish_state(view)
