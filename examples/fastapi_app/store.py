"""Reads and writes of chat sessions; every change bumps the session's version."""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import selectinload

from .models import ChatSession, Interaction
from .schemas import SessionView


class ChatStore:
    """The session store: each method is one transaction.

    Every change starts by bumping the session's version with one ``UPDATE``. That statement
    takes the row's write lock first (PostgreSQL locks the row, SQLite the database), so
    concurrent changes to one session queue up, and each commits exactly one new version
    together with the state it describes.
    """

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._sessionmaker = sessionmaker

    async def create_session(self, owner: str, title: str) -> SessionView:
        """Create an empty session owned by ``owner``, at version 1."""
        async with self._sessionmaker.begin() as db:
            chat = ChatSession(owner=owner, title=title, version=1, interactions=[])
            db.add(chat)
            await db.flush()
            return SessionView.model_validate(chat)

    async def get_session(self, session_id: str, owner: str) -> SessionView | None:
        """Return the session if ``owner`` owns it, else ``None`` (whether or not it exists)."""
        async with self._sessionmaker() as db:
            return await _view(db, session_id, owner)

    async def is_owner(self, session_id: str, user: str) -> bool:
        """Whether ``user`` owns the session; ``False`` when there is no such session."""
        async with self._sessionmaker() as db:
            owner = await db.scalar(select(ChatSession.owner).where(ChatSession.id == session_id))
        return owner is not None and owner == user

    async def add_prompt(
        self, session_id: str, owner: str, prompt: str
    ) -> tuple[SessionView, int] | None:
        """Append an interaction with ``prompt`` and an empty response.

        Returns the new state and the interaction's id, or ``None`` when ``owner`` owns no
        such session.
        """
        async with self._sessionmaker.begin() as db:
            if not await _bump_version(db, session_id, owner):
                return None
            position = await db.scalar(
                select(func.coalesce(func.max(Interaction.position) + 1, 0)).where(
                    Interaction.session_id == session_id
                )
            )
            interaction = Interaction(session_id=session_id, position=position, prompt=prompt)
            db.add(interaction)
            await db.flush()
            view = await _view(db, session_id)
            assert view is not None  # the row is locked: it cannot have gone
            return view, interaction.id

    async def append_to_response(
        self, session_id: str, interaction_id: int, text: str, *, done: bool
    ) -> SessionView | None:
        """Append ``text`` to an interaction's response; mark it ``done`` if it is the last.

        Returns the new state, or ``None`` when the session is gone.
        """
        async with self._sessionmaker.begin() as db:
            if not await _bump_version(db, session_id):
                return None
            await db.execute(
                update(Interaction)
                .where(Interaction.id == interaction_id, Interaction.session_id == session_id)
                .values(response=Interaction.response + text, done=done)
                .execution_options(synchronize_session=False)
            )
            return await _view(db, session_id)


async def _bump_version(db: AsyncSession, session_id: str, owner: str | None = None) -> bool:
    """Add one to the session's version, locking it until commit; ``False`` if no such row."""
    statement = (
        update(ChatSession)
        .where(ChatSession.id == session_id)
        .values(version=ChatSession.version + 1)
        .returning(ChatSession.version)
        .execution_options(synchronize_session=False)
    )
    if owner is not None:
        statement = statement.where(ChatSession.owner == owner)
    return await db.scalar(statement) is not None


async def _view(db: AsyncSession, session_id: str, owner: str | None = None) -> SessionView | None:
    statement = (
        select(ChatSession)
        .where(ChatSession.id == session_id)
        .options(selectinload(ChatSession.interactions))
        # This transaction may have changed the row already: read it, not the identity map.
        .execution_options(populate_existing=True)
    )
    if owner is not None:
        statement = statement.where(ChatSession.owner == owner)
    chat = await db.scalar(statement)
    return None if chat is None else SessionView.model_validate(chat)
