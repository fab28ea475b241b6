"""The response worker: a process apart from the API that streams every response.

It claims a pending prompt, then for each token commits it (with the session's version bump
and a renewed lease) and publishes it. It keeps no state of its own between tokens: kill the
API and the stream goes on, since the worker reconnects to NATS by itself and the database
has every token; kill the worker and its lease expires, and the API marks the response
interrupted.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from itertools import cycle, islice
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.abc
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_session_sync.nats import NatsBridge

from .publishing import SessionPublisher
from .store import ChatStore, Claim

__all__ = [
    "ResponseWorker",
    "WorkerSettings",
    "run_worker",
    "simulated_tokens",
    "without_credentials",
]

logger = logging.getLogger("examples.chat")

_ANSWER = (
    "Here is a simulated answer, streamed to your browser one token at a time while the "
    "worker commits each one to the database and publishes it over NATS."
)

# Seconds between two attempts to reach NATS, at startup and after losing it: the API's
# embedded broker comes back in well under a second after a restart.
NATS_RECONNECT_WAIT = 0.25


def simulated_tokens(count: int) -> list[str]:
    """The ``count`` tokens of the simulated response, one word each; joined, its final text."""
    words = list(islice(cycle(_ANSWER.split()), count))
    return [(" " if index else "") + word for index, word in enumerate(words)]


def without_credentials(url: str) -> str:
    """``url`` without the user and password it may carry, for logs."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker runs.

    Attributes:
        database_url: SQLAlchemy URL with an asyncio driver.
        nats_url: Where to publish; it may carry credentials (a secret: log
            :func:`without_credentials` of it).
        tokens: Tokens in each simulated response.
        token_interval: Seconds between two tokens.
        lease: Seconds a claim holds without renewal; the worker renews it with every token
            and at least three times per lease while it streams.
        poll_interval: Seconds between two looks for a pending prompt when there is none.
        max_streams: Responses streamed at once.
    """

    database_url: str
    nats_url: str = field(repr=False)  # may carry credentials
    tokens: int = 15
    token_interval: float = 0.2
    lease: float = 10.0
    poll_interval: float = 0.1
    max_streams: int = 16


class ResponseWorker:
    """Claims pending prompts and streams their responses, each under a lease.

    Args:
        store: The chat store.
        publisher: Publishes each committed token.
        settings: Tokens, timing and the lease.
        name: This worker's name, recorded on the interactions it claims.
    """

    def __init__(
        self,
        store: ChatStore,
        publisher: SessionPublisher,
        settings: WorkerSettings,
        *,
        name: str | None = None,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._settings = settings
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self._streams = anyio.Semaphore(settings.max_streams)

    async def run(self) -> None:
        """Claim and stream responses until cancelled.

        A lookup for work that fails (the database is down) is logged and retried.
        """
        async with anyio.create_task_group() as streams:
            while True:
                await self._streams.acquire()
                try:
                    claim = await self._store.claim(self.name, lease=self._settings.lease)
                except Exception:
                    logger.warning("claiming a prompt failed, retrying", exc_info=True)
                    claim = None
                if claim is None:
                    self._streams.release()
                    # A real app would wake on a queue; a short poll keeps the demo small.
                    await anyio.sleep(self._settings.poll_interval)
                    continue
                streams.start_soon(self._stream_and_release, claim)

    async def _stream_and_release(self, claim: Claim) -> None:
        try:
            await self.stream(claim)
        finally:
            self._streams.release()

    async def stream(self, claim: Claim) -> None:
        """Stream the claimed response to its end, or until the claim is lost.

        Never raises (but for cancellation): a failure is logged, and the lease, no longer
        renewed, lets the API mark the response interrupted.
        """
        logger.info("streaming session_id=%s position=%d", claim.session_id, claim.position)
        tokens = simulated_tokens(self._settings.tokens)
        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(self._keep_lease, claim, task_group.cancel_scope)
                for index, token in enumerate(tokens):
                    await anyio.sleep(self._settings.token_interval)
                    commit = await self._store.append_token(
                        claim, token, done=index == len(tokens) - 1, lease=self._settings.lease
                    )
                    if commit is None:
                        logger.warning(
                            "claim lost, stream stopped session_id=%s position=%d",
                            claim.session_id,
                            claim.position,
                        )
                        break
                    await self._publisher.publish_token(claim, commit)
                task_group.cancel_scope.cancel()
        except Exception:
            logger.exception(
                "streaming failed session_id=%s position=%d", claim.session_id, claim.position
            )

    async def _keep_lease(self, claim: Claim, stream: anyio.CancelScope) -> None:
        """Renew the lease between tokens too, so a slow token never loses it."""
        while True:
            await anyio.sleep(self._settings.lease / 3)
            try:
                held = await self._store.renew(claim, lease=self._settings.lease)
            except Exception:
                logger.warning("renewing a lease failed session_id=%s", claim.session_id)
                continue
            if not held:
                logger.warning("lease lost session_id=%s", claim.session_id)
                stream.cancel()
                return


async def run_worker(settings: WorkerSettings) -> None:
    """Run a worker until cancelled: open the store, reach NATS (retrying), stream responses.

    The bridge reconnects to NATS on its own after a broker restart, forever; publishes made
    meanwhile are buffered by the NATS client and sent on reconnect.
    """
    async with (
        ChatStore(create_async_engine(settings.database_url)) as store,
        AsyncExitStack() as stack,
    ):
        bridge = await _enter_bridge(stack, settings.nats_url)
        logger.info("worker ready nats=%s", without_credentials(settings.nats_url))
        await ResponseWorker(store, SessionPublisher(bridge), settings).run()


async def _enter_bridge(stack: AsyncExitStack, url: str) -> NatsBridge:
    """Open a bridge on ``stack``, retrying until NATS answers (the API may start it later)."""
    while True:
        bridge = NatsBridge(
            url,
            name="chat-worker",
            reconnect_time_wait=NATS_RECONNECT_WAIT,
            startup_timeout=NATS_RECONNECT_WAIT * 8,
        )
        try:
            return await stack.enter_async_context(bridge)
        except ConnectionError:
            logger.info("waiting for NATS url=%s", without_credentials(url))
