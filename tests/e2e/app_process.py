"""An example app in a real process, started, SIGKILLed and restarted by end-to-end tests."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from asgi_session_sync.nats_server import find_nats_server

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Return once 127.0.0.1:``port`` accepts connections.

    Raises:
        TimeoutError: Nothing accepted within ``timeout`` seconds, or ``process`` (the server
            meant to listen) exited first.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if process is not None and process.poll() is not None:
                raise TimeoutError(f"the server exited with {process.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing accepted connections on port {port} in {timeout}s"
                ) from None
            time.sleep(0.05)  # polling a port: there is no event to await across processes


def wait_for_output(log: Path, text: str, offset: int, timeout: float) -> None:
    """Return once ``log`` holds ``text`` past byte ``offset``; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while text.encode() not in log.read_bytes()[offset:]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {text!r} in {log.name} within {timeout}s")
        time.sleep(0.05)  # another process's log file: no event to await


def children_named(pid: int, name: str) -> set[int]:
    """Pids of the live child processes of ``pid`` whose command name is ``name`` (Linux)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited meanwhile
        comm = text[text.index("(") + 1 : text.rindex(")")]
        state, ppid = text[text.rindex(")") + 2 :].split()[:2]
        if comm == name and int(ppid) == pid and state != "Z":
            found.add(int(stat.parent.name))
    return found


def is_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (exited, never reaped) does not."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"


def wait_until_gone(pids: set[int], timeout: float) -> set[int]:
    """Wait up to ``timeout`` s for ``pids`` to exit; return those still alive."""
    deadline = time.monotonic() + timeout
    while {pid for pid in pids if is_alive(pid)} and time.monotonic() < deadline:
        time.sleep(0.02)  # another process's exit: no event to await
    return {pid for pid in pids if is_alive(pid)}


class ServerProcess:
    """A server ``command`` listening on ``port`` of 127.0.0.1; its output goes to ``log``.

    ``start()`` returns once the port accepts connections (or, with no ``port``, once the log
    shows ``ready_line``), at the monotonic time it did (the moment the restart tests measure
    from). ``kill()`` is a SIGKILL: no shutdown code runs. ``started`` keeps the pid of every
    process started, for leak checks.
    """

    def __init__(
        self,
        command: list[str],
        port: int | None,
        log: Path,
        env: Mapping[str, str] | None = None,
        *,
        ready_line: str | None = None,
    ) -> None:
        self.command = command
        self.port = port
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.log = log
        self.ready_line = ready_line
        self.process: subprocess.Popen[bytes] | None = None
        self.started: set[int] = set()

    def start(self, timeout: float = 20.0) -> float:
        assert self.process is None, "already running"
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.started.add(self.process.pid)
        try:
            if self.port is not None:
                wait_for_port(self.port, timeout, self.process)
            if self.ready_line is not None:
                wait_for_output(self.log, self.ready_line, offset, timeout)
        except TimeoutError:
            self.stop()
            raise TimeoutError(
                f"{self.command[:3]} did not start:\n{self.output()[-3000:]}"
            ) from None
        return time.monotonic()

    @property
    def pid(self) -> int:
        assert self.process is not None, "not running"
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL the process and reap it."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
            self.process = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a bounded wait."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class AppProcess(ServerProcess):
    """An example's API: ``python -m <module> api`` with ``env`` and ``PORT`` set."""

    def __init__(self, module: str, port: int, env: Mapping[str, str], log: Path) -> None:
        super().__init__(
            [sys.executable, "-m", module, "api"], port, log, {**env, "PORT": str(port)}
        )
        self.module = module

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class WorkerProcess(ServerProcess):
    """An example's response worker: ``python -m <module> worker``; ready once it reached NATS."""

    def __init__(self, module: str, env: Mapping[str, str], log: Path) -> None:
        super().__init__(
            [sys.executable, "-m", module, "worker"], None, log, env, ready_line="worker ready"
        )


class ExampleStack:
    """An example as its README runs it: the API and a worker, on one SQLite file.

    With ``nats_url`` both use that broker; without, the API starts its private nats-server
    on a pinned port (``NATS_PORT``), where the worker reconnects after an API restart.
    """

    def __init__(
        self, module: str, tmp_path: Path, env: Mapping[str, str], nats_url: str | None = None
    ) -> None:
        self.db = tmp_path / "chat.sqlite3"
        self.nats_port = free_port()
        full_env = {
            "DATABASE_URL": f"sqlite:///{self.db}",
            "NATS_PORT": str(self.nats_port),
            # What the launcher does: one password for the API's private server and the worker.
            "NATS_PASSWORD": secrets.token_urlsafe(24),
            **({"NATS_URL": nats_url} if nats_url else {}),
            **env,
        }
        self.api = AppProcess(module, free_port(), full_env, tmp_path / "api.log")
        self.worker = WorkerProcess(module, full_env, tmp_path / "worker.log")

    def start(self) -> None:
        self.api.start()
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()
        self.api.stop()

    def output(self) -> str:
        return f"--- api\n{self.api.output()[-3000:]}\n--- worker\n{self.worker.output()[-3000:]}"


class NatsProcess(ServerProcess):
    """``nats-server`` on a fixed port, so it can be SIGKILLed and come back at the same URL."""

    def __init__(self, port: int, log: Path) -> None:
        super().__init__([find_nats_server(), "-a", "127.0.0.1", "-p", str(port)], port, log)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"
