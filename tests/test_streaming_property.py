"""Property: an answer streamed through the real publisher and the real feed reaches every client
as a prefix of the producer's text, and ends as the database says.

The publisher is a real :class:`~asgi_session_sync.streaming.AnswerStream` (its pump, its
checkpoints through a compare-and-set database, its catch-up and stop callbacks); the feed is a
real :class:`~asgi_session_sync.hub.Hub` with one :class:`~asgi_session_sync.hub.SessionStream`
per socket. Only the broker is simulated: what the stream publishes waits in a schedule that
hypothesis delivers, loses, reorders or duplicates, and a catch-up request reaches the
producer's callback unless the producer is dead. Clients apply every frame with
:func:`~asgi_session_sync.protocol.apply_patch`, reconnect (a new snapshot from the database),
and the producer may be stopped, or die (no more publishes, catch-ups or commits) after which
the app's lease sweeper commits ``version + 1`` with status ``interrupted``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.lowlevel import checkpoint
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

import asgi_session_sync.hub
from asgi_session_sync.hub import Hub
from asgi_session_sync.protocol import (
    SessionPatch,
    SessionUpdate,
    Version,
    apply_patch,
)
from asgi_session_sync.stats import BridgeStats
from asgi_session_sync.streaming import AnswerStream, Checkpoint

SID = "s1"
TEXT = "/answer/text"
STATUS = "/answer/status"
CONVERGE = 1.0
"""Seconds every client has to reach the database's state once the broker is healthy."""


class Database:
    """The session's committed states by version, and the stream's compare-and-set."""

    def __init__(self) -> None:
        self.version: Version = 7
        self.states: dict[Version, dict[str, Any]] = {
            self.version: {"title": "t0", "answer": {"text": "", "status": "streaming"}}
        }
        self.producer_reaches = True
        """False once the producer's process died: its saves fail."""

    @property
    def state(self) -> dict[str, Any]:
        return self.states[self.version]

    async def save(self, checkpoint_: Checkpoint) -> Version:
        await checkpoint()  # the transaction's round trip
        if not self.producer_reaches:
            raise ConnectionError("the producer's process is gone")
        if self.version != checkpoint_.base_version:
            return self.version
        assert checkpoint_.version > self.version
        state = copy.deepcopy(self.state)
        state["answer"] = {"text": checkpoint_.text, "status": checkpoint_.status.value}
        self.version = checkpoint_.version
        self.states[self.version] = state
        return self.version

    def write(self, path: str, value: str) -> bytes:
        """Another writer: commit a replace at ``version + 1``; return the patch it publishes."""
        base = self.version
        operations = [{"op": "replace", "path": path, "value": value}]
        self.version += 1
        self.states[self.version] = apply_patch(self.states[base], operations)
        patch = SessionPatch(
            session_id=SID, base_version=base, version=self.version, patch=operations
        )
        return patch.to_json()

    async def resync(self) -> str:
        await checkpoint()
        update = SessionUpdate(session_id=SID, session=self.state, version=self.version, reset=True)
        return update.to_json().decode()


class Network:
    """The broker: what was published and not yet delivered, and the hub's subscription."""

    def __init__(self) -> None:
        self.in_flight: list[bytes] = []
        self.delivered: list[bytes] = []
        self.deliver: Callable[[bytes], None] | None = None
        self.producer_catch_up: Callable[[Version], bytes | None] | None = None
        self.producer_stop: Callable[[], bool] | None = None
        self.producer_alive = True
        self.drop_next_catch_up = False
        self.catch_ups = 0
        """Catch-up requests the hub made."""
        self.answered = 0
        """Catch-up requests the producer answered with a patch."""
        self.unknown = 0
        """Catch-up requests for a version the producer does not know."""

    # AnswerTransport: the producer's side.

    async def publish_patch(
        self,
        session_id: str,
        patch: Sequence[Mapping[str, Any]],
        *,
        base_version: Version,
        version: Version,
        owner: str | None = None,
    ) -> None:
        assert session_id == SID
        if not self.producer_alive:
            return
        event_ = SessionPatch(
            session_id=session_id,
            owner=owner,
            base_version=base_version,
            version=version,
            patch=[dict(operation) for operation in patch],
        )
        self.in_flight.append(event_.to_json())
        await checkpoint()

    @asynccontextmanager
    async def serve_answer(
        self,
        session_id: str,
        text_path: str,
        *,
        catch_up: Callable[[Version], bytes | None],
        stop: Callable[[], bool],
    ) -> AsyncIterator[None]:
        assert (session_id, text_path) == (SID, TEXT)
        assert self.producer_catch_up is None, "one answer streams at a time"
        self.producer_catch_up, self.producer_stop = catch_up, stop
        try:
            yield
        finally:
            self.producer_catch_up = self.producer_stop = None

    # Backend: the hub's side.

    async def subscribe_subject(
        self, session_id: str, deliver: Callable[[bytes], None]
    ) -> Callable[[], Awaitable[None]]:
        self.deliver = deliver

        async def unsubscribe() -> None:
            if self.deliver is deliver:
                self.deliver = None

        return unsubscribe

    async def catch_up(self, session_id: str, version: int) -> bytes | None:
        self.catch_ups += 1
        await checkpoint()  # the request's round trip
        if self.drop_next_catch_up:
            self.drop_next_catch_up = False
            return None
        if not self.producer_alive or self.producer_catch_up is None:
            return None  # no responders
        answer = self.producer_catch_up(version)
        self.answered += answer is not None
        self.unknown += answer is None
        await checkpoint()
        return answer

    async def deliver_next(self, count: int) -> None:
        for _ in range(min(count, len(self.in_flight))):
            data = self.in_flight.pop(0)
            self.delivered.append(data)
            if self.deliver is not None:
                self.deliver(data)
            await checkpoint()


class Client:
    """A browser tab: applies every frame its socket sends; reconnects when told or ended."""

    def __init__(self) -> None:
        self.version: Version | None = None
        self.state: Any = None
        self.texts: list[str] = []
        self.statuses: list[str] = []
        self.scope: anyio.CancelScope | None = None
        self.connects = 0

    def snapshot(self, version: Version, state: dict[str, Any]) -> None:
        self.version, self.state = version, copy.deepcopy(state)
        self.record()

    def receive(self, text: str) -> None:
        frame = json.loads(text)
        if frame["type"] == "session_patch":
            assert frame["base_version"] == self.version, "a patch for a base the client lacks"
            self.state = apply_patch(self.state, frame["patch"])
        elif frame["type"] == "session_update":
            assert frame.get("reset") or frame["version"] > self.version
            self.state = frame["session"]
        else:
            return
        self.version = frame["version"]
        self.record()

    def record(self) -> None:
        self.texts.append(self.state["answer"]["text"])
        self.statuses.append(self.state["answer"]["status"])

    async def run(self, hub: Hub, db: Database) -> None:
        """Connect, follow the stream, and connect again, until cancelled."""
        while True:
            async with hub.subscribe(SID) as stream:
                # The middleware's order: subscribed first, then the snapshot's load.
                await checkpoint()
                self.snapshot(db.version, db.state)
                self.connects += 1
                stream.version = self.version
                stream.set_resync(db.resync)
                with anyio.CancelScope() as self.scope:
                    async for text in stream:
                        self.receive(text)
                # Cancelled (a reconnect) or ended (its repair gave up): connect again.


tokens = st.text(
    st.sampled_from(["a", "b", " ", "é", "😀", "👍", "\U0001f3fd", "\n", '"']),
    min_size=1,
    max_size=3,
)


def step(name: str, argument: st.SearchStrategy[Any] | None = None) -> st.SearchStrategy[Any]:
    return st.tuples(st.just(name), st.none() if argument is None else argument)


# Weighted by repetition: mostly tokens, time and deliveries, with every mishap in between.
mishaps = [
    step("deliver", st.integers(1, 4)),
    *[step("lose")] * 2,
    step("signal"),
    step("broker_reconnect"),
    step("swap"),
    step("duplicate"),
    step("write"),
    step("drop_catch_up"),
    *[step("reconnect", st.integers(0, 1))] * 2,
    *[step("tick")] * 3,
]
streaming_steps = st.lists(
    st.one_of(
        # Tokens a millisecond apart: one delta each, waiting in the broker.
        *[step("tokens", st.lists(tokens, min_size=1, max_size=4))] * 3,
        step("append", tokens),  # a token the next ones join (coalesced)
        step("wait", st.integers(1, 4)),
        *mishaps,
    ),
    min_size=5,
    max_size=40,
)
# How the answer ends (the LLM finishes, a user stops it, its producer dies), and what
# happens to the sockets after.
endings = st.sampled_from(
    [
        ("finish", None),
        ("stop", None),
        ("die", False),
        # Dies once the broker delivered all it had and the sockets settled (the LLM had gone
        # quiet): a socket's last frame may be the producer's catch-up.
        ("die", True),
    ]
)
plans = st.builds(
    lambda body, ending, tail: [*body, ending, *tail],
    streaming_steps,
    endings,
    st.lists(st.one_of(*mishaps), max_size=8),
)


async def scenario(
    plan: list[tuple[str, Any]], checkpoint_interval: float
) -> tuple[list[Client], Database, str, str, Network]:
    """Run ``plan``; return the clients, the database, the producer's text and how it ended.

    ``checkpoint_interval`` (s) is how far the database may lag the stream.
    """
    db = Database()
    network = Network()
    hub = Hub(
        network,
        stats=BridgeStats(),
        max_socket_bytes=1 << 20,
        max_process_bytes=1 << 22,
        max_concurrent_resyncs=2,
    )
    answer = AnswerStream(
        network,
        SID,
        text_path=TEXT,
        status_path=STATUS,
        version=db.version,
        checkpoint=db.save,
        publish_interval=0.0005,
        checkpoint_interval=checkpoint_interval,
    )
    clients = [Client(), Client()]
    finish = anyio.Event()
    producer_done = anyio.Event()
    producer_scope = anyio.CancelScope()
    ending = "complete"
    unsignalled = False

    async def produce() -> None:
        try:
            with producer_scope:
                async with answer:
                    await finish.wait()  # the LLM's tokens come from the plan
        finally:
            producer_done.set()

    def streaming() -> bool:
        return network.producer_alive and not answer.stopped and not finish.is_set()

    async with anyio.create_task_group() as tg:
        for client in clients:
            tg.start_soon(client.run, hub, db)
        tg.start_soon(produce)
        while network.producer_catch_up is None or not all(client.connects for client in clients):
            await checkpoint()  # the producer serves, the clients have their snapshots
        for action, argument in plan:
            in_flight = network.in_flight
            if action == "append" and streaming():
                answer.append(argument)
            elif action == "tokens":
                for token in argument:
                    if streaming():
                        answer.append(token)
                    await anyio.sleep(0.001)
            elif action == "tick":  # a millisecond, and the broker delivers what it holds
                await anyio.sleep(0.001)
                await network.deliver_next(len(in_flight))
            elif action == "wait":
                await anyio.sleep(argument / 1000)
            elif action == "deliver":
                await network.deliver_next(argument)
            elif action == "lose" and in_flight:
                # NATS loses a message only with a signal (a slow consumer's error, a
                # reconnect): the bridge resyncs the session's sockets, now or a few steps on.
                in_flight.pop(0)
                unsignalled = True
            elif action == "signal" and unsignalled:
                hub.resync(SID, "slow consumer: nats dropped messages")
                unsignalled = False
            elif action == "broker_reconnect":
                in_flight.clear()
                hub.resync_all("nats reconnected")
                unsignalled = False
            elif action == "swap" and len(in_flight) >= 2:
                in_flight[0], in_flight[1] = in_flight[1], in_flight[0]
            elif action == "duplicate" and network.delivered:
                in_flight.insert(0, network.delivered[-1])
            elif action == "reconnect":
                scope = clients[argument].scope
                if scope is not None:
                    scope.cancel()
            elif action == "write":
                in_flight.append(db.write("/title", f"t{db.version + 1}"))
            elif action == "drop_catch_up":
                network.drop_next_catch_up = True
            elif action == "stop" and streaming() and network.producer_stop is not None:
                assert network.producer_stop(), "a streaming answer refused to stop"
                ending = "cancelled"
            elif action == "finish":
                finish.set()
            elif action == "die" and streaming():
                if argument:
                    await network.deliver_next(len(in_flight))
                    await anyio.sleep(0.003)
                # The worker's process dies: nothing more leaves it. Then its lease runs out.
                network.producer_alive = db.producer_reaches = False
                producer_scope.cancel()
                with anyio.fail_after(CONVERGE):
                    await producer_done.wait()
                in_flight.append(db.write(STATUS, "interrupted"))
                ending = "interrupted"
        # From here the broker is healthy: everything is delivered, and the clients have time
        # to repair (from the producer, while it streams); then the LLM finishes.
        if unsignalled:
            hub.resync(SID, "slow consumer: nats dropped messages")
        await network.deliver_next(len(network.in_flight))
        await anyio.sleep(0.003)
        finish.set()
        with anyio.fail_after(CONVERGE):
            await producer_done.wait()
        with anyio.move_on_after(CONVERGE):  # the assertions below say who did not
            while network.in_flight or not all(
                (c.version, c.state) == (db.version, db.state) for c in clients
            ):
                await network.deliver_next(len(network.in_flight))
                await anyio.sleep(0.001)
        tg.cancel_scope.cancel()
    return clients, db, answer.text, ending, network


def run(backend: str, plan: list[tuple[str, Any]], checkpoint_interval: float = 60.0) -> Network:
    with pytest.MonkeyPatch.context() as patch:
        # A repair retries after 0.25, 1 and 4 s in production; here within milliseconds.
        patch.setattr(asgi_session_sync.hub, "RESYNC_RETRY_DELAYS", (0.0, 0.001, 0.002))
        clients, db, produced, ending, network = anyio.run(
            scenario, plan, checkpoint_interval, backend=backend
        )
    final = db.state["answer"]
    assert final["status"] == ending
    if ending == "interrupted":
        # The database keeps what the last checkpoint saved: a prefix of what was produced.
        assert produced.startswith(final["text"])
    else:
        assert final["text"] == produced
    for client in clients:
        assert (client.version, client.state) == (db.version, db.state)
        # Never a character the producer did not write, never one out of order.
        assert all(produced.startswith(text) for text in client.texts), client.texts
        assert set(client.statuses) <= {"streaming", ending}
        if ending != "interrupted":
            assert all(final["text"].startswith(text) for text in client.texts)
    return network


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans, checkpoint_interval=st.sampled_from([0.003, 0.01, 0.05, 60.0]))
def test_every_client_holds_a_prefix_of_the_answer_and_ends_on_the_databases_state(
    backend: str, plan: list[tuple[str, Any]], checkpoint_interval: float
) -> None:
    network = run(backend, plan, checkpoint_interval)
    # Steer towards schedules where the producer fills sockets' gaps, the path under test.
    target(float(network.answered), label="catch-ups answered")
    event(f"catch-ups asked: {min(network.catch_ups, 3)}")
    event(f"catch-ups answered: {min(network.answered, 3)}")
    event(f"catch-ups for versions the producer does not know: {min(network.unknown, 3)}")


def test_a_client_that_reconnects_mid_answer_is_caught_up_then_the_answer_is_stopped() -> None:
    network = run(
        "asyncio",
        [
            ("append", "Hel"),
            ("wait", 3),
            ("deliver", 4),
            ("reconnect", 1),  # no checkpoint yet: the database's snapshot has no text
            ("append", "lo 😀"),
            ("wait", 3),
            ("deliver", 4),  # a gap for client 1: the producer fills it
            ("stop", None),
        ],
    )
    assert network.answered >= 1


def test_a_client_caught_up_just_before_its_producer_dies_ends_on_the_lease_sweep() -> None:
    # Client 1's last frame is the producer's catch-up (at a version no checkpoint saved);
    # then the producer dies and the lease sweeper commits version + 1, interrupted.
    network = run(
        "asyncio",
        [
            ("append", "Never"),
            ("wait", 3),
            ("deliver", 4),
            ("reconnect", 1),
            ("append", " saved"),
            ("wait", 3),
            ("deliver", 4),
            ("wait", 3),  # client 1 asks the producer, which answers
            ("die", False),
        ],
    )
    assert network.answered >= 1
