"""The chat's tables, and the JSON shape of a session that the API, the snapshot and every
published update share."""

from __future__ import annotations

import re
import uuid
from typing import Literal, TypedDict, cast

from sqlalchemy import Float, ForeignKey, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "FINAL_STATUSES",
    "Base",
    "ChatSession",
    "Interaction",
    "InteractionStatus",
    "InteractionView",
    "SessionView",
    "is_session_id",
    "new_session_id",
    "session_view",
]

# What a session id is: 32 lower-case hex digits (a UUID4 without dashes). Valid in URLs and
# NATS subjects; anything else names no session and never reaches the database.
_SESSION_ID = re.compile(r"[0-9a-f]{32}")


def new_session_id() -> str:
    """A random session id: it says nothing about other sessions."""
    return uuid.uuid4().hex


def is_session_id(value: str) -> bool:
    """Whether ``value`` is a well-formed session id (whether or not such a session exists)."""
    return _SESSION_ID.fullmatch(value) is not None


InteractionStatus = Literal["pending", "streaming", "complete", "cancelled", "interrupted"]
"""Where an interaction's response is: ``pending`` until a worker claims it, then the
:class:`~asgi_session_sync.protocol.AnswerStatus` values (``streaming``, then ``complete``,
``cancelled`` or ``interrupted``)."""

FINAL_STATUSES: frozenset[str] = frozenset({"complete", "cancelled", "interrupted"})
"""The statuses a response never leaves."""


class Base(DeclarativeBase):
    """Declarative base of the chat's tables."""


class ChatSession(Base):
    """A chat session: its owner, its ordered interactions, and a version bumped on every change."""

    __tablename__ = "chat_sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_session_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    title: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(default=1)
    interactions: Mapped[list[Interaction]] = relationship(
        order_by="Interaction.position",
        cascade="all, delete-orphan",
        # SQLAlchemy's asyncio extension cannot lazy-load: every query that needs them says so.
        lazy="raise",
    )


class Interaction(Base):
    """One prompt and its response, which a worker streams under a lease.

    Lifecycle (``status``): created ``pending`` (``worker`` unset, ``lease_expires_at`` the
    deadline for a worker to claim it, which does not run while another interaction of the
    session streams); claimed, ``streaming`` (``worker`` set, the lease renewed by each
    checkpoint); then final: ``complete``, ``cancelled`` (a user stopped it) or
    ``interrupted`` (its worker stopped, or its lease expired: ``interrupted`` holds the
    reason). ``done`` becomes true in the commit after the final status (the stream's last
    checkpoint carries the text and the status only), or with it when the API or the lease
    sweeper ends the interaction.
    """

    __tablename__ = "interactions"
    __table_args__ = (UniqueConstraint("session_id", "position"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[str] = mapped_column(
        ForeignKey("chat_sessions.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int]
    prompt: Mapped[str] = mapped_column(Text)
    response: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(
        String(16), default="pending", server_default="pending", index=True
    )
    done: Mapped[bool] = mapped_column(default=False)
    interrupted: Mapped[str | None] = mapped_column(String(200), default=None)
    worker: Mapped[str | None] = mapped_column(String(100), default=None)
    # Unix time in seconds (a float works the same in SQLite and PostgreSQL). Set while the
    # interaction is not done; NULL once it is.
    lease_expires_at: Mapped[float | None] = mapped_column(Float, default=None, index=True)


class InteractionView(TypedDict):
    """An interaction as clients see it.

    ``status`` says where the response is (:data:`InteractionStatus`); ``done`` is true once
    nothing will change it any more; ``interrupted`` then says why it stopped short (``None``
    for a complete or a cancelled response).
    """

    position: int
    prompt: str
    response: str
    status: InteractionStatus
    done: bool
    interrupted: str | None


class SessionView(TypedDict):
    """A session as clients see it: in the API, the snapshot and every live update alike."""

    id: str
    owner: str
    title: str
    version: int
    interactions: list[InteractionView]


def session_view(session: ChatSession) -> SessionView:
    """The JSON shape of a session whose interactions are loaded."""
    return {
        "id": session.id,
        "owner": session.owner,
        "title": session.title,
        "version": session.version,
        "interactions": [
            {
                "position": item.position,
                "prompt": item.prompt,
                "response": item.response,
                "status": cast(InteractionStatus, item.status),
                "done": item.done,
                "interrupted": item.interrupted,
            }
            for item in session.interactions
        ],
    }
