"""The chat's store: every change is one transaction that bumps the session's version first.

That ``UPDATE chat_sessions SET version = version + 1`` takes the session row's write lock
(PostgreSQL locks the row, SQLite the database), so concurrent changes of one session queue
up and each commits exactly one new version with the state it describes. Every writer takes
the session's lock before an interaction's, so no two writers deadlock.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import ParamSpec, TypeVar

import anyio
from sqlalchemy import ColumnElement, case, func, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import selectinload

from .models import Base, ChatSession, Interaction, SessionView, is_session_id, session_view

__all__ = ["ChatStore", "Claim", "Interruption", "TokenCommit"]

_CREATE_ATTEMPTS = 3
# Seconds closing the engine's connections may take.
_DISPOSE_TIMEOUT = 5.0

NO_WORKER = "no worker took the prompt in time"
WORKER_LOST = "the worker streaming it stopped: its lease expired"


@dataclass(frozen=True)
class Claim:
    """An interaction a worker has claimed, and streams under its lease."""

    interaction_id: int
    session_id: str
    owner: str
    position: int
    worker: str


@dataclass(frozen=True)
class TokenCommit:
    """What one committed token changed: the session's new ``version`` and the response."""

    version: int
    response: str
    done: bool


@dataclass(frozen=True)
class Interruption:
    """An interaction marked interrupted because its lease expired."""

    session_id: str
    owner: str
    position: int
    version: int
    reason: str


_T = TypeVar("_T")
_P = ParamSpec("_P")


def _runs_to_the_end(method: Callable[_P, Awaitable[_T]]) -> Callable[_P, Awaitable[_T]]:
    """Shield a store method's transaction from cancellation; it ends promptly anyway.

    An asyncio driver's connection cancelled mid-statement is dropped by SQLAlchemy's pool
    without being closed (aiosqlite then warns, PostgreSQL sees a broken connection). The
    worker and the sweeper are stopped by cancellation at any moment, so each short
    transaction finishes first, and the cancellation lands at the caller's next await.
    """

    @functools.wraps(method)
    async def shielded(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        with anyio.CancelScope(shield=True):
            result = await method(*args, **kwargs)
        # Returned after the block: a cancel scope may swallow, so mypy needs a return here.
        return result  # noqa: RET504

    return shielded


class _Unchanged(Exception):
    """A conditional update matched no row: roll back the version bump."""


class ChatStore:
    """Chat sessions in a SQL database, through SQLAlchemy's asyncio extension.

    Use it as an async context manager for a process's lifetime: entering creates the tables
    that do not exist yet, leaving closes the engine's connections.

    Args:
        engine: An engine with an asyncio driver (aiosqlite, asyncpg).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # expire_on_commit=False: views are built from rows after their transaction ends.
        self.sessionmaker = async_sessionmaker(engine, expire_on_commit=False)

    async def __aenter__(self) -> ChatStore:
        """Create the tables that do not exist yet."""
        # The API and the worker start together, and create_all's check-then-create is not
        # atomic: when the other process wins the race, the next pass finds its tables.
        # Shielded, as every transaction here is (see _runs_to_the_end): a process stopped
        # while it starts must not drop a connection mid-statement.
        with anyio.CancelScope(shield=True):
            for attempt in range(_CREATE_ATTEMPTS):
                try:
                    async with self.engine.begin() as connection:
                        await connection.run_sync(Base.metadata.create_all)
                except DBAPIError:
                    if attempt == _CREATE_ATTEMPTS - 1:
                        raise
                else:
                    break
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the engine's connections."""
        # Shielded (and bounded): a worker is stopped by cancellation, and its connections
        # must still be closed, or aiosqlite's threads are left behind.
        with anyio.CancelScope(shield=True), anyio.move_on_after(_DISPOSE_TIMEOUT):
            await self.engine.dispose()

    # The API's reads and writes.

    @_runs_to_the_end
    async def create_session(self, owner: str, title: str) -> SessionView:
        """Create an empty session owned by ``owner``, at version 1."""
        async with self.sessionmaker.begin() as db:
            session = ChatSession(owner=owner, title=title, version=1, interactions=[])
            db.add(session)
            await db.flush()
            return session_view(session)

    @_runs_to_the_end
    async def get_session(self, session_id: str, owner: str) -> SessionView | None:
        """The session if ``owner`` owns it, else ``None``, whether or not it exists.

        The owner is part of the query, so another user's session is never loaded: asking for
        it costs what asking for a missing one does, and its size cannot be timed. A malformed
        id never reaches the database.
        """
        if not is_session_id(session_id):
            return None
        async with self.sessionmaker() as db:
            return await _load(db, session_id, owner)

    @_runs_to_the_end
    async def is_owner(self, session_id: str, user: str) -> bool:
        """Whether ``user`` owns the session; ``False`` for a missing session or malformed id."""
        if not is_session_id(session_id):
            return False
        async with self.sessionmaker() as db:
            owner = await db.scalar(select(ChatSession.owner).where(ChatSession.id == session_id))
        return owner is not None and owner == user

    @_runs_to_the_end
    async def add_prompt(
        self, session_id: str, owner: str, prompt: str, *, claim_within: float
    ) -> SessionView | None:
        """Append an interaction with ``prompt``, pending until a worker claims it.

        A worker must claim it within ``claim_within`` seconds, or the lease sweeper marks it
        interrupted. Returns the new state, or ``None`` (and changes nothing) when ``owner``
        owns no such session.
        """
        if not is_session_id(session_id):
            return None
        async with self.sessionmaker.begin() as db:
            if await _bump_version(db, session_id, owner) is None:
                return None
            position = await db.scalar(
                select(func.coalesce(func.max(Interaction.position) + 1, 0)).where(
                    Interaction.session_id == session_id
                )
            )
            db.add(
                Interaction(
                    session_id=session_id,
                    position=position,
                    prompt=prompt,
                    lease_expires_at=time.time() + claim_within,
                )
            )
            await db.flush()
            return await _load(db, session_id)

    # The worker's writes: each token in O(1) statements, without loading the session.

    @_runs_to_the_end
    async def claim(self, worker: str, *, lease: float) -> Claim | None:
        """Claim the oldest pending interaction for ``worker``, with a lease of ``lease`` s.

        Two workers (or processes) never claim the same one: the update re-checks that it is
        still unclaimed. Returns ``None`` when nothing is pending.
        """
        pending = (
            select(Interaction.id)
            .where(Interaction.worker.is_(None), Interaction.done.is_(False))
            .order_by(Interaction.id)
            .limit(1)
            .scalar_subquery()
        )
        async with self.sessionmaker.begin() as db:
            row = (
                await db.execute(
                    update(Interaction)
                    .where(
                        Interaction.id == pending,
                        Interaction.worker.is_(None),
                        Interaction.done.is_(False),
                    )
                    .values(worker=worker, lease_expires_at=time.time() + lease)
                    .returning(Interaction.id, Interaction.session_id, Interaction.position)
                    .execution_options(synchronize_session=False)
                )
            ).first()
            if row is None:
                return None
            owner = await db.scalar(
                select(ChatSession.owner).where(ChatSession.id == row.session_id)
            )
        if owner is None:
            return None  # its session was deleted meanwhile: the cascade removes it too
        return Claim(row.id, row.session_id, owner, row.position, worker)

    @_runs_to_the_end
    async def append_token(
        self, claim: Claim, token: str, *, done: bool, lease: float
    ) -> TokenCommit | None:
        """Append ``token`` to the claimed response, renew the lease, bump the version.

        Two statements, whatever the session's size. Marks the response done when ``done``.
        Returns ``None``, changing nothing, when the claim is lost: the session is gone, or
        the lease expired and the interaction was marked interrupted.
        """
        try:
            async with self.sessionmaker.begin() as db:
                version = await _bump_version(db, claim.session_id)
                if version is None:
                    return None
                response = await db.scalar(
                    update(Interaction)
                    .where(*_held(claim))
                    .values(
                        response=Interaction.response + token,
                        done=done,
                        lease_expires_at=None if done else time.time() + lease,
                    )
                    .returning(Interaction.response)
                    .execution_options(synchronize_session=False)
                )
                if response is None:
                    raise _Unchanged
                return TokenCommit(version, response, done)
        except _Unchanged:
            return None

    @_runs_to_the_end
    async def renew(self, claim: Claim, *, lease: float) -> bool:
        """Extend the claim's lease to ``lease`` s from now; ``False`` if the claim is lost."""
        async with self.sessionmaker.begin() as db:
            renewed = await db.scalar(
                update(Interaction)
                .where(*_held(claim))
                .values(lease_expires_at=time.time() + lease)
                .returning(Interaction.id)
                .execution_options(synchronize_session=False)
            )
        return renewed is not None

    # The lease sweeper's write.

    @_runs_to_the_end
    async def interrupt_expired(self) -> list[Interruption]:
        """Mark every unfinished interaction whose lease expired as interrupted.

        Each is one transaction: bump the session's version, then mark the interaction with
        a conditional ``UPDATE ... WHERE lease_expires_at < now``, rolled back if it no longer
        matches. So with several API replicas sweeping at once, each expiry is marked (and
        published) by exactly one of them, and a worker that renewed just in time keeps it.
        """
        now = time.time()
        async with self.sessionmaker() as db:
            expired = (
                await db.execute(
                    select(Interaction.id, Interaction.session_id).where(
                        Interaction.done.is_(False), Interaction.lease_expires_at < now
                    )
                )
            ).all()
        interruptions = []
        for interaction_id, session_id in expired:
            try:
                async with self.sessionmaker.begin() as db:
                    version = await _bump_version(db, session_id)
                    if version is None:
                        continue
                    row = (
                        await db.execute(
                            update(Interaction)
                            .where(
                                Interaction.id == interaction_id,
                                Interaction.done.is_(False),
                                Interaction.lease_expires_at < now,
                            )
                            .values(
                                done=True,
                                lease_expires_at=None,
                                interrupted=case(
                                    (Interaction.worker.is_(None), NO_WORKER), else_=WORKER_LOST
                                ),
                            )
                            .returning(Interaction.position, Interaction.interrupted)
                            .execution_options(synchronize_session=False)
                        )
                    ).first()
                    if row is None:
                        raise _Unchanged
                    owner = await db.scalar(
                        select(ChatSession.owner).where(ChatSession.id == session_id)
                    )
                    assert owner is not None  # the row is locked: it cannot have gone
            except _Unchanged:
                continue
            interruptions.append(
                Interruption(session_id, owner, row.position, version, row.interrupted)
            )
        return interruptions


def _held(claim: Claim) -> tuple[ColumnElement[bool], ...]:
    """The conditions under which ``claim`` still holds its interaction."""
    return (
        Interaction.id == claim.interaction_id,
        Interaction.worker == claim.worker,
        Interaction.done.is_(False),
    )


async def _bump_version(db: AsyncSession, session_id: str, owner: str | None = None) -> int | None:
    """Add one to the session's version, locking it until commit; ``None`` if no such row."""
    statement = (
        update(ChatSession)
        .where(ChatSession.id == session_id)
        .values(version=ChatSession.version + 1)
        .returning(ChatSession.version)
        .execution_options(synchronize_session=False)
    )
    if owner is not None:
        statement = statement.where(ChatSession.owner == owner)
    version: int | None = await db.scalar(statement)
    return version


async def _load(db: AsyncSession, session_id: str, owner: str | None = None) -> SessionView | None:
    statement = (
        select(ChatSession)
        .where(ChatSession.id == session_id)
        .options(selectinload(ChatSession.interactions))
        # This transaction may have changed the row already: read it, not the identity map.
        .execution_options(populate_existing=True)
    )
    if owner is not None:
        statement = statement.where(ChatSession.owner == owner)
    session = await db.scalar(statement)
    return None if session is None else session_view(session)
