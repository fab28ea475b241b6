"""The chat database of the snapshot-cost benchmark: schema, seed data and the two loaders.

Sessions of 10, 100 and 1,000 interactions in their own tables (``bench_chat_sessions``,
``bench_interactions``): in a temporary SQLite file, or in a PostgreSQL schema of their own
(``asgi_session_sync_bench_<random>``) that the benchmark creates and drops, so nothing else in
the database is read or written.

Two ways to load a snapshot, compared side by side:

- the library's: :func:`~asgi_session_sync.loaders.sqlalchemy.sqlalchemy_loader` (ORM, one
  statement with ``contains_eager``, the default serializer), behind the middleware;
- by hand (:class:`HandLoader`): the same one ``SELECT`` with a join, in SQLAlchemy Core, rows
  turned into the same dicts, the same ``SessionUpdate``; what an app without the library does.

Both produce byte-for-byte the same frame.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import DateTime, ForeignKey, Index, String, Text, bindparam, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from asgi_session_sync import Snapshot
from asgi_session_sync.events import SessionUpdate
from asgi_session_sync.loaders.sqlalchemy import SQLAlchemyLoader, sqlalchemy_loader

__all__ = [
    "SIZES",
    "ChatSession",
    "HandLoader",
    "Interaction",
    "database",
    "library_loader",
    "open_engine",
    "postgres_url",
    "session_id_for",
]

SIZES = (10, 100, 1000)
"""Interactions per session, one group of sessions for each."""

DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
OWNER = "alice"
# About 240 bytes per message, as in the mass-reconnect benchmark.
FILLER = "lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 4


class Base(DeclarativeBase):
    pass


class ChatSession(Base):
    __tablename__ = "bench_chat_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(64))
    title: Mapped[str] = mapped_column(String(200))
    version: Mapped[int]
    interactions: Mapped[list[Interaction]] = relationship(order_by="Interaction.position")


class Interaction(Base):
    __tablename__ = "bench_interactions"
    __table_args__ = (Index("ix_bench_interactions_session_position", "session_id", "position"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("bench_chat_sessions.id"))
    position: Mapped[int]
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def session_id_for(size: int, number: int) -> str:
    """The id of the ``number``-th seeded session of ``size`` interactions: ``n100-03``."""
    return f"n{size}-{number:02d}"


def postgres_url() -> str:
    """``DATABASE_URL`` when set (as the test suite reads it), else the local ``test`` database."""
    return os.environ.get("DATABASE_URL") or DEFAULT_POSTGRES_URL


def open_engine(url: str, *, schema: str | None, pool_size: int = 2) -> AsyncEngine:
    """An async engine whose tables live in ``schema`` (PostgreSQL) or the default (SQLite)."""
    options: dict[str, Any] = {}
    if schema is not None:
        options["execution_options"] = {"schema_translate_map": {None: schema}}
    return create_async_engine(url, pool_size=pool_size, max_overflow=0, **options)


@asynccontextmanager
async def database(url: str, *, sessions_per_size: int) -> AsyncIterator[str | None]:
    """Create the tables (in a new schema on PostgreSQL), seed them, drop them afterwards.

    Yields the schema name (``None`` on SQLite, whose file the caller owns). On PostgreSQL only
    the schema created here is ever dropped.
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
                await seed(conn, sessions_per_size)
            yield schema
        finally:
            if schema is not None:
                async with engine.begin() as conn:
                    await conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        await engine.dispose()


async def seed(conn: Any, sessions_per_size: int) -> None:
    """Insert ``sessions_per_size`` sessions of each of :data:`SIZES` interactions."""
    started = datetime(2025, 1, 1, tzinfo=timezone.utc)
    ids = [session_id_for(size, n) for size in SIZES for n in range(sessions_per_size)]
    await conn.execute(
        insert(ChatSession),
        [{"id": sid, "owner_id": OWNER, "title": f"Session {sid}", "version": 7} for sid in ids],
    )
    await conn.execute(
        insert(Interaction),
        [
            {
                "session_id": session_id_for(size, n),
                "position": position,
                "role": "user" if position % 2 == 0 else "assistant",
                "content": f"#{position}: {FILLER}",
                "created_at": started + timedelta(seconds=position),
            }
            for size in SIZES
            for n in range(sessions_per_size)
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
    """A snapshot loaded by hand: one Core ``SELECT``, rows into dicts, no ORM objects."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def load(self, session_id: str) -> Snapshot | None:
        """The session with its interactions, in the shape the library's loader returns."""
        async with self.engine.connect() as conn:
            result = await conn.execute(HAND_STATEMENT, {"session_id": session_id})
            rows = result.all()
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

    async def frame(self, session_id: str) -> str | None:
        """The snapshot frame's text, built with the library's own event model."""
        snapshot = await self.load(session_id)
        if snapshot is None:
            return None
        return SessionUpdate(
            session_id=session_id,
            owner=snapshot.owner,
            session=snapshot.session,
            version=snapshot.version,
        ).model_dump_json()
