"""Stopping an answer: what ``POST /api/sessions/{id}/interactions/{position}/stop`` does.

Both examples' endpoints call :func:`stop_answer` and map its :class:`StopOutcome` to a status
code. A streaming answer is stopped by its producer, the worker's
:class:`~asgi_session_sync.streaming.AnswerStream`, asked over NATS: it ends the answer
``cancelled`` with the text it has, commits it and publishes it to every socket. A prompt no
worker has claimed yet is cancelled here, in the database. Nothing else stops an answer:
closing or reloading a page never does.
"""

from __future__ import annotations

import enum
import logging

import anyio

from asgi_session_sync.nats import NatsBridge

from .models import FINAL_STATUSES
from .publishing import SessionPublisher
from .store import ChatStore

__all__ = ["StopOutcome", "stop_answer"]

logger = logging.getLogger("examples.chat")

# A claim commits "streaming" a moment before its stream answers stop requests: ask again.
_ATTEMPTS = 3
_RETRY_DELAY = 0.1  # seconds


class StopOutcome(enum.Enum):
    """What a stop request did."""

    STOPPING = "stopping"
    """The worker streaming the answer acknowledged: it ends ``cancelled`` (HTTP 202)."""
    CANCELLED = "cancelled"
    """The prompt was still pending: it is ``cancelled`` now, committed and published (200)."""
    ALREADY_FINAL = "already final"
    """The answer had ended: complete, cancelled or interrupted (409)."""
    NOT_FOUND = "not found"
    """No such interaction in a session of this user's (404)."""
    NO_PRODUCER = "no producer"
    """The answer is streaming, but no worker answered: its worker is gone, and the lease
    sweeper will mark it interrupted (503)."""


async def stop_answer(
    store: ChatStore,
    bridge: NatsBridge,
    publisher: SessionPublisher,
    session_id: str,
    owner: str,
    position: int,
) -> StopOutcome:
    """Stop the answer of the interaction at ``position``, if ``owner`` owns its session.

    Asks the producer of a streaming answer (``bridge.stop_answer``), or cancels a pending
    prompt in the database (one ``version + 1`` commit, published). A worker that claims the
    prompt meanwhile is asked in turn.
    """
    for _ in range(_ATTEMPTS):
        status = await store.interaction_status(session_id, owner, position)
        if status is None:
            return StopOutcome.NOT_FOUND
        if status in FINAL_STATUSES:
            return StopOutcome.ALREADY_FINAL
        if status == "pending":
            change = await store.cancel_pending(session_id, owner, position)
            if change is not None:
                await publisher.publish_change(change)
                logger.info("prompt cancelled session_id=%s position=%d", session_id, position)
                return StopOutcome.CANCELLED
            continue  # claimed meanwhile: ask its worker
        if await bridge.stop_answer(session_id, f"/interactions/{position}/response"):
            logger.info("answer stopping session_id=%s position=%d", session_id, position)
            return StopOutcome.STOPPING
        await anyio.sleep(_RETRY_DELAY)
    logger.warning("no producer answered a stop session_id=%s position=%d", session_id, position)
    return StopOutcome.NO_PRODUCER
