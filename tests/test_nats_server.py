"""EmbeddedNats as a process manager: it dies with its parent, pins a port, refuses a taken one,
and admits only clients holding its per-instance credentials."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import nats
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

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
            assert server.display_url == f"nats://127.0.0.1:{port}"
            assert port_accepts(port)
        # A restarted process gets "the same" server back at the same address, and with the
        # same credentials the same URL, where its clients reconnect.
        async with EmbeddedNats(port=port, user=server.user, password=server.password) as again:
            assert again.url == server.url
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


# Credentials: another local account must neither read nor publish.

# A NATS client from the standard library alone, run as another account (nobody), which may
# not read this checkout's virtualenv. It reads the server's INFO, sends CONNECT with the
# credentials from its stdin (never its command line), then ``sub`` (subscribes to every
# subject and prints what it receives) or ``pub`` (publishes a forged update), and PING. It
# prints every line the server sends until the server closes the connection, or a MSG came
# (``sub``), or the PONG that follows its publish (``pub``).
RAW_CLIENT = textwrap.dedent(
    r"""
    import json, socket, sys
    port, action = int(sys.argv[1]), sys.argv[2]
    auth = json.loads(sys.stdin.readline())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        lines = sock.makefile("rb")
        print(lines.readline().split(b" ", 1)[0].decode(), flush=True)
        command = "CONNECT " + json.dumps({"verbose": False, **auth}) + "\r\n"
        if action == "sub":
            command += "SUB > 1\r\n"
        else:
            forged = json.dumps({"type": "session_update", "forged": True})
            command += f"PUB session.forged {len(forged)}\r\n{forged}\r\n"
        sock.sendall((command + "PING\r\n").encode())
        for line in lines:
            print(line.decode().rstrip(), flush=True)
            if line.startswith(b"MSG "):
                print(lines.readline().decode().rstrip(), flush=True)
                break
            if line.startswith(b"PONG") and action == "pub":
                break
    """
)


def as_another_account() -> list[str]:
    """The command prefix that runs a program as ``nobody``; skips unless this is root."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a client as another local account")
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


class RawClient:
    """The raw client's process, and the lines it printed."""

    def __init__(self, process: anyio.abc.Process) -> None:
        assert process.stdout is not None
        self.process = process
        self.lines: list[str] = []
        self._stdout = BufferedByteReceiveStream(process.stdout)

    async def next_line(self) -> str | None:
        """The next line it printed, or ``None`` once it exited."""
        try:
            line = await self._stdout.receive_until(b"\n", 65536)
        except (anyio.IncompleteRead, anyio.EndOfStream):
            return None
        self.lines.append(line.decode())
        return self.lines[-1]

    async def read_to_the_end(self) -> list[str]:
        while await self.next_line() is not None:
            pass
        assert await self.process.wait() == 0, self.lines
        return self.lines


@asynccontextmanager
async def raw_client(
    server: EmbeddedNats, action: str, auth: Mapping[str, str]
) -> AsyncIterator[RawClient]:
    """Run RAW_CLIENT as ``nobody`` against ``server``, with ``auth`` on its stdin."""
    command = [*as_another_account(), sys.executable, "-I", "-S", "-c", RAW_CLIENT]
    async with await anyio.open_process(
        [*command, str(server.port), action], stderr=subprocess.STDOUT
    ) as process:
        assert process.stdin is not None
        await process.stdin.send(json.dumps(auth).encode() + b"")
        await process.stdin.aclose()
        try:
            yield RawClient(process)
        finally:
            if process.returncode is None:
                process.kill()


def command_line(pid: int) -> list[str]:
    """The arguments of ``pid`` as ``ps`` shows them to every local account."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")


def credentials(server: EmbeddedNats) -> dict[str, str]:
    return {"user": server.user, "pass": server.password}


async def test_each_server_has_its_own_credentials_kept_off_its_command_line() -> None:
    with anyio.fail_after(WAIT):
        async with EmbeddedNats() as one, EmbeddedNats() as two:
            assert (one.user, one.password) != (two.user, two.password)
            assert len(one.password) >= 32
            assert one.url == f"nats://{one.user}:{one.password}@127.0.0.1:{one.port}"
            assert one.display_url == f"nats://127.0.0.1:{one.port}"
            assert one.process is not None
            arguments = command_line(one.process.pid)
            assert not [arg for arg in arguments if one.password in arg or one.user in arg]
            [config] = [Path(arg) for arg in arguments if arg.endswith(".conf")]
            assert one.password in config.read_text()
            assert stat.S_IMODE(config.stat().st_mode) == 0o600
            assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
        assert not config.exists()
        assert not config.parent.exists()


async def test_nats_py_connects_with_the_url_alone() -> None:
    # The credentials are in the URL: every consumer of ``url`` works unchanged. (Without them
    # the tests below are refused; nats-py is not used there, as its failed connect leaks its
    # socket.)
    with anyio.fail_after(WAIT):
        async with EmbeddedNats() as server:
            client = await nats.connect(server.url)
            try:
                subscription = await client.subscribe("session.>")
                await client.publish("session.s1", b"prompt text")
                message = await subscription.next_msg(timeout=WAIT)
                assert message.data == b"prompt text"
            finally:
                await client.close()


async def test_another_account_without_the_credentials_cannot_subscribe() -> None:
    with anyio.fail_after(WAIT):
        async with EmbeddedNats() as server:
            client = await nats.connect(server.url)
            try:
                async with raw_client(server, "sub", {}) as intruder:
                    lines = await intruder.read_to_the_end()
                    # Refused at CONNECT, before its SUB; the server closed the connection.
                    assert lines == ["INFO", "-ERR 'Authorization Violation'"]

                # The same client with the credentials does read: the refusal was the lack of
                # them, not another account's lack of access to loopback.
                async with raw_client(server, "sub", credentials(server)) as holder:
                    assert await holder.next_line() == "INFO"
                    assert await holder.next_line() == "PONG"  # subscribed
                    await client.publish("session.s1", b"a user's prompt")
                    lines = await holder.read_to_the_end()
                    assert lines[-2:] == ["MSG session.s1 1 15", "a user's prompt"]
            finally:
                await client.close()


async def test_another_account_without_the_credentials_cannot_publish() -> None:
    received: list[Any] = []
    with anyio.fail_after(WAIT):
        async with EmbeddedNats() as server:
            client = await nats.connect(server.url)
            try:
                subscription = await client.subscribe(">")
                await client.flush()

                async def received_until(marker: bytes) -> None:
                    await client.publish("marker", marker)
                    while (message := await subscription.next_msg(timeout=WAIT)).data != marker:
                        # The server's own advisories (an authentication failure) are not
                        # the intruder's messages.
                        if not message.subject.startswith("$SYS."):
                            received.append(message)

                async with raw_client(server, "pub", {}) as intruder:
                    lines = await intruder.read_to_the_end()
                    assert lines == ["INFO", "-ERR 'Authorization Violation'"]
                # The intruder's connection is closed: whatever it got through came before.
                await received_until(b"after the intruder")
                assert received == []

                async with raw_client(server, "pub", credentials(server)) as holder:
                    assert await holder.read_to_the_end() == ["INFO", "PONG"]
                await received_until(b"after the holder")
                [forged] = received
                assert forged.subject == "session.forged"
                assert json.loads(forged.data)["forged"] is True
            finally:
                await client.close()


def test_given_credentials_are_checked_and_never_echoed() -> None:
    server = EmbeddedNats(user="chat", password="s3cret-token_value.~")
    assert (server.user, server.password) == ("chat", "s3cret-token_value.~")
    with pytest.raises(ValueError, match="token_urlsafe") as refused:
        EmbeddedNats(password="p@ss:word")
    assert "p@ss" not in str(refused.value)
    with pytest.raises(ValueError, match="letters, digits"):
        EmbeddedNats(user="")


@pytest.mark.parametrize(
    ("flag", "fix"),
    [
        ("--user", "user= and password="),
        ("--pass=x", "user= and password="),
        ("-auth", "user= and password="),
        ("-c", "config="),
        ("--config", "config="),
    ],
)
def test_args_may_not_set_the_credentials_or_a_config_file(flag: str, fix: str) -> None:
    with pytest.raises(ValueError, match=f"never on its command line; pass {fix}"):
        EmbeddedNats(args=[flag, "value"])
    EmbeddedNats(args=["--cluster_name", "c"])  # a value that looks like a flag's name


def test_config_may_not_decide_who_connects() -> None:
    with pytest.raises(ValueError, match="config may not set accounts, authorization"):
        EmbeddedNats(config={"authorization": {}, "accounts": {}})
    with pytest.raises(TypeError):
        EmbeddedNats(config={"max_payload": object()})


async def test_config_entries_reach_the_server_beside_the_credentials() -> None:
    with anyio.fail_after(WAIT):
        async with EmbeddedNats(config={"max_payload": 8 * 1024 * 1024}) as server:
            client = await nats.connect(server.url)
            try:
                assert client.max_payload == 8 * 1024 * 1024
            finally:
                await client.close()
