"""The chat's store: every change is one transaction that moves the session's version first.

That ``UPDATE chat_sessions SET version = ...`` takes the session row's write lock
(PostgreSQL locks the row, SQLite the database), so concurrent changes of one session queue
up and each commits exactly one new version with the state it describes. Every writer takes
the session's lock before an interaction's, so no two writers deadlock.

Two kinds of writers share a session. The API, the lease sweeper and a worker's claim and
finish commit ``version + 1``. A streaming answer's checkpoints commit the version the
:class:`~asgi_session_sync.streaming.AnswerStream` chose, far above, with a compare-and-set
on the version it last committed (:meth:`ChatStore.checkpoint`): no writer assumes the
version before its own is one less.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import anyio
from sqlalchemy import ColumnElement, and_, case, exists, func, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased, selectinload

from asgi_session_sync.protocol import AnswerStatus
from asgi_session_sync.streaming import Checkpoint

from .models import Base, ChatSession, Interaction, SessionView, is_session_id, session_view

__all__ = [
    "NO_WORKER",
    "WORKER_FAILED",
    "WORKER_LOST",
    "WORKER_STOPPED",
    "ChatStore",
    "Claim",
    "ClaimLost",
    "InteractionChange",
]

_CREATE_ATTEMPTS = 3
# Seconds closing the engine's connections may take.
_DISPOSE_TIMEOUT = 5.0
# Pending interactions a claim tries before it gives up for this poll: other workers may
# take the first ones meanwhile.
_CLAIM_ATTEMPTS = 3

NO_WORKER = "no worker took the prompt in time"
WORKER_LOST = "the worker streaming it stopped: its lease expired"
WORKER_STOPPED = "the worker streaming it was stopped"
WORKER_FAILED = "the worker streaming it failed"


@dataclass(frozen=True)
class Claim:
    """An interaction a worker has claimed, and streams under its lease.

    Attributes:
        version: The session's version the claim committed (the interaction ``streaming``,
            its response empty): the version its answer stream starts from.
    """

    interaction_id: int
    session_id: str
    owner: str
    position: int
    worker: str
    version: int


@dataclass(frozen=True)
class InteractionChange:
    """A committed change of one interaction, to publish.

    Attributes:
        version: The session's version the change committed, one above the version before.
        values: The interaction's fields (as clients see them) that the change set, with their
            new values.
    """

    session_id: str
    owner: str
    position: int
    version: int
    values: Mapping[str, Any]


class ClaimLost(Exception):
    """The worker's claim is gone: its lease expired (the interaction was marked interrupted),
    or its session was deleted. Nothing was written."""


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
    that do not exist yet (and adds ``interactions.status`` to a database made by an older
    version of the examples), leaving closes the engine's connections.

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
                    await self._add_status_column()
                except DBAPIError:
                    if attempt == _CREATE_ATTEMPTS - 1:
                        raise
                else:
                    break
        return self

    async def _add_status_column(self) -> None:
        """Add ``interactions.status`` to a table made before it existed, from ``done``."""
        try:
            async with self.engine.connect() as connection:
                await connection.execute(select(Interaction.status).limit(0))
        except DBAPIError:
            pass  # no such column (a failed statement ends a PostgreSQL transaction: a new one)
        else:
            return
        async with self.engine.begin() as connection:
            await connection.execute(
                text(
                    "ALTER TABLE interactions ADD COLUMN "
                    "status VARCHAR(16) NOT NULL DEFAULT 'pending'"
                )
            )
            await connection.execute(
                update(Interaction).values(
                    status=case(
                        (Interaction.interrupted.is_not(None), "interrupted"),
                        (Interaction.done.is_(True), "complete"),
                        (Interaction.worker.is_not(None), "streaming"),
                        else_="pending",
                    )
                )
            )

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

        A worker must claim it within ``claim_within`` seconds of its becoming claimable (now,
        or when the session's answer before it ends), or the lease sweeper marks it
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
                    status="pending",
                    lease_expires_at=time.time() + claim_within,
                )
            )
            await db.flush()
            return await _load(db, session_id)

    @_runs_to_the_end
    async def interaction_status(self, session_id: str, owner: str, position: int) -> str | None:
        """The status of the interaction at ``position``, if ``owner`` owns its session.

        ``None`` for a missing or malformed session, another user's, or no such position.
        """
        if not is_session_id(session_id):
            return None
        async with self.sessionmaker() as db:
            status: str | None = await db.scalar(
                select(Interaction.status)
                .join(ChatSession, ChatSession.id == Interaction.session_id)
                .where(
                    Interaction.session_id == session_id,
                    Interaction.position == position,
                    ChatSession.owner == owner,
                )
            )
        return status

    @_runs_to_the_end
    async def cancel_pending(
        self, session_id: str, owner: str, position: int
    ) -> InteractionChange | None:
        """Cancel the interaction at ``position`` if no worker has claimed it yet.

        One commit (``version + 1``): status ``cancelled``, done. ``None``, changing nothing,
        when it is not pending any more (a worker claimed it: ask that worker to stop it), or
        ``owner`` owns no such interaction.
        """
        if not is_session_id(session_id):
            return None
        try:
            async with self.sessionmaker.begin() as db:
                version = await _bump_version(db, session_id, owner)
                if version is None:
                    return None
                cancelled = await db.scalar(
                    update(Interaction)
                    .where(
                        Interaction.session_id == session_id,
                        Interaction.position == position,
                        Interaction.status == "pending",
                        Interaction.worker.is_(None),
                    )
                    .values(status="cancelled", done=True, lease_expires_at=None)
                    .returning(Interaction.id)
                    .execution_options(synchronize_session=False)
                )
                if cancelled is None:
                    raise _Unchanged
        except _Unchanged:
            return None
        values = {"status": "cancelled", "done": True}
        return InteractionChange(session_id, owner, position, version, values)

    # The worker's writes: a claim, a few checkpoints a second, a finish; never per token.

    @_runs_to_the_end
    async def claim(self, worker: str, *, lease: float) -> Claim | None:
        """Claim the oldest pending interaction for ``worker``, with a lease of ``lease`` s.

        Only an interaction whose session has no other answer under way (claimed and not
        done): one answer streams into a session at a time. The claim is one commit
        (``version + 1``) that sets the interaction ``streaming``; publish it before
        streaming. Two workers never claim the same interaction, nor two of one session: the
        update re-checks both under the session's lock. Returns ``None`` when there is
        nothing to claim.
        """
        for _ in range(_CLAIM_ATTEMPTS):
            async with self.sessionmaker() as db:
                candidate = (
                    await db.execute(
                        select(Interaction.id, Interaction.session_id)
                        .where(Interaction.status == "pending", _claimable(Interaction))
                        .order_by(Interaction.id)
                        .limit(1)
                    )
                ).first()
            if candidate is None:
                return None
            claim = await self._claim(worker, candidate.id, candidate.session_id, lease=lease)
            if claim is not None:
                return claim
        return None

    async def _claim(
        self, worker: str, interaction_id: int, session_id: str, *, lease: float
    ) -> Claim | None:
        try:
            async with self.sessionmaker.begin() as db:
                # The session's lock first: a concurrent claim in this session waits here, and
                # its update below then sees this one's interaction streaming.
                version = await _bump_version(db, session_id)
                if version is None:
                    raise _Unchanged
                position = await db.scalar(
                    update(Interaction)
                    .where(
                        Interaction.id == interaction_id,
                        Interaction.status == "pending",
                        Interaction.worker.is_(None),
                        _claimable(Interaction),
                    )
                    .values(worker=worker, status="streaming", lease_expires_at=time.time() + lease)
                    .returning(Interaction.position)
                    .execution_options(synchronize_session=False)
                )
                if position is None:
                    raise _Unchanged
                owner = await db.scalar(
                    select(ChatSession.owner).where(ChatSession.id == session_id)
                )
                assert owner is not None  # the row is locked: it cannot have gone
        except _Unchanged:
            return None
        return Claim(interaction_id, session_id, owner, position, worker, version)

    @_runs_to_the_end
    async def checkpoint(self, claim: Claim, checkpoint: Checkpoint, *, lease: float) -> int:
        """Commit a streamed answer's text and status at ``checkpoint.version``, and renew the
        lease, if the session is still at ``checkpoint.base_version``.

        The :data:`~asgi_session_sync.streaming.CheckpointWriter` of the claim's answer
        stream. One transaction: ``UPDATE chat_sessions SET version = :version WHERE id = :id
        AND version = :base_version RETURNING version`` (a compare-and-set), then the
        interaction's response, status and lease. Writes nothing else: the stream publishes
        exactly the text and the status, so the state at that version is the one its sockets
        hold. ``done`` follows in :meth:`finish`.

        Returns:
            ``checkpoint.version`` when written; else the version the session has (another
            writer committed it), having written nothing.

        Raises:
            ClaimLost: The session is gone, or the lease expired and the interaction was
                marked interrupted; nothing was written.
        """
        try:
            async with self.sessionmaker.begin() as db:
                moved = await db.scalar(
                    update(ChatSession)
                    .where(
                        ChatSession.id == checkpoint.session_id,
                        ChatSession.version == checkpoint.base_version,
                    )
                    .values(version=checkpoint.version)
                    .returning(ChatSession.version)
                    .execution_options(synchronize_session=False)
                )
                if moved is None:
                    current: int | None = await db.scalar(
                        select(ChatSession.version).where(ChatSession.id == checkpoint.session_id)
                    )
                    if current is None:
                        raise ClaimLost(f"session {checkpoint.session_id} is gone")
                    return current
                held = await db.scalar(
                    update(Interaction)
                    .where(*_held(claim))
                    .values(
                        response=checkpoint.text,
                        status=checkpoint.status.value,
                        lease_expires_at=time.time() + lease,
                    )
                    .returning(Interaction.id)
                    .execution_options(synchronize_session=False)
                )
                if held is None:
                    raise _Unchanged
                version: int = moved
                return version
        except _Unchanged:
            raise ClaimLost(
                f"interaction {claim.interaction_id} is no longer held by {claim.worker}"
            ) from None

    @_runs_to_the_end
    async def finish(
        self, claim: Claim, status: AnswerStatus, *, claim_within: float
    ) -> InteractionChange | None:
        """End the claimed interaction with ``status``: done, its lease cleared.

        One commit (``version + 1``) after the answer stream's last checkpoint, which carried
        the final text and status: this one sets ``done`` (and the reason, for
        ``interrupted``), and restarts the claim deadline (``claim_within`` s) of the
        session's pending prompts, which waited for this answer. Returns the change to
        publish; ``None``, changing nothing, when the claim is lost.
        """
        reason = WORKER_STOPPED if status is AnswerStatus.INTERRUPTED else None
        values = {"status": status.value, "done": True, "interrupted": reason}
        try:
            async with self.sessionmaker.begin() as db:
                version = await _bump_version(db, claim.session_id)
                if version is None:
                    return None
                ended = await db.scalar(
                    update(Interaction)
                    .where(*_held(claim))
                    .values(**values, lease_expires_at=None)
                    .returning(Interaction.id)
                    .execution_options(synchronize_session=False)
                )
                if ended is None:
                    raise _Unchanged
                await _restart_pending(db, claim.session_id, claim_within)
        except _Unchanged:
            return None
        return InteractionChange(claim.session_id, claim.owner, claim.position, version, values)

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
    async def interrupt_expired(self, *, claim_within: float) -> list[InteractionChange]:
        """Mark every unfinished interaction whose lease expired as interrupted.

        A pending prompt's deadline does not run while another answer of its session is under
        way. Each is one transaction: bump the session's version, then mark the interaction
        with a conditional ``UPDATE ... WHERE lease_expires_at < now``, rolled back if it no
        longer matches. So with several API replicas sweeping at once, each expiry is marked
        (and published) by exactly one of them, and a worker that renewed just in time keeps
        it. An answer whose stream had already ended (its worker died before the commit that
        sets ``done``) keeps its status, and gets ``done``. The session's pending prompts then
        get ``claim_within`` s for a worker to claim them.
        """
        now = time.time()
        expired_now = and_(
            Interaction.done.is_(False),
            Interaction.lease_expires_at < now,
            # A prompt queued behind a streaming answer is not late: it cannot be claimed.
            (Interaction.status != "pending") | _claimable(Interaction),
        )
        async with self.sessionmaker() as db:
            expired = (
                await db.execute(select(Interaction.id, Interaction.session_id).where(expired_now))
            ).all()
        unfinished = Interaction.status.in_(("pending", "streaming", "interrupted"))
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
                            .where(Interaction.id == interaction_id, expired_now)
                            .values(
                                done=True,
                                lease_expires_at=None,
                                status=case((unfinished, "interrupted"), else_=Interaction.status),
                                interrupted=case(
                                    (
                                        unfinished,
                                        case(
                                            (Interaction.worker.is_(None), NO_WORKER),
                                            else_=WORKER_LOST,
                                        ),
                                    ),
                                    else_=None,
                                ),
                            )
                            .returning(
                                Interaction.position, Interaction.status, Interaction.interrupted
                            )
                            .execution_options(synchronize_session=False)
                        )
                    ).first()
                    if row is None:
                        raise _Unchanged
                    await _restart_pending(db, session_id, claim_within)
                    owner = await db.scalar(
                        select(ChatSession.owner).where(ChatSession.id == session_id)
                    )
                    assert owner is not None  # the row is locked: it cannot have gone
            except _Unchanged:
                continue
            values = {"status": row.status, "done": True, "interrupted": row.interrupted}
            interruptions.append(
                InteractionChange(session_id, owner, row.position, version, values)
            )
        return interruptions


def _claimable(interaction: type[Interaction]) -> ColumnElement[bool]:
    """Whether no other answer of ``interaction``'s session is under way (claimed, not done)."""
    other = aliased(Interaction)
    return ~exists().where(
        other.session_id == interaction.session_id,
        other.worker.is_not(None),
        other.done.is_(False),
    )


def _held(claim: Claim) -> tuple[ColumnElement[bool], ...]:
    """The conditions under which ``claim`` still holds its interaction."""
    return (
        Interaction.id == claim.interaction_id,
        Interaction.worker == claim.worker,
        Interaction.done.is_(False),
    )


async def _restart_pending(db: AsyncSession, session_id: str, claim_within: float) -> None:
    """Give the session's pending prompts ``claim_within`` s from now for a worker to claim."""
    await db.execute(
        update(Interaction)
        .where(Interaction.session_id == session_id, Interaction.status == "pending")
        .values(lease_expires_at=time.time() + claim_within)
        .execution_options(synchronize_session=False)
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
