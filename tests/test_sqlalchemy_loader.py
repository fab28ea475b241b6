"""The SQLAlchemy loader, against real SQLite (aiosqlite) and PostgreSQL (asyncpg) databases.

PostgreSQL is ``DATABASE_URL`` when set, else ``postgresql+asyncpg://postgres@127.0.0.1:5432/test``.
Each test gets its own schema, created and dropped by the test, so nothing else in the database
is touched. When PostgreSQL cannot be reached its tests are skipped, except under CI, where they
fail.
"""

from __future__ import annotations

import logging
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio
from pydantic import BaseModel
from sqlalchemy import DateTime, ForeignKey, String, Text, Uuid, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from asgi_session_sync import SessionContext, SessionSyncMiddleware, Snapshot, user_identity
from asgi_session_sync._types import Receive, Scope, Send
from asgi_session_sync.loaders.sqlalchemy import (
    SQLAlchemyLoader,
    column_values,
    sqlalchemy_loader,
)
from asgi_session_sync.testing import connect_websocket

pytestmark = pytest.mark.anyio

DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
CREATED_AT = datetime(2026, 1, 2, 3, 4, 5)
TICKET_UPDATED_AT = datetime(2026, 5, 6, 7, 8, 9, 123456)
NOTE_ID = uuid.UUID("7d1f0c2a-3b4e-4f5a-9c8d-0e1f2a3b4c5d")


@pytest.fixture
def anyio_backend() -> str:
    # SQLAlchemy's asyncio extension and its drivers (aiosqlite, asyncpg) run on asyncio only.
    return "asyncio"


class Base(DeclarativeBase):
    pass


class ChatSession(Base):
    __tablename__ = "chat_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int]
    title: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime())
    interactions: Mapped[list[Interaction]] = relationship(order_by="Interaction.position")


class Interaction(Base):
    __tablename__ = "interactions"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("chat_sessions.id"))
    position: Mapped[int]
    prompt: Mapped[str] = mapped_column(Text)
    response: Mapped[str] = mapped_column(Text)


class Ticket(Base):
    """An integer key, a timestamp version, and a relationship without ``order_by``."""

    __tablename__ = "tickets"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(DateTime())
    comments: Mapped[list[Comment]] = relationship()


class Comment(Base):
    __tablename__ = "comments"

    id: Mapped[int] = mapped_column(primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"))
    body: Mapped[str] = mapped_column(Text)


class Note(Base):
    """A UUID key."""

    __tablename__ = "notes"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    version: Mapped[int]
    lines: Mapped[list[NoteLine]] = relationship()


class NoteLine(Base):
    __tablename__ = "note_lines"

    id: Mapped[int] = mapped_column(primary_key=True)
    note_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("notes.id"))
    text: Mapped[str] = mapped_column(Text)


def seed() -> list[Base]:
    # Interaction ids run against positions, and comment ids are inserted out of order, so
    # an ordering bug shows whichever order the database happens to return rows in.
    return [
        ChatSession(
            id="s1",
            owner_id="alice",
            version=3,
            title="Trip to Lisbon",
            created_at=CREATED_AT,
            interactions=[
                Interaction(id=10, position=2, prompt="and dinner?", response="Ramiro"),
                Interaction(id=11, position=0, prompt="hello", response="hi"),
                Interaction(id=12, position=1, prompt="a museum?", response="Gulbenkian"),
            ],
        ),
        ChatSession(id="s2", owner_id="bob", version=1, title="Empty", created_at=CREATED_AT),
        Ticket(
            id=1,
            owner="alice",
            updated_at=TICKET_UPDATED_AT,
            comments=[Comment(id=3, body="third"), Comment(id=1, body="first")],
        ),
        Comment(id=2, ticket_id=1, body="second"),
        Note(id=NOTE_ID, owner="alice", version=7, lines=[NoteLine(id=1, text="remember")]),
    ]


# Why PostgreSQL could not be reached, once known, so later tests skip without waiting again.
_postgres_unreachable: list[str] = []


def _postgres_missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"PostgreSQL is required under CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL not reachable ({reason}); set DATABASE_URL to run these tests")


@asynccontextmanager
async def postgres_engine() -> AsyncIterator[AsyncEngine]:
    if _postgres_unreachable:
        _postgres_missing(_postgres_unreachable[0])
    url = os.environ.get("DATABASE_URL") or DEFAULT_POSTGRES_URL
    schema = f"sss_test_{secrets.token_hex(6)}"
    engine = create_async_engine(url, execution_options={"schema_translate_map": {None: schema}})
    try:
        try:
            with anyio.fail_after(10):
                async with engine.begin() as conn:
                    await conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        except (OSError, TimeoutError, DBAPIError) as exc:
            _postgres_unreachable.append(f"{engine.url!r}: {type(exc).__name__}: {exc}")
            _postgres_missing(_postgres_unreachable[0])
        try:
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.create_all)
            yield engine
        finally:
            async with engine.begin() as conn:
                await conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        await engine.dispose()


@asynccontextmanager
async def sqlite_engine(path: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    database = (
        sqlite_engine(str(tmp_path / "sessions.db"))
        if request.param == "sqlite"
        else postgres_engine()
    )
    async with database as engine:
        async with AsyncSession(engine) as session, session.begin():
            session.add_all(seed())
        yield engine


@pytest.fixture
def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine)


@pytest.fixture
def loader(sessionmaker: async_sessionmaker[AsyncSession]) -> SQLAlchemyLoader:
    return chat_loader(sessionmaker)


def chat_loader(sessionmaker: async_sessionmaker[AsyncSession], **options: Any) -> SQLAlchemyLoader:
    return sqlalchemy_loader(
        sessionmaker,
        ChatSession,
        interactions=ChatSession.interactions,
        owner=ChatSession.owner_id,
        version=ChatSession.version,
        **options,
    )


def ticket_loader(sessionmaker: async_sessionmaker[AsyncSession]) -> SQLAlchemyLoader:
    return sqlalchemy_loader(
        sessionmaker,
        Ticket,
        interactions=Ticket.comments,
        owner=Ticket.owner,
        version=Ticket.updated_at,
    )


def note_loader(sessionmaker: async_sessionmaker[AsyncSession]) -> SQLAlchemyLoader:
    return sqlalchemy_loader(
        sessionmaker, Note, interactions=Note.lines, owner=Note.owner, version=Note.version
    )


def context(session_id: str, user: Any = "alice") -> SessionContext:
    return SessionContext(session_id, {"type": "websocket", "path": f"/ws/{session_id}"}, user)


@contextmanager
def sql_statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """Every statement the engine sends to the database while the block runs."""
    statements: list[str] = []

    def record(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        statements.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "asgi_session_sync" and record.levelno == logging.WARNING
    ]


S1_SESSION = {
    "id": "s1",
    "owner_id": "alice",
    "version": 3,
    "title": "Trip to Lisbon",
    "created_at": CREATED_AT,
    "interactions": [
        {"id": 11, "session_id": "s1", "position": 0, "prompt": "hello", "response": "hi"},
        {
            "id": 12,
            "session_id": "s1",
            "position": 1,
            "prompt": "a museum?",
            "response": "Gulbenkian",
        },
        {
            "id": 10,
            "session_id": "s1",
            "position": 2,
            "prompt": "and dinner?",
            "response": "Ramiro",
        },
    ],
}


async def test_snapshot_holds_the_row_and_its_interactions_in_order(
    loader: SQLAlchemyLoader,
) -> None:
    snapshot = await loader(context("s1"))

    assert snapshot == Snapshot(S1_SESSION, owner="alice", version=3)


async def test_session_without_interactions_has_an_empty_list(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    snapshot = await chat_loader(sessionmaker)(context("s2", user="bob"))

    assert snapshot is not None
    assert snapshot.session["interactions"] == []  # type: ignore[index]
    assert (snapshot.owner, snapshot.version) == ("bob", 1)


async def test_one_sql_statement_per_load(engine: AsyncEngine, loader: SQLAlchemyLoader) -> None:
    with sql_statements(engine) as statements:
        snapshot = await loader(context("s1"))

    assert snapshot is not None
    assert len(statements) == 1, statements
    assert "LEFT OUTER JOIN" in statements[0]


async def test_other_users_session_gives_nothing_and_logs_a_warning(
    loader: SQLAlchemyLoader, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="asgi_session_sync")

    assert await loader(context("s1", user="mallory")) is None

    [warning] = warnings_logged(caplog)
    assert "owner does not match" in warning
    assert "session_id=s1" in warning
    assert "path='/ws/s1'" in warning
    assert "mallory" not in caplog.text


async def test_no_user_gives_nothing(
    loader: SQLAlchemyLoader, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_session_sync")

    assert await loader(context("s1", user=None)) is None

    [warning] = warnings_logged(caplog)
    assert "no user" in warning
    assert "session_id=s1" in warning


async def test_check_owner_false_gives_any_session(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    loader = chat_loader(sessionmaker, check_owner=False)

    snapshot = await loader(context("s1", user=None))

    assert snapshot == Snapshot(S1_SESSION, owner="alice", version=3)


@dataclass
class Account:
    id: int
    username: str


@pytest.mark.parametrize(
    "user", ["alice", {"id": "alice"}, Account(id=0, username="alice")], ids=repr
)
async def test_users_of_every_shape_are_matched(
    sessionmaker: async_sessionmaker[AsyncSession], user: Any
) -> None:
    def username_else_default(user: Any) -> str | None:
        return user.username if isinstance(user, Account) else user_identity(user)

    loader = chat_loader(sessionmaker, user_id=username_else_default)

    snapshot = await loader(context("s1", user=user))

    assert snapshot is not None
    assert snapshot.owner == "alice"


async def test_custom_user_id_decides_the_owner_check(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    loader = chat_loader(sessionmaker, user_id=lambda user: user["sub"])

    assert await loader(context("s1", user={"sub": "alice", "id": "mallory"})) is not None
    assert await loader(context("s1", user={"sub": "mallory", "id": "alice"})) is None


async def test_missing_session_gives_nothing(
    engine: AsyncEngine, loader: SQLAlchemyLoader, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="asgi_session_sync")

    with sql_statements(engine) as statements:
        assert await loader(context("nope")) is None

    assert len(statements) == 1
    assert "no such session session_id=nope" in caplog.text
    assert not warnings_logged(caplog)


async def test_custom_serialize_and_order_by(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    class Transcript(BaseModel):
        title: str
        prompts: list[str]

    def transcript(row: ChatSession) -> Transcript:
        return Transcript(title=row.title, prompts=[i.prompt for i in row.interactions])

    loader = chat_loader(sessionmaker, serialize=transcript, order_by=Interaction.position.desc())

    snapshot = await loader(context("s1"))

    assert snapshot is not None
    assert snapshot.session == Transcript(
        title="Trip to Lisbon", prompts=["and dinner?", "a museum?", "hello"]
    )


async def test_integer_key_and_timestamp_version(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    snapshot = await ticket_loader(sessionmaker)(context("1"))

    assert snapshot is not None
    assert snapshot.version == TICKET_UPDATED_AT
    # Ticket.comments has no order_by: interactions come in primary key order.
    assert snapshot.session["comments"] == [  # type: ignore[index]
        {"id": 1, "ticket_id": 1, "body": "first"},
        {"id": 2, "ticket_id": 1, "body": "second"},
        {"id": 3, "ticket_id": 1, "body": "third"},
    ]


@pytest.mark.parametrize("session_id", ["abc", "1_0", "2147483648", "-2147483649", "99" * 10])
async def test_id_that_cannot_be_an_integer_key_gives_nothing_without_a_query(
    engine: AsyncEngine, sessionmaker: async_sessionmaker[AsyncSession], session_id: str
) -> None:
    loader = ticket_loader(sessionmaker)

    with sql_statements(engine) as statements:
        assert await loader(context(session_id)) is None
        assert await loader.version_loader(context(session_id)) is None

    assert statements == []


async def test_uuid_key(
    engine: AsyncEngine, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    loader = note_loader(sessionmaker)

    snapshot = await loader(context(str(NOTE_ID)))
    with sql_statements(engine) as statements:
        assert await loader(context("not-a-uuid")) is None

    assert snapshot is not None
    assert snapshot.session == {
        "id": NOTE_ID,
        "owner": "alice",
        "version": 7,
        "lines": [{"id": 1, "note_id": NOTE_ID, "text": "remember"}],
    }
    assert statements == []


async def test_version_loader_reads_only_the_version(
    engine: AsyncEngine, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    loader = chat_loader(sessionmaker)

    with sql_statements(engine) as statements:
        version = await loader.version_loader(context("s1"))

    assert version == 3
    [statement] = statements
    assert "interactions" not in statement
    assert "title" not in statement
    assert await ticket_loader(sessionmaker).version_loader(context("1")) == TICKET_UPDATED_AT


async def test_version_loader_checks_the_owner(
    sessionmaker: async_sessionmaker[AsyncSession], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_session_sync")
    loader = chat_loader(sessionmaker)

    assert await loader.version_loader(context("s1", user="mallory")) is None
    assert await loader.version_loader(context("nope")) is None
    assert (
        await chat_loader(sessionmaker, check_owner=False).version_loader(context("s1", user=None))
        == 3
    )

    [warning] = warnings_logged(caplog)
    assert "owner does not match" in warning
    assert "session_id=s1" in warning


async def test_snapshot_is_the_first_frame_through_the_middleware(
    loader: SQLAlchemyLoader,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "live"})
        while (await receive())["type"] != "websocket.disconnect":
            pass

    wrapped = SessionSyncMiddleware(app, loader=loader, paths=["/ws/sessions/{session_id}"])

    async with connect_websocket(wrapped, "/ws/sessions/s1", scope={"user": "alice"}) as ws:
        first = await ws.receive_json()
        second = await ws.receive_text()

    assert first == {
        "type": "session_update",
        "session_id": "s1",
        "owner": "alice",
        "version": 3,
        "session": {
            **S1_SESSION,
            "created_at": "2026-01-02T03:04:05",
        },
    }
    assert second == "live"


async def test_other_user_gets_no_frame_through_the_middleware(
    loader: SQLAlchemyLoader,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "live"})
        while (await receive())["type"] != "websocket.disconnect":
            pass

    wrapped = SessionSyncMiddleware(app, loader=loader, paths=["/ws/sessions/{session_id}"])

    async with connect_websocket(wrapped, "/ws/sessions/s1", scope={"user": "bob"}) as ws:
        assert await ws.receive_text() == "live"


# Without a database: the default user id, configuration errors, trio.


class StarletteLikeUser:
    is_authenticated = True
    identity = "alice"


class Anonymous:
    is_authenticated = False
    id = "anonymous"


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("alice", "alice"),
        (42, "42"),
        ({"id": 42}, "42"),
        (Account(id=7, username="alice"), "7"),
        (StarletteLikeUser(), "alice"),
        (Anonymous(), None),
        (None, None),
        (True, None),
        ("", None),
        ({"name": "alice"}, None),
        (object(), None),
    ],
    ids=repr,
)
def test_user_identity_for_owner_checks(user: Any, expected: str | None) -> None:
    assert user_identity(user) == expected


def test_column_values_of_an_unsaved_row() -> None:
    row = Comment(id=1, body="hi")

    assert column_values(row) == {"id": 1, "body": "hi"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"interactions": ChatSession.title}, "interactions must be a relationship"),
        ({"interactions": Ticket.comments}, "interactions must be a relationship of ChatSession"),
        ({"owner": ChatSession.interactions}, "owner must be a column attribute"),
        ({"version": Ticket.updated_at}, "version must be a column attribute of ChatSession"),
        ({"id_column": "id"}, "id_column must be a column attribute"),
    ],
)
def test_configuration_errors_name_the_argument(options: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {
        "interactions": ChatSession.interactions,
        "owner": ChatSession.owner_id,
        "version": ChatSession.version,
        **options,
    }
    with pytest.raises(ValueError, match=message):
        sqlalchemy_loader(async_sessionmaker(), ChatSession, **arguments)


def test_unmapped_model_is_refused() -> None:
    with pytest.raises(TypeError, match="model must be a mapped class"):
        sqlalchemy_loader(
            async_sessionmaker(),
            dict,
            interactions=ChatSession.interactions,
            owner=ChatSession.owner_id,
            version=ChatSession.version,
        )


def test_loader_refuses_to_run_on_trio() -> None:
    # The engine is never connected: the loader refuses before touching it.
    loader = chat_loader(async_sessionmaker(create_async_engine("sqlite+aiosqlite://")))

    with pytest.raises(RuntimeError, match="asyncio only"):
        trio.run(loader, context("s1"))
