"""The response worker: a process apart from the API that streams every response.

It claims a pending prompt (one commit: the interaction is ``streaming``, published), then
streams the answer through an :class:`~asgi_session_sync.streaming.AnswerStream`: each token
is appended to the stream, which publishes the new text as ``append`` deltas (a few dozen a
second at most) and checkpoints the text to the database through
:meth:`~examples.chat.store.ChatStore.checkpoint` (four a second at most, and once at the
end); no token is written or published alone. A last commit marks the interaction done.

It keeps no state that matters between checkpoints: kill the API and the stream goes on,
since the worker reconnects to NATS by itself; kill the worker and its lease, renewed by the
checkpoints, expires, and the API marks the response interrupted. A user's stop request
(``POST .../stop``, answered by the stream over NATS) cancels the generation: the answer ends
``cancelled`` with the text it had.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, field
from itertools import cycle
from urllib.parse import urlsplit, urlunsplit

import anyio
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_session_sync.nats import NatsBridge
from asgi_session_sync.protocol import AnswerStatus
from asgi_session_sync.streaming import AnswerStream, Checkpoint

from .publishing import SessionPublisher
from .roll_call import answering_roll_calls
from .store import ChatStore, Claim, ClaimLost

__all__ = [
    "PUBLISH_INTERVAL",
    "AnswerOutcome",
    "ResponseWorker",
    "WorkerSettings",
    "run_worker",
    "simulated_answer",
    "simulated_tokens",
    "without_credentials",
]

logger = logging.getLogger("examples.chat")

# The simulated answer: 400 words, so that the default answer (RESPONSE_TOKENS=400, a token a
# word) is this text once. Longer answers cycle it, shorter ones end early, a sentence at a time.
_PARAGRAPHS = (
    "This answer comes from the example's worker, a process apart from the API that stands in "
    "for a language model. It writes about fifty tokens a second, one word at a time, into an "
    "answer stream. The stream gathers the words of each twentieth of a second into one small "
    "patch and publishes it over NATS. Your browser receives the new words only, never the "
    "whole answer again, so a long answer costs no more per word than a short one.",
    "The database does not see every word either. The stream saves a checkpoint at most four "
    "times a second, and once more when the answer ends. Each checkpoint is a compare-and-set "
    "on the session's version, in one transaction, so a prompt sent meanwhile is never lost. "
    "The same checkpoints renew the worker's lease on this answer.",
    "Open this session in a second tab, or reload this one, while the answer streams. The new "
    "page loads the session from the database, which may be one checkpoint behind. It then "
    "asks the worker for the words since that checkpoint, and follows the live stream from "
    "there. Both tabs end with the same text, word for word. Closing a tab, or all of them, "
    "never stops the answer.",
    "Only the Stop button does. The API asks the worker to end this answer, the worker saves "
    "what it has written, and every open tab shows the answer as stopped. If the worker dies "
    "instead, nobody renews its lease. The API then marks the answer as interrupted, and every "
    "tab shows the reason.",
    "Each answer carries a status beside its text. It is pending until a worker takes the "
    "prompt, then streaming, with a cursor after the last word, and at last complete, stopped "
    "or interrupted. A session streams one answer at a time: a prompt sent now waits for this "
    "answer to end, then streams in its turn.",
    "Stop the API while an answer streams, and the page reconnects when it is back. The worker "
    "kept streaming and saving checkpoints all along, so nothing is missing. Restart the "
    "broker, and every page is brought up to date from the database. That is the whole idea "
    "of the demo: a snapshot when a page connects, then only what changed, and never a stale "
    "page. Send another prompt to see it again, or open the session as another user to see "
    "that it is private.",
)
# (starts a paragraph, words) for each sentence, in order.
_SENTENCES = [
    (index == 0, sentence.split())
    for paragraph in _PARAGRAPHS
    for index, sentence in enumerate(re.split(r"(?<=[.!?])\s+", paragraph))
]

# Seconds between two attempts to reach NATS, at startup and after losing it: the API's
# embedded broker comes back in well under a second after a restart.
NATS_RECONNECT_WAIT = 0.25
# Seconds the worker waits for NATS at startup before it warns (it goes on waiting): the API,
# started beside it, brings its nats-server up in its lifespan, within seconds even on a busy
# machine; a broker unreachable for this long is a mistake (no API, a wrong NATS_URL).
NATS_STARTUP_PATIENCE = 30.0
PUBLISH_INTERVAL = 0.05
"""Seconds between two publishes of an answer's stream, at least (its deltas coalesce the
tokens of each interval): the stream's default, named so that the page knows it."""

# Seconds the commit that ends an answer (and its publish) may take once the stream is over.
_FINISH_TIMEOUT = 10.0


def simulated_tokens(count: int) -> list[str]:
    """The ``count`` tokens of the simulated response; joined, its final text.

    Whole sentences of :func:`simulated_answer`'s text, cycled, a word a token (with the
    space or paragraph break before it), so that the text always ends with a sentence: the
    last sentence is cut into as many tokens as are left, a few words each when they are fewer
    than its words. The default 400 tokens are the text once.

    Raises:
        ValueError: ``count`` is below 1.
    """
    if count < 1:
        raise ValueError(f"a response has at least one token: got {count}")
    tokens: list[str] = []
    for starts_paragraph, words in cycle(_SENTENCES):
        left = count - len(tokens)
        if left < len(words):
            # The last sentence, in the tokens that are left: it still ends the answer.
            words = [" ".join(words[i * len(words) // left : (i + 1) * len(words) // left])
                     for i in range(left)]  # fmt: skip
        separator = "" if not tokens else "\n\n" if starts_paragraph else " "
        tokens.append(separator + words[0])
        tokens.extend(" " + word for word in words[1:])
        if len(tokens) == count:
            return tokens
    raise AssertionError("unreachable: cycle() never ends")  # pragma: no cover


def simulated_answer() -> str:
    """The simulated response's text, once: paragraphs separated by blank lines."""
    return "\n\n".join(_PARAGRAPHS)


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
        token_interval: Seconds between two tokens (0.02: 50 tokens a second).
        lease: Seconds a claim holds without renewal; the answer's checkpoints renew it
            (four a second at most while text comes), and so does a background renewal every
            third of a lease, for a model that stalls. Also how long the session's next prompt
            may then wait for a worker.
        poll_interval: Seconds between two looks for a pending prompt when there is none.
        max_streams: Responses streamed at once (of different sessions).
    """

    database_url: str
    nats_url: str = field(repr=False)  # may carry credentials
    tokens: int = 400
    token_interval: float = 0.02
    lease: float = 10.0
    poll_interval: float = 0.1
    max_streams: int = 16


@dataclass(frozen=True)
class AnswerOutcome:
    """How one streamed answer ended.

    Attributes:
        status: Its final status; ``interrupted`` when the claim was lost too.
        tokens: Tokens the worker generated (all of them unless it was stopped or failed).
        checkpoints: Checkpoints its stream committed, the final one included.
        publishes: Patches its stream published.
    """

    status: AnswerStatus
    tokens: int
    checkpoints: int
    publishes: int


class ResponseWorker:
    """Claims pending prompts and streams their responses, each under a lease.

    Args:
        store: The chat store.
        bridge: An open bridge: the answers' streams publish and serve stops through it.
        settings: Tokens, timing and the lease.
        name: This worker's name, recorded on the interactions it claims.
    """

    def __init__(
        self,
        store: ChatStore,
        bridge: NatsBridge,
        settings: WorkerSettings,
        *,
        name: str | None = None,
    ) -> None:
        self._store = store
        self._bridge = bridge
        self._publisher = SessionPublisher(bridge)
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

    async def generate(self) -> AsyncGenerator[str, None]:
        """The simulated model: ``settings.tokens`` tokens, one every ``token_interval`` s."""
        interval = self._settings.token_interval
        start = anyio.current_time()
        for index, token in enumerate(simulated_tokens(self._settings.tokens)):
            # On a schedule, not a sleep after each token: the rate holds at any length.
            await anyio.sleep_until(start + (index + 1) * interval)
            yield token

    async def stream(self, claim: Claim) -> AnswerOutcome:
        """Stream the claimed response to its end, a stop, or the loss of the claim.

        Publishes the claim, streams the answer, then commits its end (done, the lease
        cleared) and publishes that. Never raises (but for cancellation, after that last
        commit): a failure is logged, and the answer ends ``interrupted``; a lost claim is the
        lease sweeper's to mark.
        """
        logger.info("streaming session_id=%s position=%d", claim.session_id, claim.position)
        interaction = f"/interactions/{claim.position}"
        status, tokens, answer = AnswerStatus.INTERRUPTED, 0, None
        try:
            # Before the stream's first delta, which is chained from the claim's version.
            await self._publisher.publish_claim(claim)
            async with anyio.create_task_group() as task_group:
                lost = task_group.cancel_scope
                task_group.start_soon(self._keep_lease, claim, lost)

                async def save(checkpoint: Checkpoint) -> int:
                    try:
                        return await self._store.checkpoint(
                            claim, checkpoint, lease=self._settings.lease
                        )
                    except ClaimLost:
                        lost.cancel()  # the answer is not ours any more: stop generating
                        raise

                async with (
                    AnswerStream(
                        self._bridge,
                        claim.session_id,
                        text_path=f"{interaction}/response",
                        status_path=f"{interaction}/status",
                        version=claim.version,
                        checkpoint=save,
                        owner=claim.owner,
                        publish_interval=PUBLISH_INTERVAL,
                    ) as answer,
                    aclosing(self.generate()) as generated,
                ):
                    async for token in generated:
                        answer.append(token)
                        tokens += 1
                status = answer.status
                task_group.cancel_scope.cancel()
        except Exception:
            logger.exception(
                "streaming failed session_id=%s position=%d", claim.session_id, claim.position
            )
        finally:
            # Shielded (and bounded): a worker stopped mid-answer still says it ended.
            with anyio.CancelScope(shield=True), anyio.move_on_after(_FINISH_TIMEOUT):
                await self._finish(claim, status)
        outcome = AnswerOutcome(
            status,
            tokens,
            0 if answer is None else answer.checkpoints,
            0 if answer is None else answer.publishes,
        )
        logger.info(
            "answer ended session_id=%s position=%d status=%s tokens=%d/%d checkpoints=%d",
            claim.session_id,
            claim.position,
            status.value,
            tokens,
            self._settings.tokens,
            outcome.checkpoints,
        )
        return outcome

    async def _finish(self, claim: Claim, status: AnswerStatus) -> None:
        try:
            change = await self._store.finish(claim, status, claim_within=self._settings.lease)
        except Exception:
            # Its lease, no longer renewed, ends it.
            logger.warning("ending an answer failed session_id=%s", claim.session_id, exc_info=True)
            return
        if change is None:
            logger.warning(
                "claim lost, answer left to the lease sweeper session_id=%s position=%d",
                claim.session_id,
                claim.position,
            )
            return
        await self._publisher.publish_change(change)

    async def _keep_lease(self, claim: Claim, stream: anyio.CancelScope) -> None:
        """Renew the lease every third of it, so a model that stalls never loses it."""
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
        worker = ResponseWorker(store, bridge, settings)
        # The page's "Try it" panel shows this worker's pid, from its answer to a roll call.
        await stack.enter_async_context(answering_roll_calls(bridge, worker.name))
        logger.info("worker ready nats=%s", without_credentials(settings.nats_url))
        await worker.run()


async def _enter_bridge(stack: AsyncExitStack, url: str) -> NatsBridge:
    """Open a bridge on ``stack``, retrying until NATS answers (the API may start it later).

    The launcher starts the worker beside the API, whose nats-server comes up with the API's
    lifespan: waiting for it is normal, so it is said once at INFO (each retry at DEBUG). Only a
    broker still unreachable after :data:`NATS_STARTUP_PATIENCE` s is a WARNING, said once.
    """
    shown = without_credentials(url)
    started = anyio.current_time()
    said = logging.NOTSET  # the level of the last thing said about the wait
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
            waited = anyio.current_time() - started
            if waited >= NATS_STARTUP_PATIENCE and said < logging.WARNING:
                said = logging.WARNING
                logger.warning(
                    "NATS still unreachable after %.0f s url=%s; still trying: start the API "
                    "(python -m examples.<app> api) or check NATS_URL and NATS_PASSWORD",
                    waited,
                    shown,
                )
            elif said == logging.NOTSET:
                said = logging.INFO
                logger.info("waiting for NATS url=%s", shown)
            else:
                logger.debug("still waiting for NATS url=%s waited=%.1fs", shown, waited)
