"""What runs while the app serves: NATS, the bridge, and the responses being streamed."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from itertools import cycle, islice
from types import TracebackType

import anyio
import anyio.abc

from asgi_session_sync.nats import EmbeddedNats, NatsBridge

from .models import SessionView
from .store import SessionStore

__all__ = ["LiveChat", "simulated_reply"]

logger = logging.getLogger("examples.litestar_app")

_REPLY = (
    "Here is a simulated answer, streamed to your browser one token at a time while "
    "the server writes each one to the database and publishes it over NATS."
)

# Seconds between reconnect attempts to NATS. nats-py waits 2 s by default; a demo that restarts
# its broker wants the resync sooner, and one client retrying twice a second costs nothing.
_NATS_RECONNECT_WAIT = 0.5


def simulated_reply(tokens: int) -> list[str]:
    """The ``tokens`` tokens of the simulated response, each a word and its trailing space."""
    words = list(islice(cycle(_REPLY.split()), tokens))
    return [word + " " for word in words[:-1]] + words[-1:]


class LiveChat:
    """The running parts of the app: the NATS bridge, and a task group streaming responses.

    Use it as an async context manager for the app's lifespan. Entering starts a private
    ``nats-server`` when no NATS URL is configured and opens the bridge; leaving cancels the
    responses still streaming (their interactions stay unfinished in the database), then closes
    the bridge and stops the server.

    Args:
        store: Where sessions live; the source of truth.
        nats_url: The NATS server; ``None`` starts a private one.
        reply_tokens: Tokens in each simulated response.
        token_interval: Seconds between two tokens.
    """

    def __init__(
        self,
        store: SessionStore,
        *,
        nats_url: str | None,
        reply_tokens: int,
        token_interval: float,
    ) -> None:
        self.store = store
        self.nats_url = nats_url
        self.reply_tokens = reply_tokens
        self.token_interval = token_interval
        self._bridge: NatsBridge | None = None
        self._replies: anyio.abc.TaskGroup | None = None
        self._stack: AsyncExitStack | None = None

    @property
    def bridge(self) -> NatsBridge:
        """The open bridge.

        Raises:
            RuntimeError: The app's lifespan has not started.
        """
        if self._bridge is None:
            raise RuntimeError("LiveChat is not running: enter it in the app's lifespan")
        return self._bridge

    async def __aenter__(self) -> LiveChat:
        """Start NATS if needed, open the bridge and the task group of the responses."""
        if self._stack is not None:
            raise RuntimeError("LiveChat is already running")
        async with AsyncExitStack() as stack:
            url = self.nats_url
            if url is None:
                server = await stack.enter_async_context(EmbeddedNats())
                url = server.url
                logger.info("started nats-server url=%s", url)
            bridge = NatsBridge(url, reconnect_time_wait=_NATS_RECONNECT_WAIT)
            await stack.enter_async_context(bridge)
            replies = await stack.enter_async_context(anyio.create_task_group())
            # Registered after the task group, so it runs first on exit: the group then only
            # waits for the cancelled responses, not for them to finish.
            stack.callback(replies.cancel_scope.cancel)
            self._bridge, self._replies = bridge, replies
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Cancel the responses, close the bridge, stop NATS if it is ours."""
        stack, self._stack = self._stack, None
        self._replies = None
        try:
            if stack is not None:
                await stack.__aexit__(exc_type, exc, tb)
        finally:
            self._bridge = None

    async def add_prompt(self, session_id: str, owner: str, prompt: str) -> SessionView | None:
        """Add a prompt to ``owner``'s session and start streaming its response.

        Returns the session with the new, unfinished interaction, or ``None`` when ``owner``
        has no such session.

        Raises:
            RuntimeError: The app's lifespan has not started.
        """
        replies = self._replies
        if replies is None:
            raise RuntimeError("LiveChat is not running: enter it in the app's lifespan")
        session = await self.store.add_prompt(session_id, owner, prompt)
        if session is None:
            return None
        await self.publish(session)
        position = session["interactions"][-1]["position"]
        replies.start_soon(self._stream_reply, session_id, position)
        return session

    async def publish(self, session: SessionView) -> None:
        """Send the committed state to every WebSocket watching the session.

        A failure is logged, not raised: the database already has the change, and clients get
        it with their next snapshot (or the bridge's resync when NATS comes back).
        """
        try:
            await self.bridge.publish(
                session["id"], session, owner=session["owner"], version=session["version"]
            )
        except Exception:
            logger.warning(
                "publish failed session_id=%s version=%s",
                session["id"],
                session["version"],
                exc_info=True,
            )

    async def _stream_reply(self, session_id: str, position: int) -> None:
        tokens = simulated_reply(self.reply_tokens)
        try:
            for index, token in enumerate(tokens):
                await anyio.sleep(self.token_interval)
                session = await self.store.append_to_response(
                    session_id, position, token, done=index == len(tokens) - 1
                )
                if session is None:
                    logger.info("session deleted while streaming session_id=%s", session_id)
                    return
                await self.publish(session)
        except Exception:
            # One failed response must not take the task group, and so the app, down with it.
            logger.exception(
                "streaming a response failed session_id=%s position=%d", session_id, position
            )
