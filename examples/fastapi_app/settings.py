"""The FastAPI example's configuration: environment variables, or a ``Settings`` built by tests."""

from __future__ import annotations

from dataclasses import dataclass

from examples.chat.settings import ChatSettings

__all__ = ["Settings"]


@dataclass(frozen=True)
class Settings(ChatSettings):
    """How the FastAPI example runs: :class:`~examples.chat.settings.ChatSettings` with this
    example's defaults (SQLite in ``./fastapi_example.sqlite3``, port 8000, its private
    nats-server on 4223)."""

    database_url: str = "sqlite+aiosqlite:///./fastapi_example.sqlite3"
    nats_port: int = 4223
    port: int = 8000
