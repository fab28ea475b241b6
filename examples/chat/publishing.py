"""Publishing committed changes to the session's WebSockets, over the NATS bridge."""

from __future__ import annotations

import logging
from typing import Any

from asgi_session_sync.nats import NatsBridge

from .models import SessionView
from .store import Claim, Interruption, TokenCommit

__all__ = ["SessionPublisher"]

logger = logging.getLogger("examples.chat")


class SessionPublisher:
    """Publishes each committed change with its version, after the commit.

    Every change goes out as a JSON Patch (RFC 6902) of the one interaction it changes, chained
    from the version before: a prompt appends its interaction (``add`` at
    ``/interactions/-``), a streamed token or an interruption replaces fields of it. What a
    client receives per change is the same in a session of 10 interactions as in one of 1,000
    (a full state of a large session would not even fit in a NATS message), and nothing is
    reloaded to publish it. A client that missed a patch is resynced from the loader by the
    bridge, so the snapshot stays the only full state a socket ever needs.

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

    async def publish_token(self, claim: Claim, commit: TokenCommit) -> None:
        """Publish one committed token: the response so far, and ``done`` with the last."""
        interaction = f"/interactions/{claim.position}"
        patch: list[dict[str, Any]] = [
            {"op": "replace", "path": f"{interaction}/response", "value": commit.response}
        ]
        if commit.done:
            patch.append({"op": "replace", "path": f"{interaction}/done", "value": True})
        await self._publish_patch(claim.session_id, claim.owner, patch, commit.version)

    async def publish_interruption(self, interruption: Interruption) -> None:
        """Publish an interaction marked interrupted: final, with the reason."""
        interaction = f"/interactions/{interruption.position}"
        patch: list[dict[str, Any]] = [
            {"op": "replace", "path": f"{interaction}/done", "value": True},
            {"op": "replace", "path": f"{interaction}/interrupted", "value": interruption.reason},
        ]
        await self._publish_patch(
            interruption.session_id, interruption.owner, patch, interruption.version
        )

    async def _publish_patch(
        self, session_id: str, owner: str, patch: list[dict[str, Any]], version: int
    ) -> None:
        # Every change bumps the version by exactly one, in the transaction that makes it:
        # the state at version - 1 is the state this patch was computed against.
        try:
            await self._bridge.publish_patch(
                session_id, patch, base_version=version - 1, version=version, owner=owner
            )
        except Exception:
            logger.warning(
                "publish failed session_id=%s version=%s", session_id, version, exc_info=True
            )
