"""The example's configuration: environment variables, or a ``Settings`` built by tests."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy.engine import make_url

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./fastapi_example.sqlite3"

# The async driver SQLAlchemy needs for each database, when a URL names none.
_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}


@dataclass(frozen=True)
class Settings:
    """How the example runs.

    Attributes:
        database_url: SQLAlchemy URL of the session store. ``sqlite://`` and ``postgresql://``
            URLs get their async driver (aiosqlite, asyncpg) when they name none.
        nats_url: The NATS server to publish updates through; ``None`` starts a private
            ``nats-server`` (:class:`~asgi_session_sync.nats.EmbeddedNats`) with the app.
        host: Address uvicorn binds.
        port: Port uvicorn binds.
        response_tokens: Tokens in each simulated response.
        token_interval: Seconds between two tokens.

    Raises:
        ValueError: A value is out of range; the message names the setting.
    """

    database_url: str = DEFAULT_DATABASE_URL
    nats_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    response_tokens: int = 15
    token_interval: float = 0.2

    def __post_init__(self) -> None:
        url = make_url(self.database_url)
        driver = _ASYNC_DRIVERS.get(url.drivername)
        if driver is not None:
            object.__setattr__(
                self,
                "database_url",
                url.set(drivername=driver).render_as_string(hide_password=False),
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"PORT must be between 0 and 65535: got {self.port}")
        if self.response_tokens < 1:
            raise ValueError(f"response_tokens must be at least 1: got {self.response_tokens}")
        if self.token_interval < 0:
            raise ValueError(f"token_interval must be >= 0 seconds: got {self.token_interval}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read ``DATABASE_URL``, ``NATS_URL``, ``HOST`` and ``PORT`` (default ``os.environ``).

        Unset or empty variables keep their defaults.

        Raises:
            ValueError: ``PORT`` is not an integer port.
        """
        env = os.environ if environ is None else environ
        port = env.get("PORT") or "8000"
        try:
            port_number = int(port)
        except ValueError:
            raise ValueError(f"PORT must be an integer: got {port!r}") from None
        return cls(
            database_url=env.get("DATABASE_URL") or DEFAULT_DATABASE_URL,
            nats_url=env.get("NATS_URL") or None,
            host=env.get("HOST") or "127.0.0.1",
            port=port_number,
        )
