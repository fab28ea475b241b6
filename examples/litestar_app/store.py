"""The session store: every change is one transaction that bumps the session's version."""

from __future__ import annotations

from types import TracebackType

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import selectinload

from .models import Base, ChatSession, Interaction, SessionView, session_view

__all__ = ["SessionStore"]


class SessionStore:
    """Chat sessions in a SQL database, through SQLAlchemy's asyncio extension.

    Use it as an async context manager for the app's lifespan: entering creates the tables,
    leaving closes the engine's connections.

    Every change takes the session row's lock first (``UPDATE ... SET version = version + 1``),
    so concurrent changes of one session are serialised and each gets its own version, and
    returns the session as committed, with that version: what to publish.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # expire_on_commit=False: views are built from rows after their transaction ends.
        self.sessionmaker = async_sessionmaker(engine, expire_on_commit=False)

    async def __aenter__(self) -> SessionStore:
        """Create the tables that do not exist yet."""
        async with self.engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the engine's connections."""
        await self.engine.dispose()

    async def create_session(self, owner: str, title: str) -> SessionView:
        """Create an empty session owned by ``owner``, at version 1."""
        async with self.sessionmaker.begin() as db:
            session = ChatSession(owner=owner, title=title, version=1, interactions=[])
            db.add(session)
            await db.flush()
            return session_view(session)

    async def get_session(self, session_id: str) -> SessionView | None:
        """The session with its interactions, or ``None`` if there is none."""
        async with self.sessionmaker() as db:
            return await self._load(db, session_id)

    async def owner_of(self, session_id: str) -> str | None:
        """The session's owner, or ``None`` if there is no such session."""
        async with self.sessionmaker() as db:
            owner: str | None = await db.scalar(
                select(ChatSession.owner).where(ChatSession.id == session_id)
            )
            return owner

    async def add_prompt(self, session_id: str, owner: str, prompt: str) -> SessionView | None:
        """Append an interaction with an empty response, unfinished.

        Returns ``None`` (and changes nothing) when the session does not exist or belongs to
        someone else.
        """
        async with self.sessionmaker.begin() as db:
            bumped = await db.scalar(
                update(ChatSession)
                .where(ChatSession.id == session_id, ChatSession.owner == owner)
                .values(version=ChatSession.version + 1)
                .returning(ChatSession.version)
            )
            if bumped is None:
                return None
            position = await db.scalar(
                select(func.count()).where(Interaction.session_id == session_id)
            )
            db.add(Interaction(session_id=session_id, position=position or 0, prompt=prompt))
            await db.flush()
            return await self._load(db, session_id)

    async def append_to_response(
        self, session_id: str, position: int, text: str, *, done: bool
    ) -> SessionView | None:
        """Append ``text`` to an interaction's response, and mark it done if ``done``.

        Returns ``None`` when the session is gone.
        """
        async with self.sessionmaker.begin() as db:
            bumped = await db.scalar(
                update(ChatSession)
                .where(ChatSession.id == session_id)
                .values(version=ChatSession.version + 1)
                .returning(ChatSession.version)
            )
            if bumped is None:
                return None
            await db.execute(
                update(Interaction)
                .where(Interaction.session_id == session_id, Interaction.position == position)
                .values(response=Interaction.response + text, done=done)
            )
            return await self._load(db, session_id)

    @staticmethod
    async def _load(db: AsyncSession, session_id: str) -> SessionView | None:
        session = await db.scalar(
            select(ChatSession)
            .where(ChatSession.id == session_id)
            .options(selectinload(ChatSession.interactions))
            .execution_options(populate_existing=True)
        )
        return None if session is None else session_view(session)
