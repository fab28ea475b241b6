"""The chat session store's tables, and the JSON shape of a session."""

from __future__ import annotations

import uuid
from typing import TypedDict

from sqlalchemy import ForeignKey, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = ["Base", "ChatSession", "Interaction", "InteractionView", "SessionView", "session_view"]


class Base(DeclarativeBase):
    """Declarative base of the example's tables."""


def new_session_id() -> str:
    """A random session id: 32 hex digits, valid in URLs and NATS subjects."""
    return uuid.uuid4().hex


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
        # Nothing may load them behind our back: SQLAlchemy's asyncio extension cannot.
        lazy="raise",
    )


class Interaction(Base):
    """One prompt and its (possibly still streaming) response."""

    __tablename__ = "interactions"
    __table_args__ = (UniqueConstraint("session_id", "position"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[str] = mapped_column(
        ForeignKey("chat_sessions.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int]
    prompt: Mapped[str] = mapped_column(Text)
    response: Mapped[str] = mapped_column(Text, default="")
    done: Mapped[bool] = mapped_column(default=False)


class InteractionView(TypedDict):
    """An interaction as clients see it."""

    position: int
    prompt: str
    response: str
    done: bool


class SessionView(TypedDict):
    """A session as clients see it: in the API, the snapshot and every live update alike."""

    id: str
    title: str
    owner: str
    version: int
    interactions: list[InteractionView]


def session_view(session: ChatSession) -> SessionView:
    """The JSON shape of a session whose interactions are loaded."""
    return {
        "id": session.id,
        "title": session.title,
        "owner": session.owner,
        "version": session.version,
        "interactions": [
            {
                "position": item.position,
                "prompt": item.prompt,
                "response": item.response,
                "done": item.done,
            }
            for item in session.interactions
        ],
    }
