"""How an example runs: one set of settings for its API and its worker, from the environment."""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar
from urllib.parse import quote

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .worker import WorkerSettings

__all__ = ["NATS_USER", "ChatSettings"]

NATS_USER = "chat"
"""The user name of the API's private nats-server; its password is ``NATS_PASSWORD``."""

_Settings = TypeVar("_Settings", bound="ChatSettings")

# The async driver SQLAlchemy needs for each database, when a URL names none.
_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
}
# The databases the store runs on (it needs UPDATE ... RETURNING), with their async driver.
_DATABASES = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}
# The password of a URL that does not parse: an error message shows the rest of it.
_PASSWORD = re.compile(r"(//[^/@:]*):[^/@]*@")
_URL_FORMS = "use sqlite:///path/to/file.db or postgresql://user:password@host:5432/database"


@dataclass(frozen=True)
class _Variable:
    """An environment variable: the setting it sets, its type, and what it means."""

    name: str
    setting: str
    kind: type[Any]
    meaning: str
    unset: str = ""  # what an unset variable means, when its default is None


# Every variable the settings read, in the order --help lists them.
_ENVIRONMENT = (
    _Variable(
        "DATABASE_URL",
        "database_url",
        str,
        "the chat store: sqlite:///path/to/file.db (a file in the current directory by "
        "default) or postgresql://user:password@host:5432/database",
    ),
    _Variable(
        "HOST",
        "host",
        str,
        "the address the API listens on (0.0.0.0: every interface)",
    ),
    _Variable("PORT", "port", int, "the port the API listens on"),
    _Variable(
        "NATS_URL",
        "nats_url",
        str,
        "a NATS server for the API and the worker, such as nats://127.0.0.1:4222",
        unset="unset: the API starts a private nats-server on NATS_PORT",
    ),
    _Variable(
        "NATS_PORT",
        "nats_port",
        int,
        "the port of the API's private nats-server (on 127.0.0.1), without NATS_URL",
    ),
    _Variable(
        "NATS_PASSWORD",
        "nats_password",
        str,
        "the password of the private nats-server's one user, chat; the API and the worker "
        "need the same one (letters, digits and ._~- only)",
        unset="unset: the launcher makes one per run for its two children",
    ),
    _Variable(
        "RESPONSE_TOKENS",
        "response_tokens",
        int,
        "tokens (words) in each simulated answer; any number ends with a whole sentence",
    ),
    _Variable(
        "TOKEN_INTERVAL",
        "token_interval",
        float,
        "seconds between two tokens of an answer (0: as fast as the worker can)",
    ),
    _Variable(
        "LEASE_SECONDS",
        "lease_seconds",
        float,
        "seconds a silent worker keeps its answer before the API marks it interrupted; also "
        "how long a prompt may wait for a worker once its turn has come",
    ),
)


@dataclass(frozen=True)
class ChatSettings:
    """How an example runs; each example subclasses it with its own defaults.

    Attributes:
        database_url: SQLAlchemy URL of the store. ``sqlite://`` and ``postgresql://`` URLs
            get their async driver (aiosqlite, asyncpg) when they name none.
        nats_url: A NATS server to use; ``None``: the API starts a private ``nats-server``
            on ``nats_port`` of 127.0.0.1, and the worker connects there.
        nats_port: Port of that private server: pinned, so that after an API restart it
            comes back at the same address, where the worker reconnects.
        nats_password: The password of that private server (user :data:`NATS_USER`): the
            API and the worker must share it, and keep it across restarts (the launcher,
            ``python -m examples.<app>``, makes one per run and hands it to both through
            their environment). ``None``: the API's server gets a password of its own,
            which no worker knows. A secret: never logged, and left out of ``repr``.
        host: Address the API binds.
        port: Port the API binds.
        response_tokens: Tokens in each simulated response (400: a few paragraphs; any
            length ends with a whole sentence).
        token_interval: Seconds between two tokens (0.02: 50 tokens a second; 0: as fast as
            the worker can).
        lease_seconds: Seconds a response's worker may go silent before the API marks the
            response interrupted; also how long a prompt may wait for a worker once no other
            answer of its session streams.

    Raises:
        ValueError: A value is out of range, or ``database_url`` is not a SQLite or
            PostgreSQL URL with an asyncio driver (or none); the message names the variable.
    """

    database_url: str = "sqlite+aiosqlite:///./chat.sqlite3"
    nats_url: str | None = field(default=None, repr=False)  # may carry credentials
    nats_port: int = 4223
    nats_password: str | None = field(default=None, repr=False)
    host: str = "127.0.0.1"
    port: int = 8000
    response_tokens: int = 400
    token_interval: float = 0.02
    lease_seconds: float = 10.0

    def __post_init__(self) -> None:
        url = _database_url(self.database_url)
        driver = _ASYNC_DRIVERS.get(url.drivername)
        if driver is not None:
            object.__setattr__(
                self,
                "database_url",
                url.set(drivername=driver).render_as_string(hide_password=False),
            )
        for name, value in (("PORT", self.port), ("NATS_PORT", self.nats_port)):
            if not 0 < value < 65536:
                raise ValueError(f"{name} must be between 1 and 65535: got {value}")
        # It goes into the worker's URL as it is: unreserved URL characters only (the value
        # is a secret, so the message does not repeat it).
        password = self.nats_password
        if password is not None and (not password or quote(password, safe="") != password):
            raise ValueError(
                "NATS_PASSWORD must be letters, digits and ._~- only: make one with "
                "python -c 'import secrets; print(secrets.token_urlsafe(24))'"
            )
        if self.response_tokens < 1:
            raise ValueError(f"RESPONSE_TOKENS must be at least 1: got {self.response_tokens}")
        if not self.token_interval >= 0:
            raise ValueError(f"TOKEN_INTERVAL must be >= 0 seconds: got {self.token_interval}")
        if not self.lease_seconds > 0:
            raise ValueError(f"LEASE_SECONDS must be > 0 seconds: got {self.lease_seconds}")

    @classmethod
    def from_env(cls: type[_Settings], environ: Mapping[str, str] | None = None) -> _Settings:
        """Read the settings from ``environ`` (default ``os.environ``).

        Variables: ``DATABASE_URL``, ``NATS_URL``, ``NATS_PORT``, ``NATS_PASSWORD``,
        ``HOST``, ``PORT``, ``RESPONSE_TOKENS``, ``TOKEN_INTERVAL``, ``LEASE_SECONDS``. Unset
        or empty ones keep their defaults.

        Raises:
            ValueError: A number does not parse or is out of range, or ``DATABASE_URL`` is
                not a SQLite or PostgreSQL URL with an asyncio driver (or none).
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for variable in _ENVIRONMENT:
            text = env.get(variable.name)
            if not text:
                continue
            try:
                values[variable.setting] = variable.kind(text)
            except ValueError:
                kind_name = "an integer" if variable.kind is int else "a number"
                raise ValueError(f"{variable.name} must be {kind_name}: got {text!r}") from None
        return cls(**values)

    @classmethod
    def environment_help(cls) -> str:
        """Every variable :meth:`from_env` reads, with this class's default and its meaning.

        Plain text for ``--help``: a line with each variable and its default, then what it
        means, indented.
        """
        defaults = {setting.name: setting.default for setting in fields(cls)}
        lines = ["environment variables (unset or empty: the default):"]
        for variable in _ENVIRONMENT:
            default = defaults[variable.setting]
            shown = variable.unset if default is None else f"default: {default}"
            lines.append(f"  {variable.name}  ({shown})")
            lines.extend(textwrap.wrap(variable.meaning, 88, initial_indent=" " * 4,
                                       subsequent_indent=" " * 4))  # fmt: skip
        return "\n".join(lines)

    @property
    def worker_nats_url(self) -> str:
        """Where the worker publishes: ``nats_url``, or the API's private server.

        The private server's URL carries ``nats_password``: a secret, never to be logged.

        Raises:
            ValueError: Neither ``NATS_URL`` nor ``NATS_PASSWORD`` is set.
        """
        if self.nats_url:
            return self.nats_url
        if self.nats_password is None:
            raise ValueError(
                "NATS_PASSWORD is not set, and the worker needs it (the password of the API's "
                "private nats-server): run both with python -m examples.<app> (it sets one), "
                "or export the same NATS_PASSWORD to the API and the worker, or set NATS_URL"
            )
        return f"nats://{NATS_USER}:{self.nats_password}@127.0.0.1:{self.nats_port}"

    def worker(self) -> WorkerSettings:
        """The worker's settings.

        Raises:
            ValueError: Neither ``NATS_URL`` nor ``NATS_PASSWORD`` is set.
        """
        return WorkerSettings(
            database_url=self.database_url,
            nats_url=self.worker_nats_url,
            tokens=self.response_tokens,
            token_interval=self.token_interval,
            lease=self.lease_seconds,
        )

    @property
    def sweep_interval(self) -> float:
        """Seconds between two lease sweeps in the API: a quarter lease, at most 1 s."""
        return min(1.0, self.lease_seconds / 4)


def _database_url(text: str) -> URL:
    """``DATABASE_URL`` parsed: a SQLite or PostgreSQL URL, with an asyncio driver or none.

    Raises:
        ValueError: It does not parse, names another database, or a driver that is not an
            asyncio one; the message shows it without its password.
    """
    try:
        url = make_url(text)
    except (ArgumentError, ValueError):
        shown = _PASSWORD.sub(r"\1:***@", text)
        raise ValueError(
            f"DATABASE_URL is not a database URL: got {shown!r}; {_URL_FORMS}"
        ) from None
    shown = url.render_as_string(hide_password=True)
    backend = url.get_backend_name()
    if backend == "postgres":
        backend = "postgresql"
    if backend not in _DATABASES:
        raise ValueError(
            f"DATABASE_URL must be a SQLite or PostgreSQL URL (the examples run on these "
            f"two): got {shown}; {_URL_FORMS}"
        )
    if url.drivername in _ASYNC_DRIVERS:
        return url
    try:
        is_async = url.get_dialect().is_async
    except ArgumentError:  # no such driver
        is_async = False
    if not is_async:
        raise ValueError(
            f"DATABASE_URL must name an asyncio driver, or none: got {shown}; use "
            f"{_DATABASES[backend]}:// (or {backend}://)"
        )
    return url
