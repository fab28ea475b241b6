"""The Litestar example's settings, from the environment or given by tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from examples.chat.settings import ChatSettings

__all__ = ["Settings"]


@dataclass(frozen=True)
class Settings(ChatSettings):
    """How the Litestar example runs: :class:`~examples.chat.settings.ChatSettings` with this
    example's defaults (SQLite in ``chat.db`` next to this module, port 8001, its private
    nats-server on 4224)."""

    database_url: str = f"sqlite+aiosqlite:///{Path(__file__).with_name('chat.db')}"
    nats_port: int = 4224
    port: int = 8001
