"""Publishing committed changes to the session's WebSockets, over the NATS bridge."""

from __future__ import annotations

import logging
from typing import Any

from asgi_session_sync.nats import NatsBridge

from .models import SessionView
from .store import Claim, InteractionChange

__all__ = ["SessionPublisher"]

logger = logging.getLogger("examples.chat")


class SessionPublisher:
    """Publishes each ``version + 1`` commit after it is made.

    Every change goes out as a JSON Patch (RFC 6902) of the one interaction it changes, chained
    from the version before: a prompt appends its interaction (``add`` at
    ``/interactions/-``); a claim, a stop, an interruption or the end of an answer replaces
    fields of it. What a client receives per change is the same in a session of 10
    interactions as in one of 1,000 (a full state of a large session would not even fit in a
    NATS message), and nothing is reloaded to publish it. A client that missed a patch is
    resynced from the loader by the bridge, so the snapshot stays the only full state a socket
    ever needs.

    An answer's text is not published here: its
    :class:`~asgi_session_sync.streaming.AnswerStream` publishes it as ``append`` deltas.

    A failed publish is logged, never raised: the database already has the change, and
    clients get it with the resync after broker trouble, or with their next snapshot.

    Args:
        bridge: An open bridge.
    """

    def __init__(self, bridge: NatsBridge) -> None:
        self._bridge = bridge

    async def publish_prompt(self, view: SessionView) -> None:
        """Publish a prompt as committed: ``view`` is the state with its interaction last."""
        patch: list[dict[str, Any]] = [
            {"op": "add", "path": "/interactions/-", "value": view["interactions"][-1]}
        ]
        await self._publish_patch(view["id"], view["owner"], patch, view["version"])

    async def publish_claim(self, claim: Claim) -> None:
        """Publish a claim: the interaction is ``streaming``."""
        status = f"/interactions/{claim.position}/status"
        patch = [{"op": "replace", "path": status, "value": "streaming"}]
        await self._publish_patch(claim.session_id, claim.owner, patch, claim.version)

    async def publish_change(self, change: InteractionChange) -> None:
        """Publish a change of an interaction's fields (a stop, an interruption, an end)."""
        interaction = f"/interactions/{change.position}"
        patch = [
            {"op": "replace", "path": f"{interaction}/{field}", "value": value}
            for field, value in change.values.items()
        ]
        await self._publish_patch(change.session_id, change.owner, patch, change.version)

    async def _publish_patch(
        self, session_id: str, owner: str, patch: list[dict[str, Any]], version: int
    ) -> None:
        # These changes bump the version by exactly one, in the transaction that makes them:
        # the state at version - 1 is the state this patch was computed against. (An answer
        # stream's checkpoints are the writes that do not: they publish their own deltas.)
        try:
            await self._bridge.publish_patch(
                session_id, patch, base_version=version - 1, version=version, owner=owner
            )
        except Exception:
            logger.warning(
                "publish failed session_id=%s version=%s", session_id, version, exc_info=True
            )
