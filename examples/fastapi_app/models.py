"""The session store's tables: chat sessions and their ordered interactions."""

from __future__ import annotations

import uuid

from sqlalchemy import ForeignKey, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    """Declarative base of the example's tables."""


class ChatSession(Base):
    """A chat session: who owns it, and a version bumped on every change to it."""

    __tablename__ = "chat_sessions"

    # Random, not sequential: an id says nothing about other sessions. The owner check is
    # what keeps them private all the same.
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: uuid.uuid4().hex)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    title: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(default=1)
    # lazy="raise": SQLAlchemy's asyncio extension cannot lazy-load, so every query that
    # needs the interactions says so (selectinload, or the loader's join).
    interactions: Mapped[list[Interaction]] = relationship(
        back_populates="session",
        order_by="Interaction.position",
        cascade="all, delete-orphan",
        lazy="raise",
    )


class Interaction(Base):
    """One prompt and its (possibly still streaming) response."""

    __tablename__ = "interactions"
    __table_args__ = (UniqueConstraint("session_id", "position"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("chat_sessions.id", ondelete="CASCADE"))
    position: Mapped[int]
    prompt: Mapped[str] = mapped_column(Text)
    response: Mapped[str] = mapped_column(Text, default="")
    done: Mapped[bool] = mapped_column(default=False)
    session: Mapped[ChatSession] = relationship(back_populates="interactions", lazy="raise")
