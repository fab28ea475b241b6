"""The examples' shared chat below HTTP: claims, token commits, leases and their sweeper.

Against a real SQLite file and PostgreSQL (each test in a schema of its own; skipped without
it outside CI), with two stores on one database where two replicas or workers race.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from asgi_session_sync.nats import EmbeddedNats, NatsBridge
from examples.chat.leases import LeaseSweeper
from examples.chat.publishing import SessionPublisher
from examples.chat.store import NO_WORKER, WORKER_LOST, ChatStore
from examples.chat.worker import ResponseWorker, WorkerSettings, simulated_tokens

pytestmark = pytest.mark.anyio

WAIT = 5.0
LEASE = 0.3


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


async def pending_prompt(store: ChatStore, claim_within: float = 10.0) -> str:
    session = await store.create_session("alice", "Demo")
    added = await store.add_prompt(session["id"], "alice", "hi", claim_within=claim_within)
    assert added is not None
    return session["id"]


async def test_each_token_commits_one_version_and_the_response_so_far(store: ChatStore) -> None:
    session_id = await pending_prompt(store)
    claim = await store.claim("w1", lease=10)
    assert claim is not None
    assert (claim.session_id, claim.owner, claim.position) == (session_id, "alice", 0)

    first = await store.append_token(claim, "Hello", done=False, lease=10)
    second = await store.append_token(claim, " world", done=True, lease=10)

    assert first is not None
    assert second is not None
    assert (first.version, first.response) == (3, "Hello")
    assert (second.version, second.response, second.done) == (4, "Hello world", True)
    view = await store.get_session(session_id, "alice")
    assert view is not None
    assert view["version"] == 4
    assert view["interactions"][0] == {
        "position": 0,
        "prompt": "hi",
        "response": "Hello world",
        "done": True,
        "interrupted": None,
    }


async def test_a_prompt_is_claimed_by_one_worker_only(store: ChatStore, replica: ChatStore) -> None:
    await pending_prompt(store)
    claims = await anyio_gather(store.claim("w1", lease=10), replica.claim("w2", lease=10))
    assert sum(claim is not None for claim in claims) == 1
    assert await store.claim("w3", lease=10) is None


async def anyio_gather(*awaitables: Any) -> list[Any]:
    results: list[Any] = [None] * len(awaitables)

    async def run(index: int, awaitable: Any) -> None:
        results[index] = await awaitable

    async with anyio.create_task_group() as group:
        for index, awaitable in enumerate(awaitables):
            group.start_soon(run, index, awaitable)
    return results


async def test_expired_lease_is_marked_interrupted_once_and_the_worker_loses_it(
    store: ChatStore, replica: ChatStore
) -> None:
    session_id = await pending_prompt(store)
    claim = await store.claim("w1", lease=LEASE)
    assert claim is not None
    assert await store.append_token(claim, "Half", done=False, lease=LEASE) is not None
    assert await store.interrupt_expired() == []  # still held

    await anyio.sleep(LEASE + 0.05)  # a lease is wall-clock time: let it run out
    # Two replicas sweep at once: exactly one marks it.
    swept = await anyio_gather(store.interrupt_expired(), replica.interrupt_expired())
    [interruption] = swept[0] + swept[1]
    assert (interruption.session_id, interruption.position) == (session_id, 0)
    assert interruption.reason == WORKER_LOST
    assert interruption.version == 4

    # The worker comes back too late: it can neither write nor renew.
    assert await store.append_token(claim, " more", done=False, lease=LEASE) is None
    assert not await store.renew(claim, lease=LEASE)
    view = await store.get_session(session_id, "alice")
    assert view is not None
    assert view["version"] == 4
    assert view["interactions"][0]["response"] == "Half"
    assert view["interactions"][0]["done"] is True
    assert view["interactions"][0]["interrupted"] == WORKER_LOST


async def test_renewed_lease_is_not_swept(store: ChatStore) -> None:
    await pending_prompt(store)
    claim = await store.claim("w1", lease=LEASE)
    assert claim is not None
    for _ in range(3):
        await anyio.sleep(LEASE / 2)
        assert await store.renew(claim, lease=LEASE)
        assert await store.interrupt_expired() == []


async def test_prompt_no_worker_claims_is_interrupted_with_that_reason(store: ChatStore) -> None:
    session_id = await pending_prompt(store, claim_within=LEASE)
    await anyio.sleep(LEASE + 0.05)
    [interruption] = await store.interrupt_expired()
    assert interruption.reason == NO_WORKER
    assert await store.claim("late", lease=10) is None
    view = await store.get_session(session_id, "alice")
    assert view is not None
    assert view["interactions"][0]["interrupted"] == NO_WORKER


async def test_sweeper_publishes_the_interruption_as_a_patch(
    store: ChatStore, nats_server: EmbeddedNats
) -> None:
    session_id = await pending_prompt(store, claim_within=LEASE)
    async with NatsBridge(nats_server.url) as bridge:
        subscription = await bridge.client.subscribe(f"session_sync.{session_id}")
        sweeper = LeaseSweeper(store, SessionPublisher(bridge), interval=0.05)
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as group:
                group.start_soon(sweeper.run)
                message = await subscription.next_msg(timeout=WAIT)
                group.cancel_scope.cancel()
    event = json.loads(message.data)
    assert event["type"] == "session_patch"
    assert (event["base_version"], event["version"]) == (2, 3)
    assert event["patch"] == [
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


async def test_worker_keeps_its_lease_between_slow_tokens(
    store: ChatStore, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    session_id = await pending_prompt(store)
    settings = WorkerSettings(
        database_url="unused",
        nats_url=nats_server.url,
        tokens=2,
        token_interval=LEASE * 2,
        lease=LEASE,
    )
    async with NatsBridge(nats_server.url) as bridge:
        worker = ResponseWorker(store, SessionPublisher(bridge), settings, name="slow")
        claim = await store.claim(worker.name, lease=LEASE)
        assert claim is not None
        swept: list[int] = []
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as group:

                async def sweep() -> None:
                    while True:
                        swept.append(len(await store.interrupt_expired()))
                        await anyio.sleep(LEASE / 4)

                group.start_soon(sweep)
                await worker.stream(claim)
                group.cancel_scope.cancel()
    assert sum(swept) == 0, "a lease expired while its worker was alive"
    view = await store.get_session(session_id, "alice")
    assert view is not None
    assert view["interactions"][0]["done"] is True
    assert view["interactions"][0]["interrupted"] is None
    assert view["interactions"][0]["response"] == "".join(simulated_tokens(2))


async def test_another_users_session_is_never_loaded(store: ChatStore) -> None:
    session_id = await pending_prompt(store)
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(store.engine.sync_engine, "before_cursor_execute", record)
    try:
        assert await store.get_session(session_id, "bob") is None
        assert await store.get_session("0" * 32, "bob") is None
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", record)
    # One query each, with the owner in it: bob's miss costs what a missing id costs, and
    # the interactions (the session's size) are never read.
    assert len(statements) == 2
    assert all("owner" in statement for statement in statements)
    assert not any("FROM interactions" in statement for statement in statements)
