"""What a process checks before it starts: a setting that cannot work is one line naming it.

The launcher runs these checks before it starts any child, and ``api`` and ``worker`` run
theirs when started alone. A port another process holds, a database out of reach, a SQLite
file in a missing directory: each is a :class:`SettingError` whose message names the
environment variable at fault and the fix, instead of a traceback in every restarted child.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from pathlib import Path

import anyio
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from .settings import ChatSettings

__all__ = ["CONNECT_TIMEOUT", "SettingError", "check_database", "check_ports"]

CONNECT_TIMEOUT = 5.0
"""Seconds the database check waits for the database to answer."""

_SQLITE_HEADER = b"SQLite format 3\x00"


class SettingError(ValueError):
    """A setting that cannot work here; the message names the variable and the fix."""


def check_ports(settings: ChatSettings) -> None:
    """Check that the API can listen on ``HOST``:``PORT``, and its nats-server on ``NATS_PORT``.

    Binds each address as uvicorn and nats-server will (``SO_REUSEADDR``: connections of an
    earlier run lingering in TIME_WAIT do not count, a listener does), then lets it go.
    ``NATS_PORT`` only when the API starts its private nats-server (no ``NATS_URL``).

    Raises:
        SettingError: Another process listens there, ``HOST`` is not an address of this
            machine, or the port needs privileges.
    """
    _check_listen("PORT", settings.host, settings.port, fix="stop it or set PORT")
    if not settings.nats_url:
        _check_listen(
            "NATS_PORT",
            "127.0.0.1",
            settings.nats_port,
            fix="stop it (a nats-server left by an earlier run?), or set NATS_PORT or NATS_URL",
        )


async def check_database(settings: ChatSettings) -> None:
    """Check that the store can open ``DATABASE_URL``, in at most :data:`CONNECT_TIMEOUT` s.

    SQLite: the file (created on first use) must be in an existing, writable directory, and
    be a SQLite database if it exists; nothing is created. PostgreSQL: one connection is
    opened and closed.

    Raises:
        SettingError: It cannot; the message shows the URL without its password.
    """
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        _check_sqlite(url)
    else:
        await _check_server(url)


def _check_listen(variable: str, host: str, port: int, *, fix: str) -> None:
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise SettingError(
            f"HOST {host} is not an address of this machine ({exc.strerror}); set HOST"
        ) from None
    # Every address, as asyncio's create_server (uvicorn's) binds "localhost" on both families.
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise SettingError(
                        f"{variable} {port} is in use by another process; {fix}"
                    ) from None
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise SettingError(
                        f"HOST {host} is not an address of this machine; set HOST"
                    ) from None
                if exc.errno == errno.EACCES:
                    raise SettingError(
                        f"{variable} {port} needs privileges to listen on; set {variable} "
                        "above 1023"
                    ) from None
                raise SettingError(
                    f"{variable} {port}: cannot listen on {host} ({exc.strerror}); set {variable}"
                ) from None


def _check_sqlite(url: URL) -> None:
    database = url.database
    if url.query.get("uri"):
        return  # a file: URI with its own options: SQLite will say what it thinks of it
    if not database or database == ":memory:":
        raise SettingError(
            "DATABASE_URL: an in-memory SQLite database lives in one process, and the API "
            "and the worker are two; set DATABASE_URL to a file, sqlite:///chat.sqlite3"
        )
    path = Path(database).absolute()
    directory = path.parent
    if not directory.is_dir():
        raise SettingError(
            f"DATABASE_URL: the directory of the SQLite file, {directory}, does not exist; "
            "create it or set DATABASE_URL"
        )
    # SQLite writes its journal beside the file: the directory must be writable too.
    if not os.access(directory, os.W_OK | os.X_OK):
        raise SettingError(
            f"DATABASE_URL: the directory of the SQLite file, {directory}, is not writable; "
            "set DATABASE_URL to a file in one that is"
        )
    if not path.exists():
        return
    if not path.is_file() or not os.access(path, os.R_OK | os.W_OK):
        raise SettingError(
            f"DATABASE_URL: {path} is not a file this process can read and write; set DATABASE_URL"
        )
    with path.open("rb") as file:
        header = file.read(len(_SQLITE_HEADER))
    if header and header != _SQLITE_HEADER:
        raise SettingError(
            f"DATABASE_URL: {path} is not a SQLite database; move it away or set DATABASE_URL"
        )


async def _check_server(url: URL) -> None:
    shown = url.render_as_string(hide_password=True)
    try:
        engine = create_async_engine(
            url, poolclass=NullPool, connect_args={"timeout": CONNECT_TIMEOUT}
        )
    except ImportError as exc:
        raise SettingError(
            f"DATABASE_URL: {url.drivername} needs the {exc.name} package; "
            f"pip install {exc.name}, or set DATABASE_URL"
        ) from None
    try:
        # The driver's own timeout covers the connection; this one, anything after it.
        with anyio.fail_after(CONNECT_TIMEOUT + 1):
            async with engine.connect() as connection:
                await connection.exec_driver_sql("SELECT 1")
    except DBAPIError as exc:
        # The server answered, and refused: a role, password or database that is wrong.
        reason = str(exc.orig).splitlines()[0] if exc.orig is not None else "refused"
        raise SettingError(
            f"DATABASE_URL: {shown} refused the connection ({reason}); create that user and "
            "database, or set DATABASE_URL"
        ) from None
    # asyncpg's own timeout is asyncio's TimeoutError, not the builtin one before 3.11.
    except (OSError, TimeoutError, asyncio.TimeoutError) as exc:
        raise SettingError(
            f"DATABASE_URL: cannot reach {shown} ({_unreachable(exc, url)}); start PostgreSQL "
            "or set DATABASE_URL"
        ) from None
    except Exception as exc:
        # A check must never end in a traceback: whatever else went wrong, say it in one line.
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise SettingError(
            f"DATABASE_URL: cannot use {shown} ({type(exc).__name__}: {detail}); set DATABASE_URL"
        ) from None
    finally:
        await engine.dispose()


def _unreachable(exc: Exception, url: URL) -> str:
    """Why a server could not be reached, in a few words."""
    if isinstance(exc, socket.gaierror):
        return f"unknown host {url.host}"
    # TimeoutError subclasses OSError: test it before the errors that carry an errno.
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    # asyncio reports one error per address tried ("Multiple exceptions: ...") for a name
    # with several addresses, such as localhost.
    if isinstance(exc, ConnectionRefusedError) or "Connect call failed" in str(exc):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
