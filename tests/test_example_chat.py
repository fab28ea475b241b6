"""The examples' shared chat below HTTP: claims, checkpoints, leases, stops and the worker.

Against a real SQLite file and PostgreSQL (each test in a schema of its own; skipped without
it outside CI), with two stores on one database where two replicas or workers race, and a
real nats-server where the worker streams.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import event, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from test_sse import ResponseClient

from asgi_session_sync.nats import EmbeddedNats, NatsBridge
from asgi_session_sync.protocol import AnswerStatus, apply_patch
from asgi_session_sync.streaming import Checkpoint
from examples.chat.leases import LeaseSweeper
from examples.chat.models import Interaction, SessionView
from examples.chat.publishing import SessionPublisher
from examples.chat.stopping import StopOutcome, stop_answer
from examples.chat.store import (
    NO_WORKER,
    WORKER_LOST,
    WORKER_STOPPED,
    ChatStore,
    Claim,
    ClaimLost,
    InteractionChange,
)
from examples.chat.worker import (
    ResponseWorker,
    WorkerSettings,
    simulated_answer,
    simulated_tokens,
)

pytestmark = pytest.mark.anyio

WAIT = 5.0
LEASE = 0.3
CHECKPOINT_INTERVAL = 0.25  # seconds: AnswerStream's default, which the worker keeps


@pytest.fixture
def anyio_backend() -> str:
    # SQLAlchemy's asyncio extension and nats-py run on asyncio only.
    return "asyncio"


DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"

EngineFactory = Callable[[], AsyncEngine]


@pytest.fixture(params=["sqlite", "postgresql"])
async def new_engine(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[EngineFactory]:
    """Makes engines on one fresh database: each one is another process (replica, worker).

    PostgreSQL (``DATABASE_URL``, else the machine's) gets a schema of its own, dropped after.
    """
    engines: list[AsyncEngine] = []
    if request.param == "sqlite":
        url, options = f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}", {}
    else:
        url = os.environ.get("DATABASE_URL") or DEFAULT_POSTGRES_URL
        schema = f"chat_test_{secrets.token_hex(6)}"
        options = {"execution_options": {"schema_translate_map": {None: schema}}}
        admin = create_async_engine(url)
        try:
            with anyio.fail_after(10):
                async with admin.begin() as connection:
                    await connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        except (OSError, TimeoutError, DBAPIError) as exc:
            await admin.dispose()
            if os.environ.get("CI"):
                pytest.fail(f"PostgreSQL is required under CI: {exc}")
            pytest.skip(f"PostgreSQL not reachable ({exc}); set DATABASE_URL to run these tests")

    def factory() -> AsyncEngine:
        engines.append(create_async_engine(url, **options))
        return engines[-1]

    try:
        yield factory
    finally:
        for engine in engines:
            await engine.dispose()
        if request.param == "postgresql":
            async with admin.begin() as connection:
                await connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
            await admin.dispose()


@pytest.fixture
async def store(new_engine: EngineFactory) -> AsyncIterator[ChatStore]:
    async with ChatStore(new_engine()) as store:
        yield store


@pytest.fixture
async def replica(new_engine: EngineFactory, store: ChatStore) -> AsyncIterator[ChatStore]:
    """A second store on the same database: another API replica, or another worker."""
    async with ChatStore(new_engine()) as replica:
        yield replica


@pytest.fixture
async def bridge(nats_server: EmbeddedNats) -> AsyncIterator[NatsBridge]:
    async with NatsBridge(nats_server.url) as bridge:
        yield bridge


async def pending_prompt(store: ChatStore, claim_within: float = 10.0) -> str:
    session = await store.create_session("alice", "Demo")
    added = await store.add_prompt(session["id"], "alice", "hi", claim_within=claim_within)
    assert added is not None
    return session["id"]


async def claimed(store: ChatStore, lease: float = 10.0, worker: str = "w1") -> Claim:
    claim = await store.claim(worker, lease=lease)
    assert claim is not None
    return claim


async def current(store: ChatStore, session_id: str) -> SessionView:
    view = await store.get_session(session_id, "alice")
    assert view is not None
    return view


def checkpoint_of(
    claim: Claim, text: str, version: int, base: int, status: AnswerStatus = AnswerStatus.STREAMING
) -> Checkpoint:
    return Checkpoint(claim.session_id, text, status, version, base)


class Statements:
    """The SQL statements an engine executes while recording (``with Statements(engine):``)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine.sync_engine
        self.executed: list[str] = []

    def _record(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.executed.append(" ".join(statement.split()))

    def __enter__(self) -> Statements:
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)

    def matching(self, pattern: str) -> list[str]:
        return [statement for statement in self.executed if re.search(pattern, statement)]

    @property
    def writes(self) -> list[str]:
        return self.matching(r"^(UPDATE|INSERT|DELETE)\b")


# Written by a checkpoint, and nothing else: the text of the answer.
CHECKPOINT_WRITE = r"^UPDATE \S*interactions SET response="


async def anyio_gather(*awaitables: Awaitable[Any]) -> list[Any]:
    results: list[Any] = [None] * len(awaitables)

    async def run(index: int, awaitable: Awaitable[Any]) -> None:
        results[index] = await awaitable

    async with anyio.create_task_group() as group:
        for index, awaitable in enumerate(awaitables):
            group.start_soon(run, index, awaitable)
    return results


async def follow_session(
    receive_event: Callable[[], Awaitable[dict[str, Any]]],
    state: dict[str, Any],
    version: int,
    *,
    until: Callable[[dict[str, Any]], bool],
    within: float,
) -> tuple[dict[str, Any], int, list[dict[str, Any]]]:
    """Apply a socket's (or a subject's) frames to ``state`` at ``version`` until ``until``.

    ``session_update`` frames replace the state; ``session_patch`` frames apply (their
    ``append`` operations too) and must chain from the version before. Returns the state,
    its version and the frames, within ``within`` seconds. Shared by the examples' tests.
    """
    frames: list[dict[str, Any]] = []
    with anyio.fail_after(within):
        while not until(state):
            frame = await receive_event()
            frames.append(frame)
            if frame["type"] == "session_update":
                state, version = frame["session"], frame["version"]
            elif frame["type"] == "session_patch":
                assert frame["base_version"] == version, (version, frame)
                state, version = apply_patch(state, frame["patch"]), frame["version"]
    return state, version, frames


async def next_stream_event(client: ResponseClient) -> dict[str, Any]:
    """The next event of an example's event stream (``/sse/sessions/{id}``), as a frame.

    Checks what a resuming ``EventSource`` relies on: a session event is named for its type
    and carries its version as ``id:``. Shared by the examples' tests.
    """
    event = await client.next_event()
    frame: dict[str, Any] = event.json()
    assert (event.type, event.id) == (frame["type"], str(frame["version"])), event
    return frame


def answer_done(position: int) -> Callable[[dict[str, Any]], bool]:
    """Whether the interaction at ``position`` is done, in a session's state."""

    def done(state: dict[str, Any]) -> bool:
        interactions = state["interactions"]
        return len(interactions) > position and bool(interactions[position]["done"])

    return done


# The store: claims.


async def test_claim_commits_streaming_at_the_next_version(store: ChatStore) -> None:
    session_id = await pending_prompt(store)
    pending = await current(store, session_id)
    assert pending["interactions"][0]["status"] == "pending"

    claim = await claimed(store)

    assert (claim.session_id, claim.owner, claim.position) == (session_id, "alice", 0)
    assert claim.version == 3  # created at 1, the prompt 2, the claim 3
    view = await current(store, session_id)
    assert view["version"] == 3
    assert view["interactions"][0] == {
        "position": 0,
        "prompt": "hi",
        "response": "",
        "status": "streaming",
        "done": False,
        "interrupted": None,
    }


async def test_a_prompt_is_claimed_by_one_worker_only(store: ChatStore, replica: ChatStore) -> None:
    await pending_prompt(store)
    claims = await anyio_gather(store.claim("w1", lease=10), replica.claim("w2", lease=10))
    assert sum(claim is not None for claim in claims) == 1
    assert await store.claim("w3", lease=10) is None


async def test_one_answer_per_session_at_a_time(store: ChatStore, replica: ChatStore) -> None:
    session_id = await pending_prompt(store)
    await store.add_prompt(session_id, "alice", "and then?", claim_within=10)
    other_session = await pending_prompt(store)

    # Two workers at once: one takes the session's first prompt, the other the other session's.
    first, second = await anyio_gather(store.claim("w1", lease=10), replica.claim("w2", lease=10))
    assert first is not None
    assert second is not None
    assert {(first.session_id, first.position), (second.session_id, second.position)} == {
        (session_id, 0),
        (other_session, 0),
    }
    # The session's second prompt waits while its first answer is under way...
    assert await store.claim("w3", lease=10) is None
    mine = first if first.session_id == session_id else second
    # ...even once the stream's last checkpoint made it complete, until the answer is done.
    version = (await current(store, session_id))["version"]
    final = checkpoint_of(mine, "Done.", version + 1000, version, AnswerStatus.COMPLETE)
    assert await store.checkpoint(mine, final, lease=10) == version + 1000
    assert await store.claim("w3", lease=10) is None
    assert await store.finish(mine, AnswerStatus.COMPLETE, claim_within=10) is not None
    then = await claimed(store, worker="w3")
    assert (then.session_id, then.position) == (session_id, 1)


async def test_a_prompt_behind_a_streaming_answer_is_not_late(store: ChatStore) -> None:
    session_id = await pending_prompt(store)
    claim = await claimed(store, lease=10)
    await store.add_prompt(session_id, "alice", "and then?", claim_within=LEASE)
    await anyio.sleep(LEASE + 0.05)  # a deadline is wall-clock time: let it run out

    # Its deadline does not run while the answer before it streams...
    assert await store.interrupt_expired(claim_within=LEASE) == []
    change = await store.finish(claim, AnswerStatus.COMPLETE, claim_within=LEASE)
    assert change is not None
    # ...and starts again, whole, when that answer ends.
    assert await store.interrupt_expired(claim_within=LEASE) == []
    await anyio.sleep(LEASE + 0.05)
    [late] = await store.interrupt_expired(claim_within=LEASE)
    assert (late.position, late.values["interrupted"]) == (1, NO_WORKER)


# The store: checkpoints, a compare-and-set on the session's version.


async def test_checkpoint_commits_text_and_status_at_the_streams_version(
    store: ChatStore,
) -> None:
    session_id = await pending_prompt(store)
    claim = await claimed(store, lease=LEASE)

    with Statements(store.engine) as statements:
        version = await store.checkpoint(
            claim, checkpoint_of(claim, "Hello, wor", 1003, 3), lease=LEASE
        )

    assert version == 1003
    view = await current(store, session_id)
    assert view["version"] == 1003
    assert view["interactions"][0]["response"] == "Hello, wor"
    assert view["interactions"][0]["status"] == "streaming"
    assert view["interactions"][0]["done"] is False
    # One transaction of two statements: the compare-and-set, then the interaction.
    [cas] = statements.matching(r"^UPDATE \S*chat_sessions")
    assert re.search(r"SET version=\S+ WHERE \S*chat_sessions.id = \S+ AND \S*version = ", cas)
    assert len(statements.writes) == 2
    # The checkpoint renewed the lease.
    await anyio.sleep(LEASE * 0.6)
    await store.checkpoint(claim, checkpoint_of(claim, "Hello, world", 1004, 1003), lease=LEASE)
    await anyio.sleep(LEASE * 0.6)
    assert await store.interrupt_expired(claim_within=10) == []


async def test_checkpoint_behind_another_commit_returns_its_version_and_writes_nothing(
    store: ChatStore,
) -> None:
    session_id = await pending_prompt(store)
    claim = await claimed(store)
    # The API commits a new prompt meanwhile: version 4.
    await store.add_prompt(session_id, "alice", "and then?", claim_within=10)
    before = await current(store, session_id)

    with Statements(store.engine) as statements:
        version = await store.checkpoint(claim, checkpoint_of(claim, "Hello", 1003, 3), lease=10)

    assert version == 4
    assert await current(store, session_id) == before
    assert statements.matching(r"^UPDATE \S*interactions") == []
    # The stream commits on top of it, as AnswerStream does after a failed compare-and-set.
    assert await store.checkpoint(claim, checkpoint_of(claim, "Hello", 1004, 4), lease=10) == 1004
    assert (await current(store, session_id))["interactions"][0]["response"] == "Hello"


async def test_checkpoint_after_the_lease_expired_raises_and_writes_nothing(
    store: ChatStore, replica: ChatStore
) -> None:
    session_id = await pending_prompt(store)
    claim = await claimed(store, lease=LEASE)
    assert await store.checkpoint(claim, checkpoint_of(claim, "Half", 1003, 3), lease=LEASE) == 1003
    assert await store.interrupt_expired(claim_within=10) == []  # still held

    await anyio.sleep(LEASE + 0.05)  # a lease is wall-clock time: let it run out
    # Two replicas sweep at once: exactly one marks it.
    swept = await anyio_gather(
        store.interrupt_expired(claim_within=10), replica.interrupt_expired(claim_within=10)
    )
    [interruption] = swept[0] + swept[1]
    assert (interruption.session_id, interruption.position) == (session_id, 0)
    assert interruption.version == 1004
    assert interruption.values == {
        "status": "interrupted",
        "done": True,
        "interrupted": WORKER_LOST,
    }

    # The worker comes back too late: it can neither write nor renew, nor end the answer.
    with pytest.raises(ClaimLost):
        await store.checkpoint(claim, checkpoint_of(claim, "Half more", 1005, 1004), lease=LEASE)
    assert not await store.renew(claim, lease=LEASE)
    assert await store.finish(claim, AnswerStatus.COMPLETE, claim_within=10) is None
    view = await current(store, session_id)
    assert view["version"] == 1004
    assert view["interactions"][0] == {
        "position": 0,
        "prompt": "hi",
        "response": "Half",
        "status": "interrupted",
        "done": True,
        "interrupted": WORKER_LOST,
    }


async def test_finish_marks_the_answer_done_one_commit_after_its_last_checkpoint(
    store: ChatStore,
) -> None:
    session_id = await pending_prompt(store)
    claim = await claimed(store)
    final = checkpoint_of(claim, "Stopped here", 1003, 3, AnswerStatus.CANCELLED)
    assert await store.checkpoint(claim, final, lease=10) == 1003
    # The stream published exactly this: the text and the status, not done yet.
    assert (await current(store, session_id))["interactions"][0]["done"] is False

    change = await store.finish(claim, AnswerStatus.CANCELLED, claim_within=10)

    assert change is not None
    assert change.version == 1004
    assert change.values == {"status": "cancelled", "done": True, "interrupted": None}
    view = await current(store, session_id)
    assert view["version"] == 1004
    assert view["interactions"][0]["response"] == "Stopped here"
    assert view["interactions"][0]["status"] == "cancelled"
    assert view["interactions"][0]["done"] is True
    # Its lease is gone: nothing sweeps it later.
    assert await store.interrupt_expired(claim_within=10) == []


async def test_an_interrupted_stream_ends_with_the_reason(store: ChatStore) -> None:
    session_id = await pending_prompt(store)
    claim = await claimed(store)
    change = await store.finish(claim, AnswerStatus.INTERRUPTED, claim_within=10)
    assert change is not None
    assert change.values == {"status": "interrupted", "done": True, "interrupted": WORKER_STOPPED}
    assert (await current(store, session_id))["interactions"][0]["interrupted"] == WORKER_STOPPED


async def test_an_ended_stream_whose_worker_died_keeps_its_status(store: ChatStore) -> None:
    session_id = await pending_prompt(store)
    claim = await claimed(store, lease=LEASE)
    final = checkpoint_of(claim, "All of it.", 1003, 3, AnswerStatus.COMPLETE)
    await store.checkpoint(claim, final, lease=LEASE)
    await anyio.sleep(LEASE + 0.05)  # the worker died before finish

    [change] = await store.interrupt_expired(claim_within=10)

    assert change.values == {"status": "complete", "done": True, "interrupted": None}
    view = await current(store, session_id)
    assert view["interactions"][0]["status"] == "complete"
    assert view["interactions"][0]["done"] is True


# The store: stopping a pending prompt, leases.


async def test_a_pending_prompt_is_cancelled_by_its_owner_only(store: ChatStore) -> None:
    session_id = await pending_prompt(store)
    assert await store.interaction_status(session_id, "bob", 0) is None
    assert await store.cancel_pending(session_id, "bob", 0) is None
    assert await store.interaction_status(session_id, "alice", 7) is None
    assert await store.interaction_status(session_id, "alice", 0) == "pending"

    change = await store.cancel_pending(session_id, "alice", 0)

    assert change is not None
    assert (change.version, change.values) == (3, {"status": "cancelled", "done": True})
    assert await store.interaction_status(session_id, "alice", 0) == "cancelled"
    assert await store.claim("w1", lease=10) is None
    assert await store.cancel_pending(session_id, "alice", 0) is None
    assert (await current(store, session_id))["version"] == 3


async def test_a_claimed_prompt_is_not_cancelled_in_the_database(store: ChatStore) -> None:
    session_id = await pending_prompt(store)
    await claimed(store)
    assert await store.cancel_pending(session_id, "alice", 0) is None
    assert (await current(store, session_id))["version"] == 3


async def test_stop_answer_says_what_it_did(store: ChatStore, bridge: NatsBridge) -> None:
    publisher = SessionPublisher(bridge)
    session_id = await pending_prompt(store)
    await store.add_prompt(session_id, "alice", "and then?", claim_within=10)

    async def stop(position: int, user: str = "alice") -> StopOutcome:
        with anyio.fail_after(WAIT):
            return await stop_answer(store, bridge, publisher, session_id, user, position)

    assert await stop(0, "bob") is StopOutcome.NOT_FOUND
    assert await stop(2) is StopOutcome.NOT_FOUND
    assert await stop(1) is StopOutcome.CANCELLED  # pending: cancelled in the database
    assert await stop(1) is StopOutcome.ALREADY_FINAL
    # Claimed, but no stream serves it (its worker is gone): nobody acknowledges.
    claim = await claimed(store)
    assert await stop(0) is StopOutcome.NO_PRODUCER
    await store.finish(claim, AnswerStatus.COMPLETE, claim_within=10)
    assert await stop(0) is StopOutcome.ALREADY_FINAL


async def test_renewed_lease_is_not_swept(store: ChatStore) -> None:
    await pending_prompt(store)
    claim = await claimed(store, lease=LEASE)
    for _ in range(3):
        await anyio.sleep(LEASE / 2)
        assert await store.renew(claim, lease=LEASE)
        assert await store.interrupt_expired(claim_within=10) == []


async def test_prompt_no_worker_claims_is_interrupted_with_that_reason(store: ChatStore) -> None:
    session_id = await pending_prompt(store, claim_within=LEASE)
    await anyio.sleep(LEASE + 0.05)
    [interruption] = await store.interrupt_expired(claim_within=10)
    assert interruption.values["interrupted"] == NO_WORKER
    assert await store.claim("late", lease=10) is None
    view = await current(store, session_id)
    assert view["interactions"][0]["interrupted"] == NO_WORKER
    assert view["interactions"][0]["status"] == "interrupted"


async def test_sweeper_publishes_the_interruption_as_a_patch(
    store: ChatStore, bridge: NatsBridge
) -> None:
    session_id = await pending_prompt(store, claim_within=LEASE)
    subscription = await bridge.client.subscribe(f"session_sync.{session_id}")
    sweeper = LeaseSweeper(store, SessionPublisher(bridge), interval=0.05, claim_within=10)
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as group:
            group.start_soon(sweeper.run)
            message = await subscription.next_msg(timeout=WAIT)
            group.cancel_scope.cancel()
    event = json.loads(message.data)
    assert event["type"] == "session_patch"
    assert (event["base_version"], event["version"]) == (2, 3)
    assert event["patch"] == [
        {"op": "replace", "path": "/interactions/0/status", "value": "interrupted"},
        {"op": "replace", "path": "/interactions/0/done", "value": True},
        {"op": "replace", "path": "/interactions/0/interrupted", "value": NO_WORKER},
    ]


async def test_malformed_ids_never_reach_the_database(store: ChatStore) -> None:
    # An engine that fails every statement would make these raise; they answer at once.
    broken = ChatStore(create_async_engine("sqlite+aiosqlite:////nonexistent/dir/x.db"))
    for session_id in ("a\x00b", "a\nb", "0" * 31, "x" * 300, "../etc"):
        assert await broken.get_session(session_id, "alice") is None
        assert not await broken.is_owner(session_id, "alice")
        assert await broken.add_prompt(session_id, "alice", "x", claim_within=1) is None
        assert await broken.interaction_status(session_id, "alice", 0) is None
        assert await broken.cancel_pending(session_id, "alice", 0) is None


async def test_another_users_session_is_never_loaded(store: ChatStore) -> None:
    session_id = await pending_prompt(store)
    with Statements(store.engine) as statements:
        assert await store.get_session(session_id, "bob") is None
        assert await store.get_session("0" * 32, "bob") is None
    # One query each, with the owner in it: bob's miss costs what a missing id costs, and
    # the interactions (the session's size) are never read.
    assert len(statements.executed) == 2
    assert all("owner" in statement for statement in statements.executed)
    assert not any("FROM interactions" in statement for statement in statements.executed)


async def test_a_database_from_before_the_status_column_gets_it(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    async with engine.begin() as connection:
        for statement in OLD_SCHEMA:
            await connection.exec_driver_sql(statement)
    async with ChatStore(engine) as store:
        view = await store.get_session("a" * 32, "alice")
    assert view is not None
    statuses = [(item["status"], item["done"]) for item in view["interactions"]]
    assert statuses == [("complete", True), ("interrupted", True), ("pending", False)]


OLD_SCHEMA = [
    "CREATE TABLE chat_sessions (id VARCHAR(32) PRIMARY KEY, owner VARCHAR(64) NOT NULL, "
    "title VARCHAR(200) NOT NULL, version INTEGER NOT NULL)",
    "CREATE TABLE interactions (id INTEGER PRIMARY KEY, session_id VARCHAR(32) NOT NULL "
    "REFERENCES chat_sessions (id) ON DELETE CASCADE, position INTEGER NOT NULL, prompt TEXT "
    "NOT NULL, response TEXT NOT NULL, done BOOLEAN NOT NULL, interrupted VARCHAR(200), "
    "worker VARCHAR(100), lease_expires_at FLOAT, UNIQUE (session_id, position))",
    f"INSERT INTO chat_sessions VALUES ('{'a' * 32}', 'alice', 'Old', 4)",
    f"INSERT INTO interactions VALUES (1, '{'a' * 32}', 0, 'a', 'All.', 1, NULL, 'w', NULL)",
    f"INSERT INTO interactions VALUES (2, '{'a' * 32}', 1, 'b', 'Ha', 1, '{WORKER_LOST}', 'w', "
    "NULL)",
    f"INSERT INTO interactions VALUES (3, '{'a' * 32}', 2, 'c', '', 0, NULL, NULL, 1.0)",
]


# The simulated answer.


@pytest.mark.parametrize("count", [1, 5, 15, 399, 400, 401, 1_000, 10_000])
def test_every_simulated_answer_ends_with_a_whole_sentence(count: int) -> None:
    tokens = simulated_tokens(count)
    assert len(tokens) == count
    text = "".join(tokens)
    assert text.endswith(".")
    assert text.startswith("This answer")
    sentences = re.split(r"(?<=\.)\s+", simulated_answer())
    assert re.split(r"(?<=\.)\s+", text)[-1] in sentences


def test_the_default_answer_is_the_text_once() -> None:
    assert "".join(simulated_tokens(WorkerSettings("unused", "unused").tokens)) == (
        simulated_answer()
    )
    assert simulated_answer().count("\n\n") >= 3  # paragraphs


# The worker, through a real nats-server.


def worker_settings(tokens: int, token_interval: float, lease: float = 10.0) -> WorkerSettings:
    return WorkerSettings(
        database_url="unused",
        nats_url="unused",
        tokens=tokens,
        token_interval=token_interval,
        lease=lease,
    )


async def test_worker_streams_300_tokens_with_a_few_checkpoint_writes(
    store: ChatStore, bridge: NatsBridge
) -> None:
    session_id = await pending_prompt(store)
    settings = worker_settings(tokens=300, token_interval=0.005)  # 1.5 s
    worker = ResponseWorker(store, bridge, settings, name="w1")
    subscription = await bridge.client.subscribe(f"session_sync.{session_id}")
    claim = await claimed(store, worker=worker.name)
    with Statements(store.engine) as statements, anyio.fail_after(WAIT * 2):
        started = anyio.current_time()
        outcome = await worker.stream(claim)
        duration = anyio.current_time() - started
    final_text = "".join(simulated_tokens(300))
    assert (outcome.status, outcome.tokens) == (AnswerStatus.COMPLETE, 300)
    checkpoints = statements.matching(CHECKPOINT_WRITE)
    assert 1 <= len(checkpoints) <= duration / CHECKPOINT_INTERVAL + 2, (duration, checkpoints)
    assert len(checkpoints) == outcome.checkpoints
    # Every other write: the end of the answer, and maybe a lease renewal; never per token.
    assert len(statements.writes) <= 2 * len(checkpoints) + 4
    view = await current(store, session_id)
    assert view["interactions"][0]["response"] == final_text
    assert (view["interactions"][0]["status"], view["interactions"][0]["done"]) == (
        "complete",
        True,
    )
    # What a socket got: the claim, a few dozen deltas of new text (not one per token, never
    # the text so far), the end; chained from the claim's version to the database's.
    received: list[dict[str, Any]] = []
    with anyio.fail_after(WAIT):
        while not received or received[-1]["version"] != view["version"]:
            received.append(json.loads((await subscription.next_msg(timeout=WAIT)).data))
    assert len(received) <= duration / 0.05 + 4
    state, version, _ = await follow_session(
        iter_frames(received), await state_at_claim(store, session_id), claim.version - 1,
        until=answer_done(0), within=WAIT,
    )  # fmt: skip
    # The session's own "version" member is the snapshot's: patches leave it.
    assert ({**state, "version": version}, version) == (view_state(view), view["version"])
    appends = [op for frame in received for op in frame["patch"] if op["op"] == "append"]
    assert len(appends) < 300 / 2
    assert sum(len(op["value"]) for op in appends) == len(final_text)


def iter_frames(frames: list[dict[str, Any]]) -> Callable[[], Awaitable[dict[str, Any]]]:
    pending = iter(frames)

    async def next_frame() -> dict[str, Any]:
        return next(pending)

    return next_frame


async def state_at_claim(store: ChatStore, session_id: str) -> dict[str, Any]:
    """The session's state before its claim: as the prompt left it."""
    view = view_state(await current(store, session_id))
    view["interactions"][0].update(response="", status="pending", done=False, interrupted=None)
    return view


def view_state(view: SessionView) -> dict[str, Any]:
    """The state a socket holds: the view, whose version is the frame's."""
    state = json.loads(json.dumps(view))
    assert isinstance(state, dict)
    return state


@pytest.mark.parametrize("tokens", [1_000, 10_000])
async def test_worker_streams_long_answers_whole(
    store: ChatStore, bridge: NatsBridge, tokens: int
) -> None:
    session_id = await pending_prompt(store)
    worker = ResponseWorker(store, bridge, worker_settings(tokens, 0.0), name="w1")
    claim = await claimed(store, worker=worker.name)
    with Statements(store.engine) as statements, anyio.fail_after(WAIT * 6):
        outcome = await worker.stream(claim)
    assert (outcome.status, outcome.tokens) == (AnswerStatus.COMPLETE, tokens)
    assert len(statements.matching(CHECKPOINT_WRITE)) < tokens / 10
    view = await current(store, session_id)
    assert view["interactions"][0]["response"] == "".join(simulated_tokens(tokens))
    assert view["interactions"][0]["status"] == "complete"


async def test_worker_stops_generating_when_asked(store: ChatStore, bridge: NatsBridge) -> None:
    session_id = await pending_prompt(store)
    worker = ResponseWorker(store, bridge, worker_settings(400, 0.01), name="w1")
    claim = await claimed(store, worker=worker.name)
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as group:

            async def stop_soon() -> None:
                await anyio.sleep(0.3)  # mid-answer: 30 of its 400 tokens
                assert await bridge.stop_answer(session_id, "/interactions/0/response")

            group.start_soon(stop_soon)
            outcome = await worker.stream(claim)
    assert outcome.status is AnswerStatus.CANCELLED
    assert 0 < outcome.tokens < 400
    view = await current(store, session_id)
    assert view["interactions"][0]["response"] == "".join(simulated_tokens(400)[: outcome.tokens])
    assert (view["interactions"][0]["status"], view["interactions"][0]["done"]) == (
        "cancelled",
        True,
    )
    assert await bridge.stop_answer(session_id, "/interactions/0/response") is False


async def test_worker_keeps_its_lease_between_slow_tokens(
    store: ChatStore, bridge: NatsBridge
) -> None:
    session_id = await pending_prompt(store)
    settings = worker_settings(tokens=2, token_interval=LEASE * 2, lease=LEASE)
    worker = ResponseWorker(store, bridge, settings, name="slow")
    claim = await claimed(store, lease=LEASE, worker=worker.name)
    swept: list[int] = []
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as group:

            async def sweep() -> None:
                while True:
                    swept.append(len(await store.interrupt_expired(claim_within=10)))
                    await anyio.sleep(LEASE / 4)

            group.start_soon(sweep)
            await worker.stream(claim)
            group.cancel_scope.cancel()
    assert sum(swept) == 0, "a lease expired while its worker was alive"
    view = await current(store, session_id)
    assert view["interactions"][0]["done"] is True
    assert view["interactions"][0]["interrupted"] is None
    assert view["interactions"][0]["response"] == "".join(simulated_tokens(2))


async def test_worker_that_loses_its_lease_stops_and_leaves_the_interruption(
    store: ChatStore, bridge: NatsBridge
) -> None:
    session_id = await pending_prompt(store)
    worker = ResponseWorker(store, bridge, worker_settings(400, 0.01, lease=LEASE), name="w1")
    claim = await claimed(store, lease=LEASE, worker=worker.name)
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as group:

            async def expire() -> None:
                # As if the worker had been silent for a lease: the sweeper takes it (once
                # no checkpoint renewed it between these two transactions).
                await anyio.sleep(0.3)
                swept: list[InteractionChange] = []
                while not swept:
                    async with store.sessionmaker.begin() as db:
                        await db.execute(update(Interaction).values(lease_expires_at=0.0))
                    swept = await store.interrupt_expired(claim_within=10)

            group.start_soon(expire)
            outcome = await worker.stream(claim)
    assert outcome.status is AnswerStatus.INTERRUPTED
    assert outcome.tokens < 400
    view = await current(store, session_id)
    assert view["interactions"][0]["interrupted"] == WORKER_LOST
    assert view["interactions"][0]["status"] == "interrupted"
