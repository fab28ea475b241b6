"""EmbeddedNats as a process manager: it dies with its parent, pins a port, refuses a taken one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest

from asgi_session_sync.nats_server import EmbeddedNats, PortInUseError

pytestmark = pytest.mark.anyio

WAIT = 10.0

# A parent that starts an EmbeddedNats, prints its server's pid and port, then waits to be
# killed. Started from a worker thread's event loop when asked, to cover the parent-death
# signal's caveat: it follows the thread that forked, which here outlives nothing.
PARENT = textwrap.dedent(
    """
    import sys, threading
    import anyio
    from asgi_session_sync.nats_server import EmbeddedNats

    async def main():
        async with EmbeddedNats(die_with_parent=sys.argv[1]) as server:
            print(server.process.pid, server.port, flush=True)
            await anyio.sleep_forever()

    if sys.argv[2] == "thread":
        # The loop runs in a thread, the main thread waits: the fork happens in the loop's
        # thread, which lives as long as the server must.
        thread = threading.Thread(target=anyio.run, args=(main,))
        thread.start()
        thread.join()
    else:
        anyio.run(main)
    """
)


def is_running(pid: int) -> bool:
    """Whether ``pid`` names a live process; a zombie (exited, not reaped) is not live."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # pragma: no cover - not Linux
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize(
    ("die_with_parent", "loop_thread"),
    [
        pytest.param("auto", "main", id="auto"),
        pytest.param("auto", "thread", id="auto-loop-in-a-thread"),
        pytest.param("watchdog", "main", id="watchdog"),
    ],
)
def test_server_dies_when_its_parent_is_sigkilled(die_with_parent: str, loop_thread: str) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, die_with_parent, loop_thread],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line, parent.stderr.read() if parent.stderr else ""
        pid, port = (int(word) for word in line.split())
        assert is_running(pid)
        assert port_accepts(port)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=WAIT)
        if parent.stdout is not None:
            parent.stdout.close()
        if parent.stderr is not None:
            parent.stderr.close()

    # The kernel signals (or the watchdog reads end-of-file) as the parent dies: bounded wait.
    # A Go process's leader thread turns zombie while its other threads still exit: wait for
    # the port as well.
    deadline = time.monotonic() + 5
    while (is_running(pid) or port_accepts(port)) and time.monotonic() < deadline:
        time.sleep(0.02)  # another process's exit: no event to await
    assert not is_running(pid), f"nats-server {pid} outlived its SIGKILLed parent"
    assert not port_accepts(port), f"port {port} still served after nats-server {pid} died"


async def test_pinned_port_is_used_and_freed_for_the_next_server() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    with anyio.fail_after(WAIT):
        async with EmbeddedNats(port=port) as server:
            assert server.url == f"nats://127.0.0.1:{port}"
            assert port_accepts(port)
        # A restarted process gets "the same" server back at the same address.
        async with EmbeddedNats(port=port) as again:
            assert again.url == f"nats://127.0.0.1:{port}"
            assert port_accepts(port)


async def test_taken_port_is_refused_with_the_port_and_the_fix() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        server = EmbeddedNats(port=port)
        with anyio.fail_after(WAIT), pytest.raises(PortInUseError) as refused:
            await server.__aenter__()
    message = str(refused.value)
    assert f"127.0.0.1:{port}" in message
    assert "address already in use" in message
    assert "EmbeddedNats(port=...)" in message
    assert server.process is None


def test_signal_mode_needs_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(ValueError, match="needs Linux"):
        EmbeddedNats(die_with_parent="signal")
    assert EmbeddedNats().die_with_parent == "watchdog"
    with pytest.raises(ValueError, match="'auto', 'signal' or 'watchdog'"):
        EmbeddedNats(die_with_parent="never")  # type: ignore[arg-type]


async def test_clean_stop_dismisses_the_watchdog() -> None:
    with anyio.fail_after(WAIT):
        async with EmbeddedNats(die_with_parent="watchdog") as server:
            watchdog = server._watchdog
            assert watchdog is not None
        assert watchdog.returncode == 0


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_server_outlives_trios_retired_fork_thread() -> None:
    # Trio forks in a worker thread that retires after 10 s idle: with the parent-death signal
    # the server would die with that thread, under a live parent. "auto" uses the watchdog.
    with anyio.fail_after(WAIT + 12):
        async with EmbeddedNats() as server:
            assert server.die_with_parent == "watchdog"
            assert server.process is not None
            await anyio.sleep(11)  # not synchronisation: past trio's 10 s thread idle timeout
            assert server.process.returncode is None
            assert port_accepts(server.port or 0)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_signal_mode_is_refused_under_trio() -> None:
    server = EmbeddedNats(die_with_parent="signal")
    with anyio.fail_after(WAIT), pytest.raises(ValueError, match="needs asyncio"):
        await server.__aenter__()
    assert server.process is None


def test_port_zero_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="port=None for a free port"):
        EmbeddedNats(port=0)
