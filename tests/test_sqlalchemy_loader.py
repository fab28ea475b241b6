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
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio
from pydantic import BaseModel
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    Uuid,
    event,
    func,
    select,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column, relationship

from asgi_session_sync import SessionContext, SessionSyncMiddleware, Snapshot
from asgi_session_sync._types import Receive, Scope, Send
from asgi_session_sync.loaders.sqlalchemy import (
    SQLAlchemyLoader,
    column_values,
    sqlalchemy_loader,
    timestamp_version,
)
from asgi_session_sync.protocol import MAX_VERSION
from asgi_session_sync.snapshot import user_identity
from asgi_session_sync.testing import connect_websocket

pytestmark = pytest.mark.anyio

DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
CREATED_AT = datetime(2026, 1, 2, 3, 4, 5)
TICKET_UPDATED_AT = datetime(2026, 5, 6, 7, 8, 9, 123456)
# Microseconds from 1970-01-01T00:00:00Z to TICKET_UPDATED_AT (as UTC): 1778051289 s (GNU date
# -u -d 2026-05-06T07:08:09Z +%s) and 123456 us. Written out, not computed like the loader does.
TICKET_VERSION = 1_778_051_289_123_456
# One microsecond before the epoch, and the last timestamp that is a version (2**53 - 1 us).
BEFORE_1970 = datetime(1969, 12, 31, 23, 59, 59, 999999)
LAST_TIMESTAMP = datetime(2255, 6, 5, 23, 47, 34, 740991)
NOTE_ID = uuid.UUID("7d1f0c2a-3b4e-4f5a-9c8d-0e1f2a3b4c5d")


@pytest.fixture
def anyio_backend() -> str:
    # SQLAlchemy's asyncio extension and its drivers (aiosqlite, asyncpg) run on asyncio only.
    return "asyncio"


class Base(DeclarativeBase):
    pass


# How many non-NULL responses the driver handed back, across loads: the interactions a load read.
responses_read: list[str] = []


class CountedText(TypeDecorator[str]):
    """Text that counts every value read back (into ``responses_read``)."""

    impl = Text
    cache_ok = True

    def process_result_value(self, value: str | None, dialect: Any) -> str | None:
        if value is not None:
            responses_read.append(value)
        return value


class ChatSession(Base):
    __tablename__ = "chat_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(64))
    # 64-bit, so a row can hold a number beyond the largest version (2**53 - 1).
    version: Mapped[int] = mapped_column(BigInteger)
    title: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime())
    interactions: Mapped[list[Interaction]] = relationship(order_by="Interaction.position")


class Interaction(Base):
    __tablename__ = "interactions"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("chat_sessions.id"))
    position: Mapped[int]
    prompt: Mapped[str] = mapped_column(Text)
    response: Mapped[str] = mapped_column(CountedText)


class Ticket(Base):
    """An integer key, timestamp versions, and a relationship without ``order_by``.

    ``updated_at`` comes back naive on both databases; ``updated_at_utc`` comes back aware
    (UTC) from PostgreSQL's ``timestamptz`` and naive from SQLite, which keeps no offset.
    """

    __tablename__ = "tickets"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(DateTime())
    updated_at_utc: Mapped[datetime] = mapped_column(DateTime(timezone=True))
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


class Board(Base):
    """An integer owner column, and cards with a deferred column."""

    __tablename__ = "boards"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int]
    version: Mapped[int]
    cards: Mapped[list[Card]] = relationship(order_by="Card.id")


class Card(Base):
    __tablename__ = "cards"

    id: Mapped[int] = mapped_column(primary_key=True)
    board_id: Mapped[int] = mapped_column(ForeignKey("boards.id"))
    text: Mapped[str] = mapped_column(Text)
    secret: Mapped[str] = mapped_column(Text, deferred=True)


class Poll(Base):
    """A ``column_property`` expression: a mapping only the ORM reads."""

    __tablename__ = "polls"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    version: Mapped[int]
    question: Mapped[str] = mapped_column(Text)
    question_length: Mapped[int] = column_property(func.length(question))
    choices: Mapped[list[Choice]] = relationship(order_by="Choice.id")


class Choice(Base):
    __tablename__ = "choices"

    id: Mapped[int] = mapped_column(primary_key=True)
    poll_id: Mapped[str] = mapped_column(ForeignKey("polls.id"))
    label: Mapped[str] = mapped_column(Text)


playlist_songs = Table(
    "playlist_songs",
    Base.metadata,
    Column("playlist_id", ForeignKey("playlists.id"), primary_key=True),
    Column("song_id", ForeignKey("songs.id"), primary_key=True),
)


class Playlist(Base):
    """A many-to-many relationship."""

    __tablename__ = "playlists"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    version: Mapped[int]
    songs: Mapped[list[Song]] = relationship(secondary=playlist_songs, order_by="Song.title")


class Song(Base):
    __tablename__ = "songs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(Text)


def seed(sqlite: bool) -> list[Base]:
    # Interaction ids run against positions, and comment ids are inserted out of order, so
    # an ordering bug shows whichever order the database happens to return rows in.
    rows = [
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
        # Numbers that are not versions: below 0, above 2**53 - 1.
        ChatSession(id="s3", owner_id="alice", version=-1, title="Neg", created_at=CREATED_AT),
        ChatSession(
            id="s4", owner_id="alice", version=MAX_VERSION + 1, title="Big", created_at=CREATED_AT
        ),
        Ticket(
            id=1,
            owner="alice",
            updated_at=TICKET_UPDATED_AT,
            updated_at_utc=TICKET_UPDATED_AT.replace(tzinfo=timezone.utc),
            comments=[Comment(id=3, body="third"), Comment(id=1, body="first")],
        ),
        Comment(id=2, ticket_id=1, body="second"),
        Ticket(
            id=2,
            owner="alice",
            updated_at=BEFORE_1970,
            updated_at_utc=BEFORE_1970.replace(tzinfo=timezone.utc),
        ),
        Ticket(
            id=3,
            owner="alice",
            updated_at=LAST_TIMESTAMP,
            updated_at_utc=LAST_TIMESTAMP.replace(tzinfo=timezone.utc),
        ),
        Note(id=NOTE_ID, owner="alice", version=7, lines=[NoteLine(id=1, text="remember")]),
        Board(
            id=1,
            owner_id=7,
            version=2,
            cards=[Card(id=2, text="two", secret="s2"), Card(id=1, text="one", secret="s1")],
        ),
        Poll(
            id="p1",
            owner="alice",
            version=4,
            question="Lunch?",
            choices=[Choice(id=1, label="yes"), Choice(id=2, label="no")],
        ),
        Playlist(
            id="l1",
            owner="alice",
            version=9,
            songs=[Song(id=1, title="b side"), Song(id=2, title="a side")],
        ),
        Playlist(id="l2", owner="alice", version=1),
    ]
    if sqlite:  # beyond 32 bits: SQLite keeps it in an Integer column all the same
        rows.append(Board(id=2, owner_id=5_000_000_000, version=1))
    return rows


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
            session.add_all(seed(engine.dialect.name == "sqlite"))
        yield engine


@pytest.fixture
def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine)


@pytest.fixture
def loader(sessionmaker: async_sessionmaker[AsyncSession]) -> SQLAlchemyLoader:
    return chat_loader(sessionmaker)


def chat_loader(
    sessionmaker: async_sessionmaker[AsyncSession],
    version: Any = ChatSession.version,
    **options: Any,
) -> SQLAlchemyLoader:
    return sqlalchemy_loader(
        sessionmaker,
        ChatSession,
        interactions=ChatSession.interactions,
        owner=ChatSession.owner_id,
        version=version,
        **options,
    )


def ticket_loader(
    sessionmaker: async_sessionmaker[AsyncSession], version: Any = Ticket.updated_at
) -> SQLAlchemyLoader:
    return sqlalchemy_loader(
        sessionmaker,
        Ticket,
        interactions=Ticket.comments,
        owner=Ticket.owner,
        version=version,
    )


def loader_over(sessionmaker: async_sessionmaker[AsyncSession], version: Any) -> SQLAlchemyLoader:
    """A loader whose version is ``version``, a column of ChatSession or Ticket."""
    if version.class_ is Ticket:
        return ticket_loader(sessionmaker, version)
    return chat_loader(sessionmaker, version)


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


def logged(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "asgi_session_sync" and record.levelno == level
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

    [warning] = logged(caplog)
    assert "owner does not match" in warning
    assert "session_id=s1" in warning
    assert "path='/ws/s1'" in warning
    assert "mallory" not in caplog.text


async def test_no_user_gives_nothing(
    loader: SQLAlchemyLoader, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_session_sync")

    assert await loader(context("s1", user=None)) is None

    [warning] = logged(caplog)
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
    assert not logged(caplog)


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
    # The timestamp is sent as microseconds since the Unix epoch; the row's own column as is.
    assert snapshot.version == TICKET_VERSION
    assert snapshot.session["updated_at"] == TICKET_UPDATED_AT  # type: ignore[index]
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
    assert await ticket_loader(sessionmaker).version_loader(context("1")) == TICKET_VERSION


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

    [warning] = logged(caplog)
    assert "owner does not match" in warning
    assert "session_id=s1" in warning


# Ticket 3's version is where a float timestamp would round up to 2**53, which is no version.
@pytest.mark.parametrize(("ticket", "expected"), [(1, TICKET_VERSION), (3, MAX_VERSION)])
async def test_naive_and_aware_timestamps_of_one_instant_give_one_version(
    engine: AsyncEngine,
    sessionmaker: async_sessionmaker[AsyncSession],
    ticket: int,
    expected: int,
) -> None:
    async with sessionmaker() as session:
        naive, aware = (
            await session.execute(
                select(Ticket.updated_at, Ticket.updated_at_utc).where(Ticket.id == ticket)
            )
        ).one()
    # What the loader is given: PostgreSQL's timestamptz comes back aware, SQLite's naive.
    assert naive.utcoffset() is None
    assert (aware.utcoffset() is not None) == (engine.dialect.name == "postgresql")

    for column in (Ticket.updated_at, Ticket.updated_at_utc):
        loader = ticket_loader(sessionmaker, column)
        snapshot = await loader(context(str(ticket)))

        assert snapshot is not None
        assert snapshot.version == expected, column
        assert await loader.version_loader(context(str(ticket))) == expected, column


@pytest.mark.parametrize(
    ("version", "session_id"),
    [
        (ChatSession.version, "s1"),
        (Ticket.updated_at, "1"),
        (Ticket.updated_at_utc, "1"),
        (Ticket.updated_at, "2"),
        (ChatSession.version, "s4"),
    ],
    ids=["int", "naive", "aware", "before-1970", "beyond-2**53"],
)
async def test_version_loader_agrees_with_the_full_load(
    sessionmaker: async_sessionmaker[AsyncSession], version: Any, session_id: str
) -> None:
    loader = loader_over(sessionmaker, version)

    snapshot = await loader(context(session_id))

    assert snapshot is not None
    assert await loader.version_loader(context(session_id)) == snapshot.version


@pytest.mark.parametrize(
    ("version", "session_id", "shown"),
    [
        (Ticket.updated_at, "2", "1969-12-31T23:59:59.999999"),
        (Ticket.updated_at_utc, "2", "1969-12-31T23:59:59.999999"),
        (ChatSession.version, "s3", "holds -1,"),
        (ChatSession.version, "s4", f"holds {MAX_VERSION + 1},"),
        (ChatSession.title, "s1", "holds a str,"),
    ],
    ids=["naive-before-1970", "aware-before-1970", "negative", "beyond-2**53", "str"],
)
async def test_value_that_is_not_a_version_gives_a_snapshot_without_one_and_an_error(
    sessionmaker: async_sessionmaker[AsyncSession],
    caplog: pytest.LogCaptureFixture,
    version: Any,
    session_id: str,
    shown: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger="asgi_session_sync")
    loader = loader_over(sessionmaker, version)

    snapshot = await loader(context(session_id))
    current = await loader.version_loader(context(session_id))

    assert snapshot is not None
    assert (snapshot.owner, snapshot.version) == ("alice", None)
    assert current is None
    errors = logged(caplog, logging.ERROR)
    assert len(errors) == 2, errors  # one for the snapshot, one for the version load
    for error in errors:
        assert shown in error
        assert "not a version" in error
        assert f"column={version.class_.__name__}.{version.key} session_id={session_id}" in error


async def test_resume_with_a_timestamp_version(
    engine: AsyncEngine, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass

    loader = ticket_loader(sessionmaker)
    wrapped = SessionSyncMiddleware(
        app,
        loader=loader,
        version_loader=loader.version_loader,
        send_synced=True,
        paths=["/ws/tickets/{session_id}"],
    )
    user = {"user": "alice"}

    with sql_statements(engine) as statements:
        async with connect_websocket(
            wrapped, f"/ws/tickets/1?since={TICKET_VERSION}", scope=user
        ) as ws:
            synced = await ws.receive_json()
    async with connect_websocket(
        wrapped, f"/ws/tickets/1?since={TICKET_VERSION - 1}", scope=user
    ) as ws:
        update = await ws.receive_json()

    # Current: the version query alone, and session_synced instead of a snapshot.
    assert synced == {"type": "session_synced", "session_id": "1", "version": TICKET_VERSION}
    [statement] = statements
    assert "JOIN" not in statement
    # One microsecond behind: the snapshot, with the version as microseconds.
    assert update["type"] == "session_update"
    assert update["version"] == TICKET_VERSION
    assert update["session"]["updated_at"] == "2026-05-06T07:08:09.123456"


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


def as_mapped_objects(key: str) -> Any:
    """A ``serialize`` giving what the default does, from mapped objects (the ORM's path)."""

    def serialize(row: Any) -> dict[str, Any]:
        return {**column_values(row), key: [column_values(item) for item in getattr(row, key)]}

    return serialize


@pytest.mark.parametrize(
    ("model", "relationship", "owner", "session_id"),
    [
        (ChatSession, "interactions", "owner_id", "s1"),
        (Ticket, "comments", "owner", "1"),
        (Note, "lines", "owner", str(NOTE_ID)),
        (Board, "cards", "owner_id", "1"),
        (Playlist, "songs", "owner", "l1"),
        (Playlist, "songs", "owner", "l2"),
    ],
    ids=["chat", "ticket", "uuid-key", "deferred-column", "many-to-many", "empty-many-to-many"],
)
async def test_rows_and_mapped_objects_give_the_same_snapshot(
    engine: AsyncEngine,
    sessionmaker: async_sessionmaker[AsyncSession],
    model: Any,
    relationship: str,
    owner: str,
    session_id: str,
) -> None:
    attributes = {
        "interactions": getattr(model, relationship),
        "owner": getattr(model, owner),
        "version": getattr(model, "updated_at" if model is Ticket else "version"),
    }
    user = "7" if model is Board else "alice"
    by_rows = sqlalchemy_loader(engine, model, **attributes)
    by_objects = sqlalchemy_loader(
        sessionmaker, model, **attributes, serialize=as_mapped_objects(relationship)
    )

    snapshot = await by_rows(context(session_id, user=user))

    assert snapshot is not None
    assert snapshot == await by_objects(context(session_id, user=user))
    assert snapshot == await sqlalchemy_loader(sessionmaker, model, **attributes)(
        context(session_id, user=user)
    )


async def test_deferred_columns_are_left_out_and_many_to_many_is_ordered(
    engine: AsyncEngine,
) -> None:
    board = sqlalchemy_loader(
        engine, Board, interactions=Board.cards, owner=Board.owner_id, version=Board.version
    )
    playlist = sqlalchemy_loader(
        engine,
        Playlist,
        interactions=Playlist.songs,
        owner=Playlist.owner,
        version=Playlist.version,
    )

    cards = await board(context("1", user=7))
    songs = await playlist(context("l1"))
    empty = await playlist(context("l2"))

    assert cards == Snapshot(
        {
            "id": 1,
            "owner_id": 7,
            "version": 2,
            "cards": [
                {"id": 1, "board_id": 1, "text": "one"},
                {"id": 2, "board_id": 1, "text": "two"},
            ],
        },
        owner="7",
        version=2,
    )
    assert songs is not None
    assert songs.session["songs"] == [  # type: ignore[index]
        {"id": 2, "title": "a side"},
        {"id": 1, "title": "b side"},
    ]
    assert empty is not None
    assert empty.session["songs"] == []  # type: ignore[index]


async def test_a_mapping_only_the_orm_reads_is_loaded_as_objects(engine: AsyncEngine) -> None:
    loader = sqlalchemy_loader(
        engine, Poll, interactions=Poll.choices, owner=Poll.owner, version=Poll.version
    )

    snapshot = await loader(context("p1"))

    assert snapshot == Snapshot(
        {
            "id": "p1",
            "owner": "alice",
            "version": 4,
            "question": "Lunch?",
            "question_length": 6,
            "choices": [
                {"id": 1, "poll_id": "p1", "label": "yes"},
                {"id": 2, "poll_id": "p1", "label": "no"},
            ],
        },
        owner="alice",
        version=4,
    )
    assert await loader(context("p1", user="mallory")) is None


@pytest.mark.parametrize("path", ["rows", "objects"])
async def test_another_users_session_reads_no_interaction(
    engine: AsyncEngine,
    sessionmaker: async_sessionmaker[AsyncSession],
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_session_sync")
    serialized: list[ChatSession] = []

    def serialize(row: ChatSession) -> dict[str, Any]:
        serialized.append(row)
        return {}

    loader = (
        chat_loader(sessionmaker)
        if path == "rows"
        else chat_loader(sessionmaker, serialize=serialize)
    )
    responses_read.clear()

    with sql_statements(engine) as statements:
        assert await loader(context("s1", user="mallory")) is None

    assert len(statements) == 1
    assert responses_read == []
    assert serialized == []
    [warning] = logged(caplog)
    assert "owner does not match" in warning
    # The owner's load reads them all.
    assert await loader(context("s1")) is not None
    assert sorted(responses_read) == ["Gulbenkian", "Ramiro", "hi"]


@pytest.mark.parametrize(
    ("user", "session_id", "loads"),
    [
        ("7", "1", True),
        (7, "1", True),
        ("07", "1", False),  # the same number, not the same string
        ("8", "1", False),
        ("5000000000", "2", True),  # beyond 32 bits, in an Integer column (SQLite only)
    ],
)
async def test_integer_owner_column(
    engine: AsyncEngine, user: Any, session_id: str, loads: bool
) -> None:
    if session_id == "2" and engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL's integer holds 32 bits")
    loader = sqlalchemy_loader(
        engine, Board, interactions=Board.cards, owner=Board.owner_id, version=Board.version
    )

    snapshot = await loader(context(session_id, user=user))

    assert (snapshot is not None) == loads
    assert (await loader.version_loader(context(session_id, user=user)) is not None) == loads


async def test_user_id_that_cannot_be_an_owner_gives_nothing_without_a_query(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_session_sync")
    loader = sqlalchemy_loader(
        engine, Board, interactions=Board.cards, owner=Board.owner_id, version=Board.version
    )

    with sql_statements(engine) as statements:
        assert await loader(context("1", user="alice")) is None
        assert await loader(context("1", user=str(2**63))) is None

    assert statements == []
    assert all("cannot be a value of the owner column" in line for line in logged(caplog))
    assert "alice" not in caplog.text


async def test_no_user_is_refused_without_a_query(
    engine: AsyncEngine, loader: SQLAlchemyLoader
) -> None:
    with sql_statements(engine) as statements:
        assert await loader(context("s1", user=None)) is None
        assert await loader.version_loader(context("s1", user=None)) is None

    assert statements == []


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


@pytest.mark.parametrize(
    "at",
    [
        TICKET_UPDATED_AT,
        TICKET_UPDATED_AT.replace(tzinfo=timezone.utc),
        datetime(2026, 5, 6, 9, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2))),
        datetime(2026, 5, 6, 1, 38, 9, 123456, tzinfo=timezone(-timedelta(hours=5, minutes=30))),
    ],
    ids=str,
)
def test_timestamp_version_is_the_instant_naive_as_utc(at: datetime) -> None:
    assert timestamp_version(at) == TICKET_VERSION


def test_timestamp_version_is_exact_from_1970_to_2255() -> None:
    last = LAST_TIMESTAMP

    assert timestamp_version(datetime(1970, 1, 1)) == 0
    # A float timestamp rounds this one up to 2**53, which is not a version.
    assert timestamp_version(last) == MAX_VERSION
    assert timestamp_version(last - timedelta(microseconds=1)) == MAX_VERSION - 1
    for beyond in (BEFORE_1970, last + timedelta(microseconds=1)):
        with pytest.raises(ValueError, match="from 1970 to 2255-06-05T23:47:34"):
            timestamp_version(beyond)


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


def test_sessionmaker_must_be_an_engine_or_callable() -> None:
    with pytest.raises(TypeError, match="an AsyncEngine or an async_sessionmaker"):
        sqlalchemy_loader(
            42,  # type: ignore[arg-type]
            ChatSession,
            interactions=ChatSession.interactions,
            owner=ChatSession.owner_id,
            version=ChatSession.version,
        )


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
