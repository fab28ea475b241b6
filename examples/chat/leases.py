"""The lease sweeper: no response is left streaming forever when its worker dies."""

from __future__ import annotations

import logging

import anyio

from .publishing import SessionPublisher
from .store import ChatStore

__all__ = ["LeaseSweeper"]

logger = logging.getLogger("examples.chat")


class LeaseSweeper:
    """Marks interactions whose lease expired as interrupted, and publishes that.

    It runs in the API process, which outlives any worker; run it in every API replica: the
    store's conditional update lets exactly one replica mark (and publish) each expiry.

    Args:
        store: The chat store.
        publisher: Publishes each interruption to the session's WebSockets.
        interval: Seconds between two sweeps; an expired lease is marked within this long.
        claim_within: Seconds a worker then has to claim the session's next pending prompt,
            which waited for the interrupted answer (``LEASE_SECONDS``).
    """

    def __init__(
        self,
        store: ChatStore,
        publisher: SessionPublisher,
        *,
        interval: float,
        claim_within: float,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be positive seconds: got {interval!r}")
        if not claim_within > 0:
            raise ValueError(f"claim_within must be positive seconds: got {claim_within!r}")
        self._store = store
        self._publisher = publisher
        self._interval = interval
        self._claim_within = claim_within

    async def run(self) -> None:
        """Sweep every ``interval`` seconds until cancelled."""
        while True:
            await self.sweep()
            await anyio.sleep(self._interval)

    async def sweep(self) -> int:
        """Mark and publish every expired lease now; return how many were marked.

        A database error is logged and the sweep retried next time, never raised: it must
        not take the API down with it.
        """
        try:
            interruptions = await self._store.interrupt_expired(claim_within=self._claim_within)
        except Exception:
            logger.warning("lease sweep failed, retrying in %ss", self._interval, exc_info=True)
            return 0
        for interruption in interruptions:
            logger.info(
                "lease expired session_id=%s position=%d status=%s reason=%r",
                interruption.session_id,
                interruption.position,
                interruption.values["status"],
                interruption.values["interrupted"],
            )
            await self._publisher.publish_change(interruption)
        return len(interruptions)
