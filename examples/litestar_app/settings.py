"""The Litestar example's settings, from the environment or given by tests."""

from __future__ import annotations

from dataclasses import dataclass

from examples.chat.settings import ChatSettings

__all__ = ["Settings"]


@dataclass(frozen=True)
class Settings(ChatSettings):
    """How the Litestar example runs: :class:`~examples.chat.settings.ChatSettings` with this
    example's defaults (SQLite in ``./litestar_example.sqlite3``, in the current directory as
    the FastAPI example's, never in the source tree; port 8001, its private nats-server on
    4224)."""

    database_url: str = "sqlite+aiosqlite:///./litestar_example.sqlite3"
    nats_port: int = 4224
    port: int = 8001
