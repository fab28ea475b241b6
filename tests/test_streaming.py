"""An answer streamed by :class:`AnswerStream` behind a real nats-server, to real sockets.

The producer has its own bridge (a worker), the sockets another (an API process): each socket
is accepted through :meth:`SessionSync.accept` and fed by ``updates.forward``, so the real hub,
cursor, catch-up and stop requests run. The app's database is in memory, with the
compare-and-set checkpoint the guide describes; each socket's client applies every frame with
:func:`~asgi_session_sync.protocol.apply_patch`, as the browser does.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import nats
import pytest

from asgi_session_sync import SessionContext, SessionSync, Snapshot
from asgi_session_sync.hub import SessionStream
from asgi_session_sync.nats import EmbeddedNats, NatsBridge
from asgi_session_sync.protocol import AnswerStatus, Version, apply_patch, utf16_length
from asgi_session_sync.streaming import AnswerStream, Checkpoint

# nats-py runs on asyncio only.
pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

WAIT = 10.0
"""Seconds any one wait may take; a repair after another writer's commit retries for ~5 s."""
SID = "s1"
TEXT = "/interactions/0/response"
STATUS = "/interactions/0/status"
SUBJECT = f"session_sync.{SID}"
SCOPE = {"type": "websocket", "path": f"/ws/sessions/{SID}", "query_string": b"", "headers": []}
FAST: dict[str, Any] = {"reconnect_time_wait": 0.1, "connect_timeout": 1, "startup_timeout": 5.0}
OVERHEAD = 200
"""Bytes a delta may cost beyond its new text."""


async def until(condition: Callable[[], bool], *, within: float = WAIT) -> None:
    """Poll ``condition`` until it holds, for state no event announces; fail after ``within``."""
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110 (the state has no event of its own)
            await anyio.sleep(0.002)


# --------------------------------------------------------------------------------------------
# The app: its database, its sockets' clients, the producer's transport
# --------------------------------------------------------------------------------------------


@dataclass
class Commit:
    at: float
    checkpoint: Checkpoint


class Sessions:
    """Session ``s1`` in the app's database: committed states by version, and a
    compare-and-set checkpoint as the guide writes it."""

    def __init__(self, *, version: Version = 1, text: str = "") -> None:
        self.version = version
        self.states: dict[Version, dict[str, Any]] = {
            version: {
                "title": "a chat",
                "interactions": [{"prompt": "hi", "response": text, "status": "streaming"}],
            }
        }
        self.commits: list[Commit] = []
        self.moved = 0
        """Checkpoints refused because another writer had committed."""
        self.broken = False
        """The database is unreachable (its producer's process is dying): saves raise."""
        self.hold: anyio.Event | None = None
        """When set, a final checkpoint (not ``streaming``) waits for this event."""
        self.holding = anyio.Event()

    @property
    def state(self) -> dict[str, Any]:
        return self.states[self.version]

    @property
    def text(self) -> str:
        text: str = self.state["interactions"][0]["response"]
        return text

    @property
    def status(self) -> str:
        status: str = self.state["interactions"][0]["status"]
        return status

    async def save(self, checkpoint: Checkpoint) -> Version:
        """The compare-and-set: commit only if the session is still at ``base_version``."""
        assert checkpoint.session_id == SID
        if self.hold is not None and checkpoint.status is not AnswerStatus.STREAMING:
            self.holding.set()
            await self.hold.wait()
        await anyio.lowlevel.checkpoint()  # a transaction's round trip
        if self.broken:
            raise ConnectionError("the database is unreachable")
        if self.version != checkpoint.base_version:
            self.moved += 1
            return self.version
        assert checkpoint.version > self.version
        state = copy.deepcopy(self.state)
        state["interactions"][0].update(response=checkpoint.text, status=checkpoint.status.value)
        self.states[checkpoint.version] = state
        self.version = checkpoint.version
        self.commits.append(Commit(anyio.current_time(), checkpoint))
        return checkpoint.version

    def write(self, change: Callable[[dict[str, Any]], None]) -> tuple[Version, Version]:
        """Another writer of the session (a new title, a lease sweeper): ``version + 1``."""
        state = copy.deepcopy(self.state)
        change(state)
        base = self.version
        self.version += 1
        self.states[self.version] = state
        return base, self.version


class Client:
    """One browser tab: its socket's ASGI side, and the state it builds from the frames."""

    def __init__(self, db: Sessions) -> None:
        self.db = db
        self.loads = 0
        self.version: Version | None = None
        self.state: Any = None
        self.events: list[dict[str, Any]] = []
        self.texts: list[str] = []
        """The answer's text after each frame."""
        self.db_at: list[tuple[Version, str, str]] = []
        """The database's version, text and status when each frame arrived."""
        self.updates: SessionStream | None = None
        self.to_app_send, self.to_app = anyio.create_memory_object_stream[dict[str, Any]](4)

    async def load(self, ctx: SessionContext) -> Snapshot:
        self.loads += 1
        await anyio.lowlevel.checkpoint()
        return Snapshot(copy.deepcopy(self.db.state), version=self.db.version)

    async def send(self, message: Mapping[str, Any]) -> None:
        if message["type"] == "websocket.send":
            self.receive(message["text"])

    def receive(self, text: str) -> None:
        event = json.loads(text)
        self.events.append(event)
        self.db_at.append((self.db.version, self.db.text, self.db.status))
        if event["type"] == "session_patch":
            assert event["base_version"] == self.version, "a patch for a base the client lacks"
            self.state = apply_patch(self.state, event["patch"])
        elif event["type"] == "session_update":
            if not event.get("reset") and self.version is not None:
                assert event["version"] > self.version, "a full state that is not newer"
            self.state = event["session"]
        else:
            return
        self.version = event["version"]
        self.texts.append(self.text)

    @property
    def text(self) -> str:
        text: str = self.state["interactions"][0]["response"]
        return text

    @property
    def status(self) -> str:
        status: str = self.state["interactions"][0]["status"]
        return status

    def patches(self) -> list[dict[str, Any]]:
        return [event for event in self.events if event["type"] == "session_patch"]


@asynccontextmanager
async def connected(api: NatsBridge, db: Sessions) -> AsyncIterator[Client]:
    """One socket of ``s1`` as the docs write it: subscribe, accept, forward; closed on exit."""
    client = Client(db)
    sync = SessionSync(client.load)
    async with (
        client.to_app_send,
        client.to_app,
        api.subscribe(SID) as updates,
        anyio.create_task_group() as tg,
    ):
        socket = await sync.accept(SCOPE, client.send, SID)
        client.updates = updates
        tg.start_soon(updates.forward, socket, client.to_app.receive)
        await until(lambda: updates.version == socket.version)
        yield client
        await client.to_app_send.send({"type": "websocket.disconnect", "code": 1000})


@dataclass
class Published:
    at: float
    base_version: Version
    version: Version
    patch: list[dict[str, Any]]


@dataclass
class Recording:
    """The producer's transport: its bridge, with each publish recorded (and a way to die)."""

    bridge: NatsBridge
    published: list[Published] = field(default_factory=list)
    dead: bool = False
    """The producer's process is gone: nothing it publishes reaches NATS."""

    async def publish_patch(
        self,
        session_id: str,
        patch: Sequence[Mapping[str, Any]],
        *,
        base_version: Version,
        version: Version,
        owner: str | None = None,
    ) -> None:
        if self.dead:
            return
        operations = [dict(operation) for operation in patch]
        self.published.append(Published(anyio.current_time(), base_version, version, operations))
        await self.bridge.publish_patch(
            session_id, patch, base_version=base_version, version=version, owner=owner
        )

    def serve_answer(
        self,
        session_id: str,
        text_path: str,
        *,
        catch_up: Callable[[Version], bytes | None],
        stop: Callable[[], bool],
    ) -> AbstractAsyncContextManager[None]:
        def answer(version: Version) -> bytes | None:
            return None if self.dead else catch_up(version)

        return self.bridge.serve_answer(session_id, text_path, catch_up=answer, stop=stop)


def answer_for(transport: Recording, db: Sessions, **options: Any) -> AnswerStream:
    return AnswerStream(
        transport,
        SID,
        text_path=TEXT,
        status_path=STATUS,
        version=db.version,
        checkpoint=db.save,
        **options,
    )


@dataclass
class Rig:
    db: Sessions
    api: NatsBridge
    """The API process's bridge: the sockets' hub, stop requests."""
    producer: Recording
    """The worker's bridge, as the stream's transport."""
    wire: list[bytes]
    """Every message on the session's subject, as nats-server delivered it."""


@pytest.fixture
def llm() -> Iterator[Tokens]:
    tokens = Tokens()
    yield tokens
    tokens.close()


@pytest.fixture
async def rig(nats_server: EmbeddedNats) -> AsyncIterator[Rig]:
    listener = await nats.connect(nats_server.url)
    wire: list[bytes] = []

    async def heard(msg: Any) -> None:
        wire.append(msg.data)

    try:
        await listener.subscribe(SUBJECT, cb=heard)
        await listener.flush()
        async with (
            NatsBridge(nats_server.url, **FAST) as api,
            NatsBridge(nats_server.url, **FAST) as worker,
        ):
            yield Rig(Sessions(), api, Recording(worker), wire)
    finally:
        await listener.close()


class Tokens:
    """An LLM whose tokens the test hands to the producer one by one."""

    def __init__(self) -> None:
        self.send, self.receive = anyio.create_memory_object_stream[str](1000)
        self.cancelled = False

    def close(self) -> None:
        self.send.close()
        self.receive.close()

    async def produce(self, answer: AnswerStream) -> None:
        """The producer's block: append each token until the test closes the stream."""
        async with answer:
            try:
                async for token in self.receive:
                    answer.append(token)
            except anyio.get_cancelled_exc_class():
                self.cancelled = True
                raise

    async def give(self, answer: AnswerStream, *tokens: str) -> None:
        """Hand ``tokens`` over and wait until the stream has published them."""
        expected = answer.text + "".join(tokens)
        for token in tokens:
            await self.send.send(token)
        await until(lambda: published_text(answer) == expected)


def published_text(answer: AnswerStream) -> str:
    """The text the stream has published so far (its pending appends left out)."""
    return "".join(answer._pieces)


async def heard_all(rig: Rig) -> None:
    """Wait until the listener heard every patch the producer published."""
    await until(lambda: len(rig.wire) == len(rig.producer.published))


def chained(published: list[Published], start: Version) -> None:
    """Each patch chains from the one before, from ``start``."""
    base = start
    for patch in published:
        assert patch.base_version == base
        assert patch.version > base
        base = patch.version


# --------------------------------------------------------------------------------------------
# A delta costs its text
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [50, 5000])
async def test_each_delta_is_one_append_costing_its_new_text_and_a_small_constant(
    rig: Rig, tokens: int
) -> None:
    words = [f" w{i}" for i in range(tokens)]
    start = rig.db.version
    async with connected(rig.api, rig.db) as client:
        answer = answer_for(rig.producer, rig.db, publish_interval=0.01, checkpoint_interval=0.05)
        async with answer:
            for i, word in enumerate(words):
                answer.append(word)
                # An LLM's pace, faster for the long answer: 50 tokens a pause.
                if i % max(1, tokens // 50) == 0:
                    await anyio.sleep(0.002)
        await until(lambda: client.status == "complete")
        assert client.text == rig.db.text == "".join(words)
    await heard_all(rig)
    assert len(rig.wire) >= 5
    offset = 0
    for number, data in enumerate(rig.wire):
        event = json.loads(data)
        *appends, last = event["patch"]
        if number == len(rig.wire) - 1:  # the final patch also ends the answer
            assert last == {"op": "replace", "path": STATUS, "value": "complete"}
            extra = len(json.dumps(last, separators=(",", ":"))) + 1
        else:
            appends, extra = [*appends, last], 0
        assert len(appends) <= 1
        new_text = "".join(op["value"] for op in appends)
        for op in appends:
            assert set(op) == {"op", "path", "offset", "value"}
            assert (op["op"], op["path"], op["offset"]) == ("append", TEXT, offset)
            offset += utf16_length(op["value"])
        assert len(data) - len(new_text.encode()) <= OVERHEAD + extra, event
    assert offset == utf16_length("".join(words))
    chained(rig.producer.published, start)


# --------------------------------------------------------------------------------------------
# Coalescing and checkpoints
# --------------------------------------------------------------------------------------------


async def stream_for(rig: Rig, seconds: float, **options: Any) -> tuple[AnswerStream, float]:
    """Stream a token every millisecond or so for ``seconds``; the stream and the block's
    duration (s), its end included."""
    answer = answer_for(rig.producer, rig.db, **options)
    started = anyio.current_time()
    async with answer:
        n = 0
        while anyio.current_time() - started < seconds:
            answer.append(f" t{n}")
            n += 1
            await anyio.sleep(0.001)  # the LLM's pace
    return answer, anyio.current_time() - started


async def test_appends_are_coalesced_into_at_most_one_publish_per_interval(rig: Rig) -> None:
    interval = 0.05
    answer, duration = await stream_for(rig, 1.0, publish_interval=interval)
    published = rig.producer.published
    assert answer.publishes == len(published)
    assert 5 <= len(published) <= duration / interval + 2, (len(published), duration)
    # The pump's publishes are an interval apart; the final one goes out as the block ends.
    gaps = [b.at - a.at for a, b in itertools.pairwise(published[:-1])]
    assert min(gaps) >= interval - 0.002, gaps
    # Every append made it, in one append per patch.
    text = "".join(op["value"] for p in published for op in p.patch if op["op"] == "append")
    assert text == answer.text == rig.db.text


async def test_checkpoints_are_periodic_and_the_final_one_is_committed_before_its_publish(
    rig: Rig,
) -> None:
    interval = 0.25
    async with connected(rig.api, rig.db) as client:
        answer, duration = await stream_for(rig, 1.0, checkpoint_interval=interval)
        await until(lambda: client.status == "complete")
    commits = rig.db.commits
    assert 2 <= len(commits) <= duration / interval + 2, (len(commits), duration)
    assert answer.checkpoints == len(commits)
    # Each commit chained on the one before, and all but the last say streaming.
    assert [c.checkpoint.status for c in commits] == [AnswerStatus.STREAMING] * (
        len(commits) - 1
    ) + [AnswerStatus.COMPLETE]
    for before, after in itertools.pairwise(commits):
        assert after.checkpoint.base_version == before.checkpoint.version
    final = commits[-1]
    assert final.at <= rig.producer.published[-1].at
    assert final.checkpoint.version == rig.producer.published[-1].version == rig.db.version
    assert rig.db.text == answer.text == final.checkpoint.text
    assert rig.db.status == "complete"
    # When the socket received the final patch, the database already held it.
    [(index, ending)] = [
        (i, e)
        for i, e in enumerate(client.events)
        if e.get("type") == "session_patch"
        and any(op.get("value") == "complete" for op in e["patch"])
    ]
    assert client.db_at[index] == (ending["version"], answer.text, "complete")
    assert client.text == rig.db.text


# --------------------------------------------------------------------------------------------
# A socket that connects mid-answer
# --------------------------------------------------------------------------------------------


async def test_a_socket_connecting_mid_answer_is_made_current_by_the_producer_not_a_second_load(
    rig: Rig,
    llm: Tokens,
) -> None:
    answer = answer_for(rig.producer, rig.db, publish_interval=0.01, checkpoint_interval=0.5)
    async with connected(rig.api, rig.db) as early, anyio.create_task_group() as tg:
        tg.start_soon(llm.produce, answer)
        await llm.give(answer, "Once", " upon")
        await until(lambda: len(rig.db.commits) == 1)  # a checkpoint: "Once upon"
        await llm.give(answer, " a", " time")  # published, not saved
        # Delivered before the late socket subscribes: on a busy machine the delta could else
        # reach the late socket's stream before its snapshot did, and be caught up at once.
        await until(lambda: early.text == "Once upon a time")
        commits = len(rig.db.commits)
        async with connected(rig.api, rig.db) as late:
            # The snapshot is the database's: behind the stream.
            assert late.version == rig.db.version < answer.version
            assert late.text == "Once upon"
            await llm.give(answer, ",")
            # The next delta does not chain from the snapshot: the producer fills the gap.
            await until(lambda: late.text == "Once upon a time,", within=1.0)
            assert len(rig.db.commits) == commits, "a checkpoint, not the catch-up, did it"
            assert rig.api.stats.catch_ups >= 1
            assert rig.api.stats.catch_up_failures == 0
            assert late.loads == 1
            await llm.give(answer, " there", " was")
            llm.send.close()
            await until(lambda: late.status == early.status == "complete")
            assert late.loads == 1  # no second load, ever
            assert late.text == early.text == rig.db.text == "Once upon a time, there was"
    assert rig.api.stats.resyncs == 0
    final = rig.db.text
    for client in (early, late):
        assert all(final.startswith(text) for text in client.texts), client.texts


# --------------------------------------------------------------------------------------------
# Stop, and how an answer ends
# --------------------------------------------------------------------------------------------


async def test_stop_cancels_the_producers_body_and_ends_the_answer_cancelled_everywhere(
    rig: Rig,
) -> None:
    answer = answer_for(rig.producer, rig.db, publish_interval=0.01)
    produced = 0
    body = {"cancelled": False, "finished": False}

    async def produce() -> None:
        nonlocal produced
        async with answer:
            try:
                for n in range(100_000):
                    answer.append(f" t{n}")
                    produced += 1
                    await anyio.sleep(0.002)
                body["finished"] = True
            except anyio.get_cancelled_exc_class():
                body["cancelled"] = True
                raise

    async with (
        connected(rig.api, rig.db) as first,
        connected(rig.api, rig.db) as second,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(produce)
        await until(lambda: answer.publishes >= 3)
        assert await rig.api.stop_answer(SID, TEXT) is True
        await until(lambda: first.status == second.status == "cancelled")
    assert body == {"cancelled": True, "finished": False}
    at_stop = produced
    assert answer.stopped
    assert (rig.db.status, rig.db.text) == ("cancelled", answer.text)
    assert first.text == second.text == rig.db.text
    assert produced == at_stop  # the producer stopped producing
    assert await rig.api.stop_answer(SID, TEXT) is False  # no one streams it any more


async def test_closing_a_socket_does_not_stop_the_answer(rig: Rig, llm: Tokens) -> None:
    answer = answer_for(rig.producer, rig.db, publish_interval=0.01)
    async with anyio.create_task_group() as tg:
        tg.start_soon(llm.produce, answer)
        async with connected(rig.api, rig.db) as leaving:
            await llm.give(answer, "Hello")
            await until(lambda: leaving.text == "Hello")
        await llm.give(answer, " world")  # streaming on, with no socket
        llm.send.close()
    assert not answer.stopped
    assert not llm.cancelled
    assert (rig.db.status, rig.db.text) == ("complete", "Hello world")


async def test_a_stop_naming_another_answer_is_not_acknowledged(rig: Rig, llm: Tokens) -> None:
    answer = answer_for(rig.producer, rig.db)
    async with anyio.create_task_group() as tg:
        tg.start_soon(llm.produce, answer)
        await llm.give(answer, "Hi")
        assert await rig.api.stop_answer(SID, "/interactions/1/response") is False
        assert not answer.stopped
        llm.send.close()
    assert rig.db.status == "complete"


async def test_a_stop_during_the_final_commit_is_refused_and_the_answer_ends_complete(
    rig: Rig,
    llm: Tokens,
) -> None:
    # stop_answer's True promises: "the producer stops, ends the answer as cancelled and
    # publishes that to every socket". Once the block has ended, the answer ends as it was
    # going to: the producer, still serving while it commits, says so (False).
    answer = answer_for(rig.producer, rig.db)
    rig.db.hold = anyio.Event()
    async with connected(rig.api, rig.db) as client, anyio.create_task_group() as tg:
        tg.start_soon(llm.produce, answer)
        await llm.give(answer, "All", " done")
        llm.send.close()  # the LLM finished: the block ends, the final checkpoint starts
        with anyio.fail_after(WAIT):
            await rig.db.holding.wait()
        acknowledged = await rig.api.stop_answer(SID, TEXT)
        rig.db.hold.set()
        await until(lambda: client.status == "complete")
    assert (acknowledged, rig.db.status, answer.stopped) == (False, "complete", False)
    assert rig.db.text == client.text == "All done"


async def test_a_body_raising_ends_the_answer_interrupted_and_the_error_propagates_as_itself(
    rig: Rig,
) -> None:
    answer = answer_for(rig.producer, rig.db, publish_interval=0.01)
    async with connected(rig.api, rig.db) as client:

        async def produce() -> None:
            async with answer:
                answer.append("Partial")
                await until(lambda: answer.publishes == 1)
                answer.append(" answer")
                raise ValueError("the LLM failed")

        with pytest.raises(ValueError, match="the LLM failed") as raised:
            await produce()
        assert type(raised.value) is ValueError  # not an ExceptionGroup
        await until(lambda: client.status == "interrupted")
        assert client.text == "Partial answer"
    assert (rig.db.status, rig.db.text) == ("interrupted", "Partial answer")


async def test_an_outside_cancellation_ends_the_answer_interrupted_and_is_not_swallowed(
    rig: Rig,
) -> None:
    answer = answer_for(rig.producer, rig.db, publish_interval=0.01)
    reached_after_block = False
    async with connected(rig.api, rig.db) as client:
        with anyio.CancelScope() as scope:
            async with answer:
                answer.append("Partial")
                await until(lambda: answer.publishes == 1)
                scope.cancel()
                await anyio.sleep_forever()
            reached_after_block = True
        assert scope.cancelled_caught
        assert not reached_after_block
        await until(lambda: client.status == "interrupted")
        assert client.text == "Partial"
    assert (rig.db.status, rig.db.text) == ("interrupted", "Partial")
    assert not answer.stopped


# --------------------------------------------------------------------------------------------
# Another writer of the session
# --------------------------------------------------------------------------------------------


async def test_sockets_converge_when_another_writer_commits_mid_answer(
    rig: Rig, llm: Tokens
) -> None:
    answer = answer_for(rig.producer, rig.db, publish_interval=0.01, checkpoint_interval=0.1)

    def retitle(state: dict[str, Any]) -> None:
        state["title"] = "renamed"

    async with connected(rig.api, rig.db) as client, anyio.create_task_group() as tg:
        tg.start_soon(llm.produce, answer)
        await llm.give(answer, "One", " two")
        await until(lambda: len(rig.db.commits) >= 1)
        await llm.give(answer, " three")  # published, not saved
        base, version = rig.db.write(retitle)
        await rig.api.publish_patch(
            SID,
            [{"op": "replace", "path": "/title", "value": "renamed"}],
            base_version=base,
            version=version,
        )
        await llm.give(answer, " four")
        await until(lambda: rig.db.moved >= 1)  # the stream's checkpoint saw the move
        await llm.give(answer, " five")
        llm.send.close()
        await until(lambda: client.state == rig.db.state and client.status == "complete")
    assert rig.db.state["title"] == "renamed"
    assert (rig.db.text, rig.db.status) == ("One two three four five", "complete")
    assert all(rig.db.text.startswith(text) for text in client.texts), client.texts
    async with connected(rig.api, rig.db) as fresh:
        assert fresh.state == rig.db.state


async def test_a_socket_caught_up_by_a_producer_that_then_dies_converges_to_the_lease_sweep(
    rig: Rig,
    llm: Tokens,
) -> None:
    # The producer's worker dies: nothing more is published or saved. The app's lease sweeper
    # then commits version + 1 with status interrupted and publishes it, as the spec says.
    # Every socket must end on the database's state, including one whose last frame was the
    # producer's catch-up (at a version the database never committed).
    answer = answer_for(rig.producer, rig.db, publish_interval=0.01, checkpoint_interval=30)

    def interrupted(state: dict[str, Any]) -> None:
        state["interactions"][0]["status"] = "interrupted"

    worker = anyio.CancelScope()

    async def work() -> None:
        with worker:
            await llm.produce(answer)

    async with connected(rig.api, rig.db) as early, anyio.create_task_group() as tg:
        tg.start_soon(work)
        await llm.give(answer, "Never", " saved")
        async with connected(rig.api, rig.db) as late:
            await llm.give(answer, ".")
            await until(lambda: late.text == "Never saved.")
            assert rig.api.stats.catch_ups == 1
            # The worker dies: its database and NATS are gone, then its task.
            rig.db.broken = rig.producer.dead = True
            worker.cancel()
            await until(lambda: early.text == "Never saved.")
            base, version = rig.db.write(interrupted)
            await rig.api.publish_patch(
                SID,
                [{"op": "replace", "path": STATUS, "value": "interrupted"}],
                base_version=base,
                version=version,
            )
            await until(lambda: early.state == rig.db.state)
            with anyio.move_on_after(3.0):
                await until(lambda: late.state == rig.db.state)
            assert (late.version, late.text, late.status) == (
                rig.db.version,
                rig.db.text,
                rig.db.status,
            ), f"the late socket is stuck; its last frame: {late.events[-1]}"
    assert (rig.db.text, rig.db.status) == ("", "interrupted")


# --------------------------------------------------------------------------------------------
# Astral text
# --------------------------------------------------------------------------------------------


async def test_offsets_count_utf16_units_for_astral_text_and_apply_patch_agrees(
    rig: Rig, llm: Tokens
) -> None:
    answer = answer_for(rig.producer, rig.db, publish_interval=0.01)
    pieces = ["a", "😀", "é", "👍🏽", " 🏳️‍🌈", "\U0001f600\U0001f600", "z"]
    async with connected(rig.api, rig.db) as client, anyio.create_task_group() as tg:
        tg.start_soon(llm.produce, answer)
        for piece in pieces:
            await llm.give(answer, piece)  # one delta each
        llm.send.close()
        await until(lambda: client.status == "complete")
    final = "".join(pieces)
    assert client.text == rig.db.text == final
    await heard_all(rig)
    text = ""
    offsets = []
    for data in rig.wire:
        for op in json.loads(data)["patch"]:
            if op["op"] == "append":
                assert op["offset"] == utf16_length(text)
                offsets.append(op["offset"])
                text = apply_patch({"t": text}, [{**op, "path": "/t"}])["t"]
    assert text == final
    # JavaScript's lengths: "a" 1, "😀" 2, "é" 1, "👍🏽" 4, " 🏳️‍🌈" 7, two "😀" 4.
    assert offsets == [0, 1, 3, 4, 8, 15, 19]
    assert utf16_length(final) == 20 != len(final)


# --------------------------------------------------------------------------------------------
# Bad input at the hub
# --------------------------------------------------------------------------------------------


async def test_bad_appends_on_the_subject_are_refused_logged_and_reach_no_socket(
    rig: Rig, nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    def append(base: int, offset: Any, value: Any, *, session_id: str = SID) -> dict[str, Any]:
        return {
            "type": "session_patch",
            "session_id": session_id,
            "base_version": base,
            "version": base + 1,
            "patch": [{"op": "append", "path": TEXT, "offset": offset, "value": value}],
        }

    def say(text: str) -> Callable[[dict[str, Any]], None]:
        def change(state: dict[str, Any]) -> None:
            state["interactions"][0]["response"] = text

        return change

    bad = [
        (append(2, 5, "PAST"), "refused"),  # the text is 2 units long
        (append(2, 2, 5), "invalid"),  # value is not a string
        (append(2, -1, "NEGATIVE"), "invalid"),
        (append(2, 2, "OTHER", session_id="s2"), "refused"),  # another session's
    ]
    async with connected(rig.api, rig.db) as client:
        raw = rig.producer.bridge.client  # the producer's connection, used directly
        rig.db.write(say("Hi"))
        await raw.publish(SUBJECT, json.dumps(append(1, 0, "Hi")).encode())
        await until(lambda: client.text == "Hi")
        for event, _ in bad:
            await raw.publish(SUBJECT, json.dumps(event).encode())
        rig.db.write(say("Hi there"))
        await raw.publish(SUBJECT, json.dumps(append(2, 2, " there")).encode())
        await until(lambda: client.text == "Hi there")
    stats = rig.api.stats
    assert stats.refused_frames == sum(kind == "refused" for _, kind in bad)
    assert stats.invalid_messages == sum(kind == "invalid" for _, kind in bad)
    assert stats.frames_parsed == len(bad) + 2
    sent = json.dumps(client.events)
    for word in ("PAST", "NEGATIVE", "OTHER", '"value": 5'):
        assert word not in sent
    assert all(rig.db.text.startswith(text) for text in client.texts)
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(
        "refused a frame" in m and "an append at offset 5" in m and "2 UTF-16 units" in m
        for m in messages
    ), messages
    assert any("refused a frame" in m and "another session" in m for m in messages)
    assert any("dropped an invalid message" in m and "not a string" in m for m in messages)
    assert any("dropped an invalid message" in m and "offset" in m for m in messages)


# --------------------------------------------------------------------------------------------
# Size
# --------------------------------------------------------------------------------------------


async def test_an_answer_larger_than_max_payload_streams_in_small_deltas(rig: Rig) -> None:
    max_payload = rig.api.client.max_payload
    chunk = "x" * 8000
    count = max_payload // len(chunk) + 10
    answer = answer_for(rig.producer, rig.db, publish_interval=0.002, checkpoint_interval=0.05)
    async with connected(rig.api, rig.db) as client:
        async with answer:
            for _ in range(count):
                before = answer.publishes
                answer.append(chunk)
                await until(lambda before=before: answer.publishes > before)  # type: ignore[misc]
        await until(lambda: client.status == "complete")
        assert client.text == rig.db.text == chunk * count
    assert len(rig.db.text) > max_payload
    await heard_all(rig)
    assert max(len(data) for data in rig.wire) < len(chunk) + OVERHEAD + 100
    assert sum(len(data) for data in rig.wire) > max_payload


# --------------------------------------------------------------------------------------------
# Checkpoints that fail or find the session moved, and answers that do not start empty
# --------------------------------------------------------------------------------------------


async def test_without_a_status_path_the_final_status_is_still_committed(rig: Rig) -> None:
    # The app keeps the status in its own column (the guide's save writes checkpoint.status):
    # "In every case the final text and status are committed through checkpoint first".
    answer = AnswerStream(
        rig.producer,
        SID,
        text_path=TEXT,
        version=rig.db.version,
        checkpoint=rig.db.save,
        publish_interval=0.01,
        checkpoint_interval=0.05,
    )
    async with answer:
        answer.append("Hi")
        # Everything appended is saved; then the LLM ends.
        await until(lambda: bool(rig.db.commits) and rig.db.commits[-1].checkpoint.text == "Hi")
    last = rig.db.commits[-1].checkpoint
    assert (last.text, last.status) == ("Hi", AnswerStatus.COMPLETE), rig.db.commits


async def test_a_failing_checkpoint_is_retried_and_the_answer_still_completes(
    rig: Rig, llm: Tokens, caplog: pytest.LogCaptureFixture
) -> None:
    answer = answer_for(rig.producer, rig.db, publish_interval=0.01, checkpoint_interval=0.05)
    async with connected(rig.api, rig.db) as client, anyio.create_task_group() as tg:
        rig.db.broken = True  # the database is down for a while
        tg.start_soon(llm.produce, answer)
        await llm.give(answer, "Still")
        await until(lambda: "answer checkpoint failed" in caplog.text)
        await llm.give(answer, " streaming")
        await until(lambda: client.text == "Still streaming")  # the deltas go on meanwhile
        rig.db.broken = False
        await until(lambda: len(rig.db.commits) >= 1)
        llm.send.close()
        await until(lambda: client.status == "complete")
    assert (rig.db.text, rig.db.status) == ("Still streaming", "complete")
    assert client.state == rig.db.state


async def test_another_writers_commit_just_before_the_end_is_rebased_by_the_final_checkpoint(
    rig: Rig, llm: Tokens
) -> None:
    answer = answer_for(rig.producer, rig.db, publish_interval=0.01, checkpoint_interval=30)
    async with connected(rig.api, rig.db) as client, anyio.create_task_group() as tg:
        tg.start_soon(llm.produce, answer)
        await llm.give(answer, "Last", " words")
        base, version = rig.db.write(lambda state: state.update(title="renamed"))
        await rig.api.publish_patch(
            SID,
            [{"op": "replace", "path": "/title", "value": "renamed"}],
            base_version=base,
            version=version,
        )
        llm.send.close()  # no periodic checkpoint came between: the final one finds the move
        await until(lambda: client.state == rig.db.state and client.status == "complete")
    assert rig.db.moved == 1
    assert (rig.db.state["title"], rig.db.text, rig.db.status) == (
        "renamed",
        "Last words",
        "complete",
    )
    assert rig.db.version > version


async def test_an_answer_that_does_not_start_empty_appends_at_its_utf16_length(
    rig: Rig, llm: Tokens
) -> None:
    rig.db = Sessions(text="Before 😀")
    answer = answer_for(rig.producer, rig.db, publish_interval=0.01, text="Before 😀")
    async with connected(rig.api, rig.db) as client, anyio.create_task_group() as tg:
        tg.start_soon(llm.produce, answer)
        await llm.give(answer, ", after")
        llm.send.close()
        await until(lambda: client.status == "complete")
    first = rig.producer.published[0].patch[0]
    assert (first["offset"], first["value"]) == (9, ", after")
    assert client.text == rig.db.text == "Before 😀, after"


# --------------------------------------------------------------------------------------------
# The producer's catch-up, asked directly
# --------------------------------------------------------------------------------------------


async def test_the_producer_answers_a_catch_up_from_a_version_it_knows_and_only_then(
    rig: Rig, llm: Tokens, nats_server: EmbeddedNats
) -> None:
    answer = answer_for(rig.producer, rig.db, publish_interval=0.01, checkpoint_interval=30)
    start = rig.db.version
    async with anyio.create_task_group() as tg:
        tg.start_soon(llm.produce, answer)
        await llm.give(answer, "Hel")
        await llm.give(answer, "lo 😀")
        data = await rig.api.catch_up(SID, start)
        assert data is not None
        patch = json.loads(data)
        assert (patch["type"], patch["base_version"], patch["version"]) == (
            "session_patch",
            start,
            answer.version,
        )
        assert patch["patch"] == [{"op": "append", "path": TEXT, "offset": 0, "value": "Hello 😀"}]
        after_first = rig.producer.published[0].version
        data = await rig.api.catch_up(SID, after_first)
        assert data is not None
        assert json.loads(data)["patch"] == [
            {"op": "append", "path": TEXT, "offset": 3, "value": "lo 😀"}
        ]
        assert await rig.api.catch_up(SID, answer.version) is None  # nothing to add
        assert await rig.api.catch_up(SID, start + 1) is None  # never one of its versions
        raw = await nats.connect(nats_server.url)
        try:
            reply = await raw.request(f"{SUBJECT}.catchup", b"not a version", timeout=WAIT)
        finally:
            await raw.close()
        assert reply.data == b""
        llm.send.close()
    # Once the server has the producer's unsubscription, no one answers: None at once, not
    # after the request's timeout.
    await rig.producer.bridge.client.flush()
    with anyio.fail_after(0.9):
        assert await rig.api.catch_up(SID, start) is None


async def test_answer_stream_refuses_a_bad_configuration_naming_the_fix(rig: Rig) -> None:
    def make(**options: Any) -> AnswerStream:
        arguments: dict[str, Any] = {
            "text_path": TEXT,
            "version": 1,
            "checkpoint": rig.db.save,
        }
        arguments.update(options)
        return AnswerStream(rig.producer, SID, **arguments)

    for path in ("answer", 3):
        with pytest.raises(ValueError, match="text_path must be a JSON Pointer"):
            make(text_path=path)
    with pytest.raises(ValueError, match="status_path must be a JSON Pointer"):
        make(status_path="status")
    for version in (-1, True, 2**53, 1.5, "1"):
        with pytest.raises(ValueError, match="version must be a whole number"):
            make(version=version)
    for seconds in (0, -1, math.inf, math.nan, "1"):
        with pytest.raises(ValueError, match="publish_interval must be a positive number"):
            make(publish_interval=seconds)
        with pytest.raises(ValueError, match="checkpoint_interval must be a positive number"):
            make(checkpoint_interval=seconds)
    with pytest.raises(TypeError, match="checkpoint must be an async function"):
        make(checkpoint=None)
    answer = make()
    with pytest.raises(TypeError, match="append takes a str: got int"):
        answer.append(5)  # type: ignore[arg-type]
    async with answer:
        with pytest.raises(RuntimeError, match="entered once"):
            async with answer:
                pass


async def test_a_burst_of_text_larger_than_max_payload_still_reaches_the_sockets(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    # Appends made within one publish_interval go out as one delta: a producer that appends
    # a large piece at once (a cached answer replayed, a tool's output) makes a delta larger
    # than the server's max_payload, which NATS refuses. The sockets must still end on the
    # database's text and status.
    burst = "y" * (rig.api.client.max_payload + 1000)
    answer = answer_for(rig.producer, rig.db, publish_interval=0.01, checkpoint_interval=0.05)
    async with connected(rig.api, rig.db) as client:
        async with answer:
            answer.append("Here it is: ")
            await until(lambda: client.text == "Here it is: ")
            answer.append(burst)
        assert (rig.db.status, rig.db.text) == ("complete", "Here it is: " + burst)
        with anyio.move_on_after(5):
            await until(lambda: client.status == "complete")
        assert (client.status, len(client.text)) == ("complete", len(rig.db.text)), (
            "the socket is stuck; logged: "
            + "; ".join(
                r.getMessage()[:100] for r in caplog.records if r.levelno >= logging.WARNING
            )
        )


async def test_a_final_checkpoint_that_fails_once_is_retried_then_published(
    rig: Rig, llm: Tokens, caplog: pytest.LogCaptureFixture
) -> None:
    # Without the final commit the sockets would stay on "streaming" until a lease marked the
    # answer interrupted, which it was not.
    answer = answer_for(rig.producer, rig.db, publish_interval=0.01, checkpoint_interval=30)
    async with connected(rig.api, rig.db) as client, anyio.create_task_group() as tg:
        rig.db.hold = anyio.Event()
        tg.start_soon(llm.produce, answer)
        await llm.give(answer, "Almost", " done")
        llm.send.close()
        await rig.db.holding.wait()  # the final checkpoint is on its way: the database drops
        rig.db.broken = True
        rig.db.hold.set()
        rig.db.hold = None
        await until(lambda: "answer checkpoint failed" in caplog.text)
        assert answer.status is AnswerStatus.STREAMING
        assert rig.db.commits == []
        rig.db.broken = False  # back before the retry
        await until(lambda: client.status == "complete")
    assert (rig.db.text, rig.db.status) == ("Almost done", "complete")
    assert answer.status is AnswerStatus.COMPLETE
    assert client.state == rig.db.state


async def test_a_final_checkpoint_that_keeps_failing_leaves_the_status_as_published(
    rig: Rig, llm: Tokens, caplog: pytest.LogCaptureFixture
) -> None:
    answer = answer_for(rig.producer, rig.db, publish_interval=0.01, checkpoint_interval=30)
    rig.db.broken = True
    async with connected(rig.api, rig.db) as client, anyio.create_task_group() as tg:
        tg.start_soon(llm.produce, answer)
        await llm.give(answer, "Lost")
        await until(lambda: client.text == "Lost")
        llm.send.close()
        await until(lambda: "final checkpoint failed" in caplog.text)
    # Nothing claims an ending the database does not have: the app's lease will say it.
    assert answer.status is AnswerStatus.STREAMING
    assert client.status == "streaming"
