"""Which workers run now: each answers a roll call over NATS with its pid.

The page's "Try it" panel names the worker to kill (see :mod:`.demo`). A roll call is a NATS
request with many replies: the API publishes on :data:`ROLL_CALL_SUBJECT` with an inbox,
every worker answers there, and the API keeps what comes within a short wait. A restarted
worker answers as soon as it is up, a dead one never: the panel shows the truth of the moment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import TypedDict

import anyio
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from asgi_session_sync.nats import NatsBridge

__all__ = [
    "ROLL_CALL_SUBJECT",
    "ROLL_CALL_WAIT",
    "WorkerView",
    "answering_roll_calls",
    "running_workers",
]

logger = logging.getLogger("examples.chat")

ROLL_CALL_SUBJECT = "chat.workers.roll_call"
"""The subject every worker answers with its pid."""

ROLL_CALL_WAIT = 0.25
"""Seconds the API gathers answers to a roll call: a worker answers within a round trip."""

_MAX_WORKERS = 64  # answers a roll call keeps; more workers than that are not a demo


class WorkerView(TypedDict):
    """A worker that answered the roll call: its pid and its name (``<host>-<pid>``)."""

    pid: int
    name: str


@contextlib.asynccontextmanager
async def answering_roll_calls(bridge: NatsBridge, name: str) -> AsyncIterator[None]:
    """Answer every roll call with this process's pid and ``name``, while inside.

    The subscription is the NATS client's own, renewed on every reconnect: the worker answers
    again once a restarted API's broker is back.
    """
    answer = json.dumps({"pid": os.getpid(), "name": name}).encode()
    client = bridge.client

    async def on_roll_call(msg: Msg) -> None:
        if msg.reply:
            await client.publish(msg.reply, answer)

    subscription = await client.subscribe(ROLL_CALL_SUBJECT, cb=on_roll_call)
    try:
        yield
    finally:
        # Shielded: the worker is being cancelled, and the broker should forget us at once.
        with anyio.CancelScope(shield=True), contextlib.suppress(NatsError):
            await subscription.unsubscribe()


async def running_workers(
    bridge: NatsBridge, *, within: float = ROLL_CALL_WAIT
) -> list[WorkerView]:
    """The workers that answer a roll call within ``within`` seconds, ordered by pid.

    Empty when none answers, or when NATS is unreachable (logged at DEBUG): the page then
    shows no worker, which is all it can know.
    """
    client = bridge.client
    workers: dict[int, WorkerView] = {}
    try:
        inbox = client.new_inbox()
        subscription = await client.subscribe(inbox, max_msgs=_MAX_WORKERS)
        try:
            await client.publish(ROLL_CALL_SUBJECT, b"", reply=inbox)
            with anyio.move_on_after(within):
                async for msg in subscription.messages:
                    worker = _worker(msg.data)
                    if worker is not None:
                        workers[worker["pid"]] = worker
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(NatsError):
                await subscription.unsubscribe()
    except NatsError as error:
        logger.debug("roll call failed: %s", error)
    return sorted(workers.values(), key=lambda worker: worker["pid"])


def _worker(data: bytes) -> WorkerView | None:
    """An answer to the roll call, or ``None`` for anything else."""
    try:
        value = json.loads(data)
        return {"pid": int(value["pid"]), "name": str(value["name"])[:100]}
    except (ValueError, TypeError, KeyError):
        return None
