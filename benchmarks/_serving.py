"""A benchmark server in its own process: both ends of starting, watching and stopping it.

The child (``serve_app``) runs one ASGI app under uvicorn on a loopback port it binds itself,
prints ``{"port": N, "pid": N}`` on stdout once it accepts connections, and stops on SIGTERM or
when its stdin closes (the parent is gone). The parent (``running_server``) starts it, reads
that line, reads its CPU time and memory from ``/proc``, and always stops it.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from ._report import REPOSITORY

__all__ = [
    "ServerProcess",
    "raise_open_files_limit",
    "running_server",
    "serve_app",
    "stop",
]

# Bounded waits, in seconds: a server that does not start, or stop, does not hang the run.
SERVER_START_TIMEOUT = 30.0
SERVER_STOP_TIMEOUT = 10.0


def raise_open_files_limit() -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` to the hard limit; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def serve_app(
    app: Callable[..., Any],
    *,
    port: int = 0,
    watch_stdin: bool = False,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Serve ``app`` under uvicorn until SIGTERM/SIGINT (or stdin EOF with ``watch_stdin``).

    Every benchmark server runs with this one configuration: one worker, the ``websockets-sansio``
    protocol (what ``ws="auto"`` picks when websockets is installed), no access log, no
    lifespan, backlog 4096. ``on_started`` runs once the server accepts connections, just before
    the port is announced.
    """
    import uvicorn  # the load generator imports this module too, but never serves

    raise_open_files_limit()
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        ws="websockets-sansio",
        lifespan="off",
        backlog=4096,
    )
    server = uvicorn.Server(config)
    # Bind here, on port 0 by default, so the port is free by construction and known before
    # the parent connects: no race between choosing a port and binding it. IPPROTO_TCP, not 0:
    # asyncio sets TCP_NODELAY only on accepted sockets whose proto says TCP, as it does for
    # the sockets uvicorn binds itself. Without it, Nagle's algorithm holds each small frame
    # until the client's delayed ACK (40 ms on Linux).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    bound = sock.getsockname()[1]

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await anyio.sleep(0.01)
        if on_started is not None:
            on_started()
        sys.stdout.write(json.dumps({"port": bound, "pid": os.getpid()}) + "\n")
        sys.stdout.flush()

    async def exit_with_parent() -> None:
        await anyio.wait_readable(sys.stdin.fileno())  # nothing is ever written: EOF
        server.should_exit = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(announce)
        if watch_stdin:
            tg.start_soon(exit_with_parent)
        await server.serve(sockets=[sock])
        tg.cancel_scope.cancel()


@dataclass(frozen=True)
class ServerProcess:
    """A running benchmark server: where it listens, and its figures from ``/proc``."""

    port: int
    pid: int

    @property
    def ws_url(self) -> str:
        """``ws://127.0.0.1:<port>``."""
        return f"ws://127.0.0.1:{self.port}"

    def rss_bytes(self) -> int:
        """The server's resident set size now (``VmRSS`` in ``/proc/<pid>/status``)."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS in /proc/{self.pid}/status")

    def cpu_seconds(self) -> float:
        """User and system CPU seconds the server used so far, in clock ticks (10 ms)."""
        with open(f"/proc/{self.pid}/stat") as stat:
            # The command name, in parentheses, may hold spaces: split after it.
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@asynccontextmanager
async def running_server(module_args: Sequence[str]) -> AsyncIterator[ServerProcess]:
    """Run ``python -m <module_args>`` from the repository; yield it once it listens.

    The child must announce itself as ``serve_app`` does. It is always stopped, within bounds,
    even when the caller is cancelled.
    """
    command = [sys.executable, "-m", *module_args]
    process = await anyio.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, cwd=REPOSITORY
    )
    try:
        assert process.stdout is not None
        try:
            with anyio.fail_after(SERVER_START_TIMEOUT):
                line = await BufferedByteReceiveStream(process.stdout).receive_until(b"\n", 4096)
        except (anyio.IncompleteRead, anyio.EndOfStream):
            raise RuntimeError(
                f"the server exited before listening (its error is above): {' '.join(command)}"
            ) from None
        announced = json.loads(line)
        yield ServerProcess(port=int(announced["port"]), pid=int(announced["pid"]))
    finally:
        # Shielded: the server must be stopped even when this run is being cancelled.
        with anyio.CancelScope(shield=True):
            await stop(process)


async def stop(process: Process) -> None:
    """SIGTERM the server, SIGKILL it if it is still running after the bound, and reap it."""
    if process.returncode is None:
        process.terminate()
        with anyio.move_on_after(SERVER_STOP_TIMEOUT):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()
    await process.aclose()
