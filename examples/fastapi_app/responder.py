"""Simulated responses, streamed token by token: commit each change, then publish it."""

from __future__ import annotations

import logging

import anyio
from anyio.abc import TaskGroup

from asgi_session_sync.nats import NatsBridge

from .schemas import SessionView
from .store import ChatStore

logger = logging.getLogger("examples.fastapi_app")

# Fifteen words: the default response, one word per token.
_ANSWER = (
    "Here is a simulated answer, streamed token by token: each one committed, then published live."
)


def simulated_tokens(count: int) -> list[str]:
    """The tokens of a simulated response; joined, they are its final text."""
    words = _ANSWER.split()
    return [(" " if i else "") + words[i % len(words)] for i in range(count)]


class Responder:
    """Streams simulated responses and publishes every change to the session's watchers.

    Each response streams in a task of ``task_group``, the app's lifespan task group: it
    outlives the request that started it, and ends (cancelled) when the app shuts down.

    Args:
        store: Where each token is committed.
        bridge: Where each committed state is published.
        task_group: Owner of the streaming tasks.
        tokens: Tokens in each response.
        interval: Seconds between two tokens.
    """

    def __init__(
        self,
        store: ChatStore,
        bridge: NatsBridge,
        task_group: TaskGroup,
        *,
        tokens: int,
        interval: float,
    ) -> None:
        self._store = store
        self._bridge = bridge
        self._task_group = task_group
        self._tokens = tokens
        self._interval = interval

    def start(self, session_id: str, interaction_id: int) -> None:
        """Start streaming the response of an interaction; returns at once."""
        self._task_group.start_soon(
            self._stream, session_id, interaction_id, name=f"response session_id={session_id}"
        )

    async def publish(self, view: SessionView) -> None:
        """Publish a committed state. A failure is logged, not raised: the database has it,
        and watchers get it with the next update or the resync after broker trouble."""
        try:
            await self._bridge.publish(view.id, view, owner=view.owner, version=view.version)
        except Exception:
            logger.exception("publish failed session_id=%s version=%s", view.id, view.version)

    async def _stream(self, session_id: str, interaction_id: int) -> None:
        tokens = simulated_tokens(self._tokens)
        last = len(tokens) - 1
        try:
            for index, token in enumerate(tokens):
                await anyio.sleep(self._interval)
                view = await self._store.append_to_response(
                    session_id, interaction_id, token, done=index == last
                )
                if view is None:
                    logger.info("session gone, response stopped session_id=%s", session_id)
                    return
                await self.publish(view)
        except Exception:
            # A failed stream must not take the lifespan task group, and the app, down with it.
            logger.exception("response stream failed session_id=%s", session_id)
