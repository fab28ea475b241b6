"""An example app in a real process, started, SIGKILLed and restarted by end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from asgi_session_sync.nats import find_nats_server

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


class ServerProcess:
    """A server ``command`` listening on ``port`` of 127.0.0.1; its output goes to ``log``.

    ``start()`` returns once the port accepts connections, at the monotonic time it did (the
    moment the restart tests measure from). ``kill()`` is a SIGKILL: no shutdown code runs.
    ``started`` keeps the pid of every process started, for leak checks.
    """

    def __init__(
        self, command: list[str], port: int, log: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.command = command
        self.port = port
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.started: set[int] = set()

    def start(self, timeout: float = 20.0) -> float:
        assert self.process is None, "already running"
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
            wait_for_port(self.port, timeout, self.process)
        except TimeoutError:
            self.stop()
            raise TimeoutError(
                f"{self.command[:3]} did not start:\n{self.output()[-3000:]}"
            ) from None
        return time.monotonic()

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
    """An example app: ``python -m <module>`` with ``env`` and ``PORT`` set."""

    def __init__(self, module: str, port: int, env: Mapping[str, str], log: Path) -> None:
        super().__init__([sys.executable, "-m", module], port, log, {**env, "PORT": str(port)})
        self.module = module

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class NatsProcess(ServerProcess):
    """``nats-server`` on a fixed port, so it can be SIGKILLed and come back at the same URL."""

    def __init__(self, port: int, log: Path) -> None:
        super().__init__([find_nats_server(), "-a", "127.0.0.1", "-p", str(port)], port, log)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"
