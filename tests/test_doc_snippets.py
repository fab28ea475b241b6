"""Every Python snippet in the README and the getting-started page runs as written.

Snippets are found generically: every fenced ```python (or ```py) block and every ```pycon
block of each page in ``PAGES``, indented ones (MkDocs tabs) included, so a snippet added or
edited later is covered without touching this file. How a snippet runs is said by an HTML
comment on the line right above its fence, which neither GitHub nor MkDocs shows:

- No comment: the snippet runs on its own, as a fresh module. It must be complete.
- ``<!-- snippet: name=NAME -->`` names it. Other snippets can build on it (``after=NAME``),
  and it is saved as ``NAME.py`` next to the page's other named snippets, so a test snippet can
  import it (``from main import app``).
- ``<!-- snippet: after=NAME -->`` runs it in a copy of the namespace left by snippet NAME
  (and whatever NAME ran after). This is for fragments that continue another snippet, such as
  the README's one-line fix, or the framework tabs that use the page's loader.
- A snippet named ``test_*`` is a pytest file: it runs under pytest, in a subprocess, in the
  directory of the page's saved snippets, and must pass.
- A ``pycon`` snippet is a doctest, run in a fresh namespace or the one ``after=`` names.

Options can be combined: ``<!-- snippet: name=starlette_app after=loader -->``.
"""

from __future__ import annotations

import doctest
import itertools
import os
import re
import subprocess
import sys
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from asgi_session_sync import SessionContext, SessionSync, SessionSyncMiddleware, Snapshot
from asgi_session_sync.testing import WebSocketClosed, WebSocketRejected, connect_websocket

ROOT = Path(__file__).resolve().parents[1]
PAGES = (ROOT / "README.md", ROOT / "docs" / "getting-started.md")

# A fenced block, possibly indented (inside an MkDocs tab); the closing fence has the same indent.
BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<language>python|py|pycon)[ \t]*\n"
    r"(?P<body>.*?)"
    r"^(?P=indent)```[ \t]*$",
    flags=re.MULTILINE | re.DOTALL,
)
ANY_OPENING_FENCE = re.compile(r"^[ \t]*```(?:python|py|pycon)[ \t]*$", flags=re.MULTILINE)
DIRECTIVE = re.compile(r"^<!--\s*snippet:(?P<options>.*?)-->$")
OPTIONS = frozenset({"name", "after"})
SUBPROCESS_TIMEOUT = 120  # seconds, for a test snippet's pytest run
MODULE_NUMBERS = itertools.count()


@dataclass(frozen=True)
class Snippet:
    """One fenced block of a page, and how it runs."""

    page: Path
    line: int  # 1-based line of the block's first line of code
    language: str  # "python" or "pycon"
    source: str  # dedented
    name: str | None
    after: str | None

    @property
    def id(self) -> str:
        label = f"{self.page.name}:{self.line}"
        return f"{label}:{self.name}" if self.name else label


def parse_directive(page: Path, line: int, text: str) -> dict[str, str]:
    """The ``key=value`` options of a ``<!-- snippet: ... -->`` comment; unknown keys fail."""
    match = DIRECTIVE.match(text.strip())
    if match is None:
        return {}
    options = dict(item.split("=", 1) for item in match["options"].split())
    unknown = set(options) - OPTIONS
    if unknown:
        raise ValueError(f"{page}:{line}: unknown snippet options {sorted(unknown)}")
    return options


def extract(page: Path) -> list[Snippet]:
    """Every Python snippet of ``page``, in page order."""
    text = page.read_text(encoding="utf-8")
    snippets = []
    for match in BLOCK.finditer(text):
        code_line = text.count("\n", 0, match.start("body")) + 1
        before = text[: match.start()].rstrip().rsplit("\n", 1)[-1]
        options = parse_directive(page, code_line - 1, before)
        snippets.append(
            Snippet(
                page=page,
                line=code_line,
                language="pycon" if match["language"] == "pycon" else "python",
                source=textwrap.dedent(match["body"]),
                name=options.get("name"),
                after=options.get("after"),
            )
        )
    # A block whose closing fence is mis-indented would silently not match: count the fences.
    fences = len(ANY_OPENING_FENCE.findall(text))
    assert len(snippets) == fences, f"{page}: {fences} python fences, {len(snippets)} parsed"
    return snippets


SNIPPETS = [snippet for page in PAGES for snippet in extract(page)]


def named(page: Path, name: str) -> Snippet:
    """The snippet called ``name`` on ``page``."""
    found = [s for s in SNIPPETS if s.page == page and s.name == name]
    assert len(found) == 1, f"{page.name}: {len(found)} snippets named {name!r}"
    return found[0]


def namespace_before(snippet: Snippet) -> dict[str, Any]:
    """A fresh namespace, or a copy of the one the ``after=`` snippet left."""
    if snippet.after is None:
        return {}
    return dict(run_python(named(snippet.page, snippet.after)))


def run_python(snippet: Snippet) -> dict[str, Any]:
    """Execute a python snippet as a module of its own; return the namespace it leaves.

    The module stays in ``sys.modules`` under a unique name, as an imported module would:
    frameworks look up their handlers' modules there (Litestar resolves annotations with it).
    """
    module = types.ModuleType(f"snippet_{next(MODULE_NUMBERS)}_{snippet.name or snippet.line}")
    namespace = namespace_before(snippet)
    namespace.update(__name__=module.__name__, __file__=str(snippet.page))
    module.__dict__.update(namespace)
    sys.modules[module.__name__] = module
    # Padded so that a traceback's line numbers are the page's.
    code = compile("\n" * (snippet.line - 1) + snippet.source, str(snippet.page), "exec")
    exec(code, module.__dict__)
    return module.__dict__


def run_doctest(snippet: Snippet) -> None:
    """Run a pycon snippet as a doctest; fail with doctest's report."""
    parser = doctest.DocTestParser()
    test = parser.get_doctest(
        snippet.source, namespace_before(snippet), snippet.id, str(snippet.page), snippet.line - 1
    )
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    result = runner.run(test, out=report.append)
    assert result.failed == 0, "".join(report)
    assert result.attempted > 0, f"{snippet.id}: no examples in the pycon block"


def run_pytest_file(snippet: Snippet, directory: Path) -> None:
    """Save the page's named snippets in ``directory``, then run this one under pytest."""
    for other in SNIPPETS:
        if other.page == snippet.page and other.name and other.language == "python":
            (directory / f"{other.name}.py").write_text(other.source, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(directory)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{snippet.name}.py"],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"\b\d+ passed\b", output), output


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_snippet_runs_as_written(snippet: Snippet, tmp_path: Path) -> None:
    if snippet.language == "pycon":
        run_doctest(snippet)
    elif snippet.name is not None and snippet.name.startswith("test_"):
        run_pytest_file(snippet, tmp_path)
    else:
        run_python(snippet)


def test_every_page_has_snippets() -> None:
    for page in PAGES:
        assert any(s.page == page for s in SNIPPETS), f"no python snippets found in {page}"


def test_directive_with_an_unknown_option_is_refused(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- snippet: nmae=typo -->\n```python\nx = 1\n```\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown snippet options"):
        extract(page)


def test_indented_block_and_its_directive_are_found(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        '=== "Tab"\n\n    <!-- snippet: name=tab after=base -->\n    ```python\n    x = 1\n'
        "    ```\n",
        encoding="utf-8",
    )
    [snippet] = extract(page)
    assert (snippet.name, snippet.after, snippet.source, snippet.line) == (
        "tab",
        "base",
        "x = 1\n",
        5,
    )


# What the snippets do, beyond running: the README's complete app checks the owner.

README, GETTING_STARTED = PAGES


def readme_app() -> Any:
    """A fresh copy of the README's complete FastAPI app (one per test: one per event loop)."""
    return run_python(named(README, "main"))["app"]


@pytest.mark.anyio
async def test_readme_app_sends_the_owner_the_snapshot_first() -> None:
    async with connect_websocket(readme_app(), "/ws/sessions/demo?token=alice-token") as ws:
        assert await ws.receive_json() == {
            "type": "session_update",
            "session_id": "demo",
            "owner": "alice",
            "session": {"title": "Demo", "interactions": []},
            "version": 1,
        }
        await ws.send_text("ping")
        assert await ws.receive_text() == "ping"


@pytest.mark.anyio
@pytest.mark.parametrize("query", ["", "?token=mallory", "?token="])
async def test_readme_app_sends_nothing_to_anyone_but_the_owner(query: str) -> None:
    async with connect_websocket(readme_app(), f"/ws/sessions/demo{query}") as ws:
        message = await ws.receive()
    assert message["type"] == "websocket.close"
    assert message["code"] == 4403


@pytest.mark.anyio
async def test_readme_app_sends_nothing_for_an_unknown_session() -> None:
    async with connect_websocket(readme_app(), "/ws/sessions/nope?token=alice-token") as ws:
        message = await ws.receive()
    assert (message["type"], message["code"]) == ("websocket.close", 4403)


# The getting-started page: its loader checks the owner, so each tab sends alice her session and
# sends bob, who is logged in too, nothing.


@pytest.mark.anyio
async def test_getting_started_loader_loads_a_session_for_its_owner_only() -> None:
    load_session = run_python(named(GETTING_STARTED, "loader"))["load_session"]

    async def load(session_id: str, user: Any) -> Snapshot | None:
        snapshot: Snapshot | None = await load_session(
            SessionContext(session_id=session_id, scope={}, user=user)
        )
        return snapshot

    snapshot = await load("demo", "alice")
    assert snapshot is not None
    assert (snapshot.owner, snapshot.version) == ("alice", 1)
    assert await load("demo", "bob") is None
    assert await load("demo", None) is None
    assert await load("nope", "alice") is None


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("query", "user"), [("?token=alice-token", "alice"), ("?token=bob-token", "bob"), ("", None)]
)
async def test_getting_started_authenticate_reads_the_token(query: str, user: str | None) -> None:
    authenticate = run_python(named(GETTING_STARTED, "auth"))["authenticate"]
    scope = {"type": "websocket", "query_string": query.lstrip("?").encode()}
    assert await authenticate(scope) == user


FRAMEWORK_TABS = ["fastapi_app", "starlette_app", "litestar_app", "quart_app", "raw_asgi_app"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # Quart runs on asyncio only
@pytest.mark.parametrize("name", FRAMEWORK_TABS)
@pytest.mark.anyio
async def test_getting_started_tab_sends_the_owner_the_snapshot_first(name: str) -> None:
    app = run_python(named(GETTING_STARTED, name))["app"]
    async with connect_websocket(app, "/ws/sessions/demo?token=alice-token") as ws:
        event = await ws.receive_json()
        await ws.disconnect()
    assert (event["type"], event["session_id"], event["owner"], event["version"]) == (
        "session_update",
        "demo",
        "alice",
        1,
    )


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("query", ["?token=bob-token", ""])
@pytest.mark.parametrize("name", FRAMEWORK_TABS)
@pytest.mark.anyio
async def test_getting_started_tab_sends_anyone_else_no_snapshot(name: str, query: str) -> None:
    app = run_python(named(GETTING_STARTED, name))["app"]
    async with connect_websocket(app, f"/ws/sessions/demo{query}") as ws:
        # The tabs accept everyone; the loader refused, so nothing was sent before or after.
        await ws.disconnect()
        await ws.wait_app_done()
        with pytest.raises(WebSocketClosed):
            await ws.receive()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_getting_started_route_hands_its_user_to_the_loader() -> None:
    namespace = run_python(named(GETTING_STARTED, "fastapi_accept"))
    users: list[Any] = []

    async def loader(ctx: SessionContext) -> Snapshot | None:
        users.append(ctx.user)
        snapshot: Snapshot | None = await namespace["load_session"](ctx)
        return snapshot

    namespace["sync"] = SessionSync(loader)  # the route reads the module's global
    app = namespace["app"]
    async with connect_websocket(app, "/ws/sessions/demo?token=alice-token") as ws:
        event = await ws.receive_json()
        await ws.disconnect()
    assert (event["type"], event["version"]) == ("session_update", 1)
    assert users == ["alice"]
    # Another user: the loader refuses, so the route closes with 1008 and no snapshot before it.
    async with connect_websocket(app, "/ws/sessions/demo?token=bob-token") as ws:
        message = await ws.receive()
    assert (message["type"], message["code"]) == ("websocket.close", 1008)
    assert users == ["alice", "bob"]
    # No user: the dependency refuses before accepting, and the loader is never asked.
    with pytest.raises(WebSocketRejected) as rejected:
        async with connect_websocket(app, "/ws/sessions/demo?token=nobody"):
            pass
    assert rejected.value.code == 1008
    assert users == ["alice", "bob"]


# What the pages claim about where authentication goes. Starlette's AuthenticationMiddleware in
# either order is tested in tests/test_frameworks.py; this is the reason to put it outside.


def copying_auth(app: Any) -> Any:
    """An auth middleware that hands the app a copy of the scope with the user in it."""

    async def middleware(scope: Any, receive: Any, send: Any) -> None:
        await app({**scope, "user": "alice"}, receive, send)

    return middleware


@pytest.mark.anyio
async def test_auth_that_copies_the_scope_is_seen_from_outside_only() -> None:
    users: list[Any] = []

    async def endpoint(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await receive()

    async def loader(ctx: SessionContext) -> Snapshot:
        users.append(ctx.user)
        return Snapshot({}, version=1)

    def session_sync(app: Any) -> SessionSyncMiddleware:
        return SessionSyncMiddleware(app, loader=loader, paths=["/ws/{session_id}"])

    for app in (copying_auth(session_sync(endpoint)), session_sync(copying_auth(endpoint))):
        async with connect_websocket(app, "/ws/s1") as ws:
            await ws.receive_json()
            await ws.disconnect()
    assert users == ["alice", None]  # outside: seen; inside: the copy never reaches the middleware
