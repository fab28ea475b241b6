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
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
from sqlalchemy import DateTime, ForeignKey, Index, String, Text, bindparam, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from asgi_session_sync import SessionContext, Snapshot
from asgi_session_sync.loaders.sqlalchemy import SQLAlchemyLoader, sqlalchemy_loader

from ._sessions import FILLER, SNAPSHOT_VERSION, session_id_for

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
    """Create the tables (in a new schema on PostgreSQL), seed ``sizes`` (interactions: how
    many sessions of that size, ids from :func:`session_id_for`), drop them afterwards. Yields
    the schema (``None`` on SQLite); on PostgreSQL only the schema made here is ever dropped."""
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
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    ids = [(size, session_id_for(size, n)) for size, count in sizes.items() for n in range(count)]
    rows = [{"id": sid, "owner_id": OWNER, "title": f"Session {sid}"} for _, sid in ids]
    await conn.execute(insert(ChatSession), [row | {"version": SNAPSHOT_VERSION} for row in rows])
    await conn.execute(
        insert(Interaction),
        [
            {
                "session_id": sid,
                "position": n,
                "role": "user" if n % 2 == 0 else "assistant",
                "content": f"#{n}: {FILLER}",
                "created_at": start + timedelta(seconds=n),
            }
            for size, sid in ids
            for n in range(size)
        ],
    )


_interactions = Interaction.__table__.c
INTERACTION = ("id", "session_id", "position", "role", "content", "created_at")
# The session row outer-joined with its interactions, in order, as the library's loader reads it.
HAND_STATEMENT = (
    select(ChatSession.__table__, *(_interactions[name] for name in INTERACTION))
    .outerjoin_from(ChatSession.__table__, Interaction.__table__)
    .where(ChatSession.__table__.c.id == bindparam("session_id"))
    .order_by(_interactions.position)
)
OWNED = HAND_STATEMENT.where(ChatSession.__table__.c.owner_id == bindparam("owner"))


def library_loader(engine: AsyncEngine, *, sessionmaker: bool = False) -> SQLAlchemyLoader:
    """The library's loader over the chat tables at its defaults (the owner checked), on the
    engine or, with ``sessionmaker``, on a session per load (its only form before)."""
    source = async_sessionmaker(engine) if sessionmaker else engine
    owner, version = ChatSession.owner_id, ChatSession.version
    return sqlalchemy_loader(
        source, ChatSession, interactions=ChatSession.interactions, owner=owner, version=version
    )


class HandLoader:
    """A session loaded by hand: one Core ``SELECT``, rows into dicts, no ORM objects; also a
    middleware loader. It sleeps ``latency`` seconds holding its pooled connection, as a query
    across a network holds it for the round trip; ``calls`` counts its loads."""

    def __init__(self, engine: AsyncEngine, *, latency: float = 0.0) -> None:
        self.engine = engine
        self.latency = latency
        self.calls = 0

    async def __call__(self, ctx: SessionContext) -> Snapshot | None:
        """The middleware's loader."""
        return await self.load(ctx.session_id)

    async def load(self, session_id: str, owner: str | None = None) -> Snapshot | None:
        """The session with its interactions, in the shape the library's loader returns; with
        ``owner``, only if that user owns it (checked in the ``WHERE``)."""
        self.calls += 1
        statement = HAND_STATEMENT if owner is None else OWNED
        async with self.engine.connect() as conn:
            if self.latency:
                await anyio.sleep(self.latency)
            found = await conn.execute(statement, {"session_id": session_id, "owner": owner})
            rows = found.all()
        if not rows:
            return None
        sid, owner, title, version = rows[0][:4]
        interactions = [
            dict(zip(INTERACTION, row[4:], strict=True)) for row in rows if row[4] is not None
        ]
        session = {"id": sid, "owner_id": owner, "title": title, "version": version}
        return Snapshot(session | {"interactions": interactions}, owner=owner, version=version)

    async def warm_up(self, connections: int) -> None:
        """Open ``connections`` pooled connections at once, so no round starts with a cold pool."""
        async with AsyncExitStack() as stack:
            for _ in range(connections):
                await stack.enter_async_context(self.engine.connect())
