"""Each install the docs give works as written, in a fresh virtual environment.

README.md, docs/index.md and docs/getting-started.md give three ways to install the package
into an app's environment: from GitHub through pip's git support, from a clone (editable), and
from a wheel built with ``python -m build``. For each, this test makes a clean virtual
environment (``python -m venv``, without the system's site-packages), runs the documented
``pip install``, then the README quickstart's ``pip install fastapi uvicorn websockets``, saves
the quickstart's ``main.py``, serves it with ``uvicorn main:app`` from that environment, and
connects with the ``python -m websockets`` client the README shows: the owner's first frame is
the snapshot the README prints, and anyone else's socket is closed with 4403 and no frame.

Where the test differs from the pages, and why:

- GitHub cannot be reached from every CI machine, so the git install runs the same pip command
  on this checkout's own repository: ``git+file://localhost<checkout>@<HEAD commit>`` for
  ``git+https://github.com/...@main``. It is the same code path in pip (a VCS requirement with
  extras: clone, check out the revision, build in isolation, install). It installs the
  committed HEAD, not uncommitted changes, and is skipped where there is no ``.git`` (an
  unpacked sdist).
- The wheel is built once with ``python -m build --wheel --no-isolation``, with the dev
  environment's ``build`` and hatchling (as tests/test_packaging.py does), rather than an
  isolated ``python -m build`` that would fetch hatchling first.
- uvicorn listens on a free port rather than 8000.

Dependencies come from whatever package index pip is configured with; pip's cache makes a
rerun take seconds per environment. Without a reachable index the tests are skipped, except
under CI, where they fail. Every ``pip install`` on those pages is either run here or listed in
``NOT_RUN_HERE`` with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from e2e.app_process import free_port, wait_for_port
from test_doc_snippets import README, named

ROOT = Path(__file__).resolve().parents[1]
PAGES = (README, ROOT / "docs" / "index.md", ROOT / "docs" / "getting-started.md")

REPOSITORY = "https://github.com/asgi-session-sync/asgi-session-sync"  # [project.urls] Source
WHEEL = "dist/asgi_session_sync-0.1.0.dev0-py3-none-any.whl"
# The documented installs, exactly as the pages write them, and the extras each asks for.
INSTALLS = {
    "github": f'pip install "asgi-session-sync[nats] @ git+{REPOSITORY}@main"',
    "clone": "pip install -e '.[nats,sqlalchemy]'",
    "wheel": f'pip install "{WHEEL}[nats]"',
}
EXTRAS = {"github": ["nats"], "clone": ["nats", "sqlalchemy"], "wheel": ["nats"]}
QUICKSTART_INSTALL = "pip install fastapi uvicorn websockets"
NOT_RUN_HERE = {
    "pip install asgi-session-sync": "quoted as what does not work: the package is not on PyPI",
    "pip install build": "the wheel is built with the dev environment's build, offline",
    "pip install -e '.[dev]'": "the contributors' set-up, which CI itself runs (.ci/run)",
    "pip install -e '.[examples]'": "the clone install with a subset of [dev]'s extras",
}
# What each extra makes importable; an import error names the missing extra.
EXTRA_MODULES = {
    "nats": "asgi_session_sync.nats",
    "sqlalchemy": "asgi_session_sync.loaders.sqlalchemy",
}

VENV_TIMEOUT = 120  # seconds: python -m venv, which installs pip into it
PIP_TIMEOUT = 300  # seconds per pip command: a cold cache downloads every dependency
WAIT = 20  # seconds: uvicorn's start, and a client's whole conversation
ANSI = re.compile(r"\x1b(?:\[[0-9;]*[A-Za-z]|[78])")  # the interactive client's cursor codes


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def skip_or_fail(reason: str) -> None:
    """Skip, except under CI, which must run these tests."""
    if in_ci():
        pytest.fail(f"CI must run the install tests, but {reason}", pytrace=False)
    pytest.skip(reason)


def documented_pip_installs() -> set[str]:
    """Every ``pip install`` command on the pages: shell lines and inline code alike."""
    found = set()
    for page in PAGES:
        for match in re.finditer(r"pip install[^`\n]*", page.read_text(encoding="utf-8")):
            found.add(match.group().split(" #", 1)[0].strip())
    return found


def run(command: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> str:
    """Run ``command``; fail with its output unless it succeeds. Returns the output."""
    result = subprocess.run(
        command,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{shlex.join(command)} failed:\n{output[-4000:]}"
    return output


class FreshVenv:
    """A clean virtual environment, and the commands run in it as a user would run them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bin = path / "bin"
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"}
        }
        # As after `. venv/bin/activate`: its scripts come first.
        env.update(
            PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}",
            VIRTUAL_ENV=str(path),
            PYTHONUNBUFFERED="1",
            PIP_DISABLE_PIP_VERSION_CHECK="1",
        )
        self.env = env
        run(
            [sys.executable, "-m", "venv", str(path)],
            cwd=path.parent,
            env=env,
            timeout=VENV_TIMEOUT,
        )

    @property
    def python(self) -> str:
        return str(self.bin / "python")

    def pip_install(self, command: str, *, cwd: Path) -> None:
        """Run a documented ``pip install ...`` line with this environment's pip."""
        words = shlex.split(command)
        assert words[:2] == ["pip", "install"], command
        run([self.python, "-m", "pip", *words[1:]], cwd=cwd, env=self.env, timeout=PIP_TIMEOUT)


def printed(raw: str) -> str:
    """A line of the interactive client's output as a terminal shows it, without its codes."""
    return ANSI.sub("", raw).rsplit("\r", 1)[-1].strip()


def websockets_client(venv: FreshVenv, url: str) -> list[str]:
    """Run ``python -m websockets URL`` as the README does; return what it printed, by line.

    stdin stays open until the first frame arrives or the server closes (an interactive user
    leaving with Ctrl+D); the client then exits. A watchdog kills it after ``WAIT`` seconds,
    which ends its output, so every read is bounded.
    """
    lines: list[str] = []
    with subprocess.Popen(
        [venv.python, "-m", "websockets", url],
        env=venv.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as client:
        assert client.stdin is not None
        assert client.stdout is not None
        watchdog = threading.Timer(WAIT, client.kill)
        watchdog.start()
        try:
            for raw in client.stdout:
                lines.append(printed(raw))
                if lines[-1].startswith(("< ", "Connection closed")):
                    break
            client.stdin.close()  # Ctrl+D
            lines.extend(printed(raw) for raw in client.stdout)
            client.wait()  # still bounded by the watchdog
        finally:
            watchdog.cancel()
            if client.poll() is None:  # a failure above: leave nothing running
                client.kill()
    assert client.returncode == 0, (
        f"python -m websockets exited with {client.returncode} (-9: killed after {WAIT}s):\n"
        + "\n".join(lines)
    )
    return [line for line in lines if line not in ("", ">")]


def readme_quickstart() -> tuple[str, str, list[str]]:
    """The README quickstart's ``main.py``, the URL it connects to, and the output it shows."""
    text = README.read_text(encoding="utf-8")
    assert re.search(r"^uvicorn main:app$", text, re.M), "README: no `uvicorn main:app`"
    url = re.search(r'^python -m websockets "(ws://127\.0\.0\.1:8000/[^"]+)"$', text, re.M)
    assert url is not None, "README: no `python -m websockets` command"
    shown = re.search(r"```text\n(Connected to ws://.*?)^```", text, re.M | re.S)
    assert shown is not None, "README: no client output shown"
    return named(README, "main").source, url[1], shown[1].splitlines()


def serve_quickstart_and_connect(venv: FreshVenv, app_dir: Path) -> None:
    """Serve the README's ``main.py`` with uvicorn from ``venv``; connect as its owner and not."""
    source, readme_url, shown = readme_quickstart()
    (app_dir / "main.py").write_text(source, encoding="utf-8")
    port = free_port()
    log = app_dir / "uvicorn.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            [str(venv.bin / "uvicorn"), "main:app", "--port", str(port)],
            cwd=app_dir,
            env=venv.env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            wait_for_port(port, WAIT, server)
        except TimeoutError as exc:
            pytest.fail(f"uvicorn main:app did not start: {exc}\n{log.read_text()}")
        owner_url = readme_url.replace(":8000/", f":{port}/")
        assert owner_url != readme_url
        owner = websockets_client(venv, owner_url)
        # As the README shows it, but for the port: connected, then the snapshot first.
        assert owner[:2] == [line.replace(":8000/", f":{port}/") for line in shown], owner
        frame = json.loads(owner[1].removeprefix("< "))
        assert (frame["type"], frame["owner"], frame["version"]) == ("session_update", "alice", 1)
        assert owner[-1] == "Connection closed: 1000 (OK).", owner
        # No token: the loader refuses, the route closes, and no frame comes before the close.
        anyone = websockets_client(venv, owner_url.split("?", 1)[0])
        assert not [line for line in anyone if line.startswith("< ")], anyone
        assert anyone[-1].startswith("Connection closed: 4403"), anyone
    finally:
        server.terminate()
        try:
            server.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def package_index(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip (fail under CI) when pip cannot fetch from its configured package index."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--dest",
            str(tmp_path_factory.mktemp("probe")),
            "anyio",
        ],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        skip_or_fail(f"pip cannot download from its package index:\n{result.stderr[-2000:]}")


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding ``dist/<the wheel>``, built from this checkout."""
    out = tmp_path_factory.mktemp("built")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o", str(out / "dist")],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=PIP_TIMEOUT,
    )
    return out


@pytest.fixture
def venv(tmp_path: Path) -> Iterator[FreshVenv]:
    """A clean virtual environment, removed after the test (each takes 60 to 100 MB)."""
    fresh = FreshVenv(tmp_path / "venv")
    yield fresh
    shutil.rmtree(fresh.path, ignore_errors=True)


def git_url_of_this_checkout() -> str:
    """``git+file://`` of this checkout's repository at its HEAD commit, for the GitHub URL."""
    if shutil.which("git") is None:
        skip_or_fail("git is not installed")
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    # pip's requirement parser wants a host in a URL: file://localhost/path, which git reads.
    return f"git+file://localhost{ROOT.as_posix()}@{commit}"


def test_every_documented_pip_install_is_run_here_or_says_why_not() -> None:
    documented = documented_pip_installs()
    run_here = {*INSTALLS.values(), QUICKSTART_INSTALL}
    assert documented - run_here - NOT_RUN_HERE.keys() == set()
    assert run_here <= documented, "a command this test runs is no longer documented"


def test_the_git_url_is_the_projects_repository() -> None:
    urls = dict(
        entry.split(", ", 1)
        for entry in metadata.metadata("asgi-session-sync").get_all("Project-URL") or []
    )
    assert urls["Source"] == REPOSITORY


@pytest.mark.e2e
@pytest.mark.usefixtures("package_index")
@pytest.mark.parametrize(
    "way",
    [
        pytest.param(
            "github",
            marks=pytest.mark.skipif(
                not (ROOT / ".git").exists(), reason="not a git checkout (an unpacked sdist)"
            ),
        ),
        "clone",
        "wheel",
    ],
)
def test_documented_install_serves_the_quickstart(
    way: str, venv: FreshVenv, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    command = INSTALLS[way]
    if way == "github":
        command = command.replace(f"git+{REPOSITORY}@main", git_url_of_this_checkout())
        cwd = app_dir
    elif way == "clone":
        cwd = ROOT
    else:
        cwd = request.getfixturevalue("built_wheel")
        built = [path.name for path in (cwd / "dist").glob("*.whl")]
        assert built == [Path(WHEEL).name], "the docs name another wheel than the build makes"
    venv.pip_install(command, cwd=cwd)
    venv.pip_install(QUICKSTART_INSTALL, cwd=app_dir)

    # The package and each extra import, from the environment (the clone: from the checkout).
    where = run(
        [
            venv.python,
            "-c",
            "import importlib, sys; import asgi_session_sync as p; "
            "[importlib.import_module(m) for m in sys.argv[1:]]; print(p.__file__)",
            *(EXTRA_MODULES[extra] for extra in EXTRAS[way]),
        ],
        cwd=app_dir,
        env=venv.env,
        timeout=WAIT,
    )
    home = ROOT if way == "clone" else venv.path
    assert Path(where.strip()).resolve().is_relative_to(home.resolve()), where
    serve_quickstart_and_connect(venv, app_dir)
