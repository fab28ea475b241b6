"""The one database schema of the benchmarks: the chats of :mod:`benchmarks._sessions`, stored.

Two tables, ``bench_chat_sessions`` and ``bench_interactions``, in a temporary SQLite file
(:func:`sqlite_file`) or in a PostgreSQL schema of their own (``asgi_session_sync_bench_<random>``)
that is created and dropped here, so nothing else in the database is read or written.

Two ways to load a session: by hand (:class:`HandLoader`: one SQLAlchemy Core ``SELECT`` of the
session outer-joined with its interactions, rows turned into dicts, what an app without the
library does), and the library's :func:`~asgi_session_sync.loaders.sqlalchemy.sqlalchemy_loader`.
Both give the same session, so the same frame.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
from sqlalchemy import DateTime, ForeignKey, Index, String, Text, bindparam, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from asgi_session_sync import SessionContext, Snapshot
from asgi_session_sync.loaders.sqlalchemy import SQLAlchemyLoader, sqlalchemy_loader

from ._sessions import FILLER, session_id_for

__all__ = [
    "ChatSession",
    "HandLoader",
    "Interaction",
    "database",
    "library_loader",
    "open_engine",
    "postgres_url",
    "sqlite_file",
]

DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
OWNER = "alice"


class Base(DeclarativeBase):
    """The declarative base of the benchmark's tables."""


class ChatSession(Base):
    """A chat session: its owner, title and version, and its interactions in order."""

    __tablename__ = "bench_chat_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(64))
    title: Mapped[str] = mapped_column(String(200))
    version: Mapped[int]
    interactions: Mapped[list[Interaction]] = relationship(order_by="Interaction.position")


class Interaction(Base):
    """One message of a chat session."""

    __tablename__ = "bench_interactions"
    __table_args__ = (Index("ix_bench_interactions_session_position", "session_id", "position"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("bench_chat_sessions.id"))
    position: Mapped[int]
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def postgres_url() -> str:
    """``DATABASE_URL`` when set (as the test suite reads it), else the local ``test`` database."""
    return os.environ.get("DATABASE_URL") or DEFAULT_POSTGRES_URL


def open_engine(
    url: str, *, schema: str | None = None, pool_size: int = 2, pool_timeout: float = 30
) -> AsyncEngine:
    """An async engine with a fixed pool and no overflow; tables in ``schema`` (PostgreSQL)."""
    options: dict[str, Any] = {}
    if schema is not None:
        options["execution_options"] = {"schema_translate_map": {None: schema}}
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=0, pool_timeout=pool_timeout, **options
    )


@asynccontextmanager
async def database(url: str, sizes: Mapping[int, int]) -> AsyncIterator[str | None]:
    """Create the tables (in a new schema on PostgreSQL), seed them, drop them afterwards.

    ``sizes`` maps a number of interactions to how many sessions of that size to seed (ids from
    :func:`session_id_for`). Yields the schema name (``None`` on SQLite, whose file the caller
    owns). On PostgreSQL only the schema created here is ever dropped.
    """
    postgres = url.startswith("postgresql")
    schema = f"asgi_session_sync_bench_{secrets.token_hex(6)}" if postgres else None
    engine = open_engine(url, schema=schema)
    try:
        if schema is not None:
            async with engine.begin() as conn:
                await conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        try:
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.create_all)
                await seed(conn, sizes)
            yield schema
        finally:
            if schema is not None:
                async with engine.begin() as conn:
                    await conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        await engine.dispose()


@asynccontextmanager
async def sqlite_file(sizes: Mapping[int, int]) -> AsyncIterator[str]:
    """A temporary SQLite file seeded with ``sizes`` (see :func:`database`): its URL."""
    with tempfile.TemporaryDirectory(prefix="benchmarks-") as folder:
        url = f"sqlite+aiosqlite:///{folder}/chat.sqlite3"
        async with database(url, sizes):
            yield url


async def seed(conn: Any, sizes: Mapping[int, int]) -> None:
    """Insert ``count`` sessions of ``size`` interactions for each ``size: count``."""
    started = datetime(2025, 1, 1, tzinfo=timezone.utc)
    ids = [(size, session_id_for(size, n)) for size, count in sizes.items() for n in range(count)]
    await conn.execute(
        insert(ChatSession),
        [{"id": sid, "owner_id": OWNER, "title": f"Session {sid}", "version": 7} for _, sid in ids],
    )
    await conn.execute(
        insert(Interaction),
        [
            {
                "session_id": sid,
                "position": position,
                "role": "user" if position % 2 == 0 else "assistant",
                "content": f"#{position}: {FILLER}",
                "created_at": started + timedelta(seconds=position),
            }
            for size, sid in ids
            for position in range(size)
        ],
    )


def library_loader(engine: AsyncEngine) -> SQLAlchemyLoader:
    """The library's loader over the chat tables, with no owner check (there is no user)."""
    return sqlalchemy_loader(
        async_sessionmaker(engine),
        ChatSession,
        interactions=ChatSession.interactions,
        owner=ChatSession.owner_id,
        version=ChatSession.version,
        check_owner=False,
    )


_sessions = ChatSession.__table__.c
_interactions = Interaction.__table__.c
# The library's statement in Core: the session row outer-joined with its interactions, in order.
HAND_STATEMENT = (
    select(
        _sessions.id,
        _sessions.owner_id,
        _sessions.title,
        _sessions.version,
        _interactions.id,
        _interactions.session_id,
        _interactions.position,
        _interactions.role,
        _interactions.content,
        _interactions.created_at,
    )
    .select_from(
        ChatSession.__table__.outerjoin(
            Interaction.__table__, _interactions.session_id == _sessions.id
        )
    )
    .where(_sessions.id == bindparam("session_id"))
    .order_by(_interactions.position)
)


class HandLoader:
    """A session loaded by hand: one Core ``SELECT``, rows into dicts, no ORM objects.

    Also a middleware loader (call it with a ``SessionContext``). ``latency`` seconds are slept
    while holding the pooled connection, as a query to a database across the network holds its
    connection for the round trip. ``calls`` counts loads, independently of the middleware.
    """

    def __init__(self, engine: AsyncEngine, *, latency: float = 0.0) -> None:
        self.engine = engine
        self.latency = latency
        self.calls = 0

    async def __call__(self, ctx: SessionContext) -> Snapshot | None:
        """The middleware's loader."""
        return await self.load(ctx.session_id)

    async def load(self, session_id: str) -> Snapshot | None:
        """The session with its interactions, in the shape the library's loader returns."""
        self.calls += 1
        async with self.engine.connect() as conn:
            if self.latency:
                await anyio.sleep(self.latency)
            rows = (await conn.execute(HAND_STATEMENT, {"session_id": session_id})).all()
        if not rows:
            return None
        sid, owner, title, version = rows[0][:4]
        session = {
            "id": sid,
            "owner_id": owner,
            "title": title,
            "version": version,
            "interactions": [
                {
                    "id": row[4],
                    "session_id": row[5],
                    "position": row[6],
                    "role": row[7],
                    "content": row[8],
                    "created_at": row[9],
                }
                for row in rows
                if row[4] is not None
            ],
        }
        return Snapshot(session, owner=owner, version=version)

    async def warm_up(self, connections: int) -> None:
        """Open ``connections`` pooled connections at once, so no round starts with a cold pool."""
        opened, ready, release = [0], anyio.Event(), anyio.Event()

        async def hold() -> None:
            async with self.engine.connect():
                opened[0] += 1
                if opened[0] == connections:
                    ready.set()
                await release.wait()

        async with anyio.create_task_group() as tg:
            for _ in range(connections):
                tg.start_soon(hold)
            await ready.wait()
            release.set()
