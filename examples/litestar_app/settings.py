"""Settings of the example, from the environment or given by tests."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Settings", "async_database_url"]

DEFAULT_DATABASE_URL = f"sqlite+aiosqlite:///{Path(__file__).with_name('chat.db')}"

# Plain URLs, as DATABASE_URL usually holds them, and the async driver SQLAlchemy needs for each.
_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
}


def async_database_url(url: str) -> str:
    """Return ``url`` with an asyncio driver: ``postgresql://`` becomes ``postgresql+asyncpg://``.

    URLs that already name a driver are returned unchanged.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        raise ValueError(f"DATABASE_URL must be a URL such as sqlite:///chat.db: got {url!r}")
    return f"{_ASYNC_DRIVERS.get(scheme, scheme)}://{rest}"


@dataclass(frozen=True)
class Settings:
    """How the app runs.

    Attributes:
        database_url: SQLAlchemy URL with an asyncio driver; a SQLite file next to this module
            by default.
        nats_url: The NATS server to use; ``None`` starts a private ``nats-server`` with the app.
        host: Address uvicorn binds.
        port: Port uvicorn binds.
        reply_tokens: Tokens in each simulated response.
        token_interval: Seconds between two tokens.
    """

    database_url: str = DEFAULT_DATABASE_URL
    nats_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8001
    reply_tokens: int = 15
    token_interval: float = 0.2

    def __post_init__(self) -> None:
        if self.reply_tokens < 1:
            raise ValueError(f"reply_tokens must be at least 1: got {self.reply_tokens}")
        if not self.token_interval >= 0:
            raise ValueError(f"token_interval must not be negative: got {self.token_interval}")
        if not 0 < self.port < 65536:
            raise ValueError(f"PORT must be between 1 and 65535: got {self.port}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Read ``DATABASE_URL``, ``NATS_URL``, ``HOST`` and ``PORT``; defaults for the rest."""
        port = environ.get("PORT", "8001")
        if not port.isdigit():
            raise ValueError(f"PORT must be a port number: got {port!r}")
        database_url = environ.get("DATABASE_URL")
        return cls(
            database_url=DEFAULT_DATABASE_URL
            if not database_url
            else async_database_url(database_url),
            nats_url=environ.get("NATS_URL") or None,
            host=environ.get("HOST", "127.0.0.1"),
            port=int(port),
        )
