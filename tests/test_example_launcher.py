"""The examples' launcher on a bad setting: one line naming it, exit status 2, nothing started.

``python -m examples.<app>`` runs as a real process, as a user types it; each setting that
cannot work must be refused before any child starts (so these tests are fast), and never
retried. The supervisor's own rules (no restart on a refused setting, three restarts for a
crash) run against a stand-in child module.
"""

from __future__ import annotations

import importlib
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import anyio
import pytest
from sqlalchemy.engine import make_url

from asgi_session_sync._types import Message, Receive, Scope, Send
from examples.chat import processes, worker
from examples.chat.settings import ChatSettings

ROOT = Path(__file__).resolve().parents[1]
# Seconds a refused launch may take: Python and the example's imports, then the checks.
TIMEOUT = 30.0
# The examples' variables: none of the caller's leaks into a test.
VARIABLES = {
    "DATABASE_URL",
    "NATS_URL",
    "NATS_PORT",
    "NATS_PASSWORD",
    "HOST",
    "PORT",
    "RESPONSE_TOKENS",
    "TOKEN_INTERVAL",
    "LEASE_SECONDS",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port of 127.0.0.1 another process (this one) listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@dataclass(frozen=True)
class Launch:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def launch(module: str, tmp_path: Path, *args: str, **settings: str) -> Launch:
    """Run ``python -m <module> [args]`` with good settings but ``settings``, until it exits.

    Raises:
        pytest.fail: It ran for ``TIMEOUT`` s (it started): its process group is killed.
    """
    env = {name: value for name, value in os.environ.items() if name not in VARIABLES}
    env.update(
        {
            "DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}",
            "PORT": str(free_port()),
            "NATS_PORT": str(free_port()),
            **settings,
        }
    )
    process = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Its own group: should it start its children after all, none outlives the test.
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"still running after {TIMEOUT}s:\n{stdout}\n{stderr}")
    return Launch(process.returncode, stdout, stderr)


def assert_refused(launched: Launch, variable: str) -> str:
    """Exit status 2, one line on stderr naming ``variable``, nothing started; that line."""
    output = launched.stdout + launched.stderr
    assert launched.code == processes.CONFIGURATION_ERROR, output
    [line] = launched.error_lines
    assert re.match(rf"error: {variable}\b", line), line
    assert launched.stdout == "", "something started, or the page's URL was printed"
    for word in ("Traceback", "restart", "started", "open http"):
        assert word not in output, output
    return line


@pytest.mark.parametrize(
    ("module", "variable", "value", "says"),
    [
        ("examples.fastapi_app", "PORT", "abc", "must be an integer"),
        ("examples.litestar_app", "PORT", "abc", "must be an integer"),
        ("examples.fastapi_app", "PORT", "0", "between 1 and 65535"),
        ("examples.fastapi_app", "DATABASE_URL", "mysql://x", "SQLite or PostgreSQL"),
        ("examples.litestar_app", "DATABASE_URL", "mysql://x", "SQLite or PostgreSQL"),
        ("examples.fastapi_app", "DATABASE_URL", "not a url", "not a database URL"),
        ("examples.fastapi_app", "DATABASE_URL", "postgresql+psycopg2://db/x", "asyncio driver"),
        ("examples.fastapi_app", "DATABASE_URL", "sqlite://", "in-memory"),
        ("examples.fastapi_app", "LEASE_SECONDS", "0", "> 0"),
        ("examples.litestar_app", "RESPONSE_TOKENS", "0", "at least 1"),
        ("examples.fastapi_app", "TOKEN_INTERVAL", "-0.01", ">= 0 seconds"),
        ("examples.fastapi_app", "HOST", "192.0.2.1", "not an address of this machine"),
    ],
)
def test_a_setting_that_does_not_parse_is_one_line_naming_it(
    module: str, variable: str, value: str, says: str, tmp_path: Path
) -> None:
    line = assert_refused(launch(module, tmp_path, **{variable: value}), variable)
    assert says in line


@pytest.mark.parametrize("module", ["examples.fastapi_app", "examples.litestar_app"])
def test_an_unreachable_postgresql_names_database_url_without_the_password(
    module: str, tmp_path: Path
) -> None:
    port = free_port()  # closed: nothing listens there
    url = f"postgresql://app:hunter2secret@127.0.0.1:{port}/chat"
    launched = launch(module, tmp_path, DATABASE_URL=url)
    line = assert_refused(launched, "DATABASE_URL")
    assert line == (
        f"error: DATABASE_URL: cannot reach postgresql+asyncpg://app:***@127.0.0.1:{port}/chat "
        "(connection refused); start PostgreSQL or set DATABASE_URL"
    )
    assert "hunter2secret" not in launched.stdout + launched.stderr


def test_a_malformed_url_does_not_show_its_password(tmp_path: Path) -> None:
    url = "postgresql://app:hunter2secret@db:notaport/chat"
    launched = launch("examples.fastapi_app", tmp_path, DATABASE_URL=url)
    line = assert_refused(launched, "DATABASE_URL")
    assert "postgresql://app:***@db:notaport/chat" in line
    assert "hunter2secret" not in launched.stdout + launched.stderr


def test_a_sqlite_file_in_a_missing_directory_is_refused_and_nothing_is_created(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "missing"
    url = f"sqlite:///{missing / 'chat.db'}"
    line = assert_refused(
        launch("examples.fastapi_app", tmp_path, DATABASE_URL=url), "DATABASE_URL"
    )
    assert f"{missing}, does not exist" in line
    assert not missing.exists()


def test_a_file_that_is_not_a_sqlite_database_is_refused(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes, not a database\n")
    line = assert_refused(
        launch("examples.litestar_app", tmp_path, DATABASE_URL=f"sqlite:///{notes}"),
        "DATABASE_URL",
    )
    assert "is not a SQLite database" in line
    assert notes.read_text() == "my notes, not a database\n"


@pytest.mark.parametrize("module", ["examples.fastapi_app", "examples.litestar_app"])
@pytest.mark.parametrize("process", [[], ["api"]])
def test_a_taken_port_is_refused_before_anything_starts(
    module: str, process: list[str], taken_port: int, tmp_path: Path
) -> None:
    line = assert_refused(launch(module, tmp_path, *process, PORT=str(taken_port)), "PORT")
    assert line == f"error: PORT {taken_port} is in use by another process; stop it or set PORT"
    assert not (tmp_path / "chat.db").exists()


def test_a_taken_nats_port_is_refused_unless_nats_url_is_set(
    taken_port: int, tmp_path: Path
) -> None:
    line = assert_refused(
        launch("examples.fastapi_app", tmp_path, NATS_PORT=str(taken_port)), "NATS_PORT"
    )
    assert line.startswith(f"error: NATS_PORT {taken_port} is in use by another process;")
    # With a broker of its own, the API starts no nats-server: the port is not its business.
    # (It then fails on the database instead, which proves the port check let it through.)
    launched = launch(
        "examples.fastapi_app",
        tmp_path,
        NATS_PORT=str(taken_port),
        NATS_URL="nats://127.0.0.1:4222",
        DATABASE_URL=f"sqlite:///{tmp_path / 'missing' / 'chat.db'}",
    )
    assert_refused(launched, "DATABASE_URL")


def test_the_worker_alone_checks_its_own_settings(tmp_path: Path) -> None:
    # Its password for the API's private broker, which only the launcher makes.
    line = assert_refused(launch("examples.fastapi_app", tmp_path, "worker"), "NATS_PASSWORD")
    assert "NATS_URL" in line
    unreachable = f"postgresql://app@127.0.0.1:{free_port()}/chat"
    launched = launch(
        "examples.litestar_app",
        tmp_path,
        "worker",
        NATS_PASSWORD="shared",
        DATABASE_URL=unreachable,
    )
    assert_refused(launched, "DATABASE_URL")


def test_the_worker_alone_does_not_need_the_apis_port(taken_port: int, tmp_path: Path) -> None:
    # Only the API listens: a worker beside a running API must not refuse its PORT. It gets
    # as far as the database check, which a missing directory fails.
    launched = launch(
        "examples.fastapi_app",
        tmp_path,
        "worker",
        PORT=str(taken_port),
        NATS_PASSWORD="shared",
        DATABASE_URL=f"sqlite:///{tmp_path / 'missing' / 'chat.db'}",
    )
    assert_refused(launched, "DATABASE_URL")


# The supervisor, with a stand-in for the example: its api exits with $API_EXIT at once.
STAND_IN = """\
import os, sys, time
if sys.argv[1] == "api":
    print("error: PORT is refused by the stand-in", file=sys.stderr, flush=True)
    sys.exit(int(os.environ["API_EXIT"]))
time.sleep(60)  # the worker: runs until the supervisor stops it
"""


def stand_in(tmp_path: Path, api_exit: int) -> dict[str, str]:
    package = tmp_path / "stand_in"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(STAND_IN)
    return {**os.environ, "PYTHONPATH": str(tmp_path), "API_EXIT": str(api_exit)}


@pytest.mark.anyio
async def test_supervisor_never_restarts_a_child_that_refused_its_settings(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="examples.chat")
    environment = stand_in(tmp_path, processes.CONFIGURATION_ERROR)
    with anyio.fail_after(TIMEOUT):
        code = await processes.supervise("stand_in", environment)
    _, err = capfd.readouterr()
    out = caplog.text
    assert code == processes.CONFIGURATION_ERROR
    assert out.count("started api pid=") == 1, out
    assert "api refused its settings (above); stopping" in out
    assert "restart" not in out
    assert err.count("error: PORT") == 1


@pytest.mark.anyio
async def test_supervisor_still_gives_up_on_a_child_that_keeps_crashing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="examples.chat")
    monkeypatch.setattr(processes, "RESTART_DELAY", 0.01)
    environment = stand_in(tmp_path, 1)
    with anyio.fail_after(TIMEOUT):
        code = await processes.supervise("stand_in", environment)
    out = caplog.text
    assert code == 1
    assert out.count("started api pid=") == processes.QUICK_EXITS, out
    assert out.count("api exited with 1; restarting") == processes.QUICK_EXITS - 1
    assert "api exited 3 times right after starting (last code 1); giving up" in out


async def lifespan_only(scope: Scope, receive: Receive, send: Send) -> None:
    assert scope["type"] == "lifespan"
    while True:
        message = await receive()
        reply: Message = {"type": f"{message['type']}.complete"}
        await send(reply)
        if message["type"] == "lifespan.shutdown":
            return


def test_page_url_is_not_printed_when_the_port_is_taken_as_uvicorn_binds(
    taken_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    # The race the check cannot close: another process takes the port after it.
    settings = ChatSettings(port=taken_port)
    with pytest.raises(SystemExit) as exited:
        processes.serve(lifespan_only, settings, ready="open the page", log_config=None)
    assert exited.value.code != 0
    assert "open the page" not in capsys.readouterr().out


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # nats-py runs on asyncio only
@pytest.mark.anyio
async def test_the_worker_waits_for_nats_at_info_and_warns_once_after_its_patience(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each attempt gives up after 8 x 0.25 s: the first is a normal wait, the second is past
    # a 3 s patience; any later one is said at DEBUG only.
    monkeypatch.setattr(worker, "NATS_STARTUP_PATIENCE", 3.0)
    caplog.set_level(logging.DEBUG, logger="examples.chat")
    url = f"nats://chat:secret@127.0.0.1:{free_port()}"  # closed: nothing listens there
    with anyio.move_on_after(5.0):
        async with AsyncExitStack() as stack:
            await worker._enter_bridge(stack, url)
    said = [
        (record.levelno, record.getMessage())
        for record in caplog.records
        if record.name == "examples.chat"
    ]
    assert [level for level, _ in said[:2]] == [logging.INFO, logging.WARNING], said
    assert all(level == logging.DEBUG for level, _ in said[2:]), said
    assert re.match(r"NATS still unreachable after \d+ s url=nats://127\.0\.0\.1:", said[1][1])
    assert "secret" not in repr(said)


def run_until_ready(module: str, tmp_path: Path) -> list[str]:
    """Start ``python -m <module>`` as a user would, stop it once it is ready; its output lines.

    Ready: the page's URL is printed and the worker has reached NATS. Stopped with SIGTERM,
    as a service manager (or the launcher's own children) are.

    Raises:
        pytest.fail: It was not ready within ``TIMEOUT`` s, or did not stop cleanly.
    """
    env = {name: value for name, value in os.environ.items() if name not in VARIABLES}
    env.update(
        DATABASE_URL=f"sqlite:///{tmp_path / 'chat.db'}",
        PORT=str(free_port()),
        NATS_PORT=str(free_port()),
        PYTHONUNBUFFERED="1",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def read(stream: IO[str]) -> None:
        for line in stream:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=read, args=(process.stdout,), daemon=True)
    reader.start()
    output: list[str] = []
    deadline = time.monotonic() + TIMEOUT
    try:
        waiting_for = {"open http", "worker ready"}
        while waiting_for:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                pytest.fail("it exited before it was ready:\n" + "\n".join(output))
            output.append(line)
            waiting_for = {text for text in waiting_for if text not in line}
        process.terminate()
        assert process.wait(timeout=TIMEOUT) == 0, "\n".join(output)
        reader.join(timeout=TIMEOUT)
        while (line := lines.get_nowait()) is not None:
            output.append(line)
    except (queue.Empty, subprocess.TimeoutExpired):
        pytest.fail("not ready, or not stopped, in time:\n" + "\n".join(output))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        reader.join(timeout=TIMEOUT)
        process.stdout.close()
    return output


@pytest.mark.parametrize("module", ["examples.fastapi_app", "examples.litestar_app"])
def test_a_clean_start_and_stop_log_no_warning(module: str, tmp_path: Path) -> None:
    output = run_until_ready(module, tmp_path)
    text = "\n".join(output)
    for word in ("WARNING", "ERROR", "Traceback"):
        assert word not in text, text


@pytest.mark.parametrize("module", ["examples.fastapi_app", "examples.litestar_app"])
def test_the_launcher_its_api_and_its_worker_log_in_one_format(module: str, tmp_path: Path) -> None:
    output = run_until_ready(module, tmp_path)
    # Every line is a log record in the one format but the page's URL, printed for the user.
    logged = re.compile(r"\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) [\w.]+\[(\d+)\]: \S")
    others = [line for line in output if not logged.match(line)]
    assert [line for line in others if not line.startswith("open http")] == [], output
    assert len(others) == 1, output
    pids = {int(match[2]) for line in output if (match := logged.match(line))}
    children = {
        int(pid) for pid in re.findall(r"started (?:api|worker) pid=(\d+)", "\n".join(output))
    }
    # The launcher's lines, uvicorn's in the API, and the worker's.
    assert len(children) == 2, output
    assert children < pids, output
    assert len(pids) == 3, output
    assert any("uvicorn" in line for line in output), output
    assert any("worker ready" in line for line in output), output


@pytest.mark.parametrize("module", ["examples.fastapi_app", "examples.litestar_app"])
def test_the_default_sqlite_file_is_in_the_current_directory_not_the_source_tree(
    module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = importlib.import_module(f"{module}.settings").Settings()
    monkeypatch.chdir(tmp_path)
    database = make_url(settings.database_url).database
    assert database is not None
    path = Path(database).resolve()
    assert path.parent == tmp_path.resolve()
    assert ROOT not in path.parents


@pytest.mark.parametrize(
    ("module", "defaults"),
    [
        ("examples.fastapi_app", {"PORT": "8000", "NATS_PORT": "4223", "LEASE_SECONDS": "10.0"}),
        ("examples.litestar_app", {"PORT": "8001", "NATS_PORT": "4224", "TOKEN_INTERVAL": "0.02"}),
    ],
)
def test_help_is_plain_text_naming_every_variable_with_its_default(
    module: str, defaults: dict[str, str]
) -> None:
    shown = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    ).stdout
    for markup in ("``", ":mod:", ":data:", ":class:"):
        assert markup not in shown, shown
    listed = dict(re.findall(r"^  ([A-Z_]+)  \((.+)\)$", shown, re.MULTILINE))
    assert set(listed) == VARIABLES, shown
    for variable, default in defaults.items():
        assert listed[variable] == f"default: {default}"
    assert listed["NATS_URL"].startswith("unset: ")
    assert listed["DATABASE_URL"].startswith("default: sqlite")
    # Each has its meaning under it.
    for variable in VARIABLES:
        after = shown.split(f"\n  {variable}  (", 1)[1].splitlines()[1]
        assert re.match(r"    \S", after), shown
