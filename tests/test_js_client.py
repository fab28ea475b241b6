"""The browser client: its node:test suites (tests/js/), run as part of the Python suite, and
the npm package (frontend/) that ships it."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

JS_TESTS = Path(__file__).with_name("js")
# Seconds for the whole node run (about 1 s when healthy); a hung test fails instead of hanging.
TIMEOUT = 120


# The suites mock Date with node:test's mock.timers, which Node.js has since 20.11.
NODE_MIN = (20, 11)


def node_or_skip() -> str:
    """The node binary, if new enough; else skip (fail under CI, which must run these)."""
    node = shutil.which("node")
    reason = "node is not on PATH"
    if node is not None:
        version = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
        found = tuple(int(part) for part in version.lstrip("v").split(".")[:2])
        if found >= NODE_MIN:
            return node
        reason = f"node {version} is older than {'.'.join(map(str, NODE_MIN))}"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the browser client's node tests, but {reason}")
    pytest.skip(f"{reason}: install Node.js 20.11+ to run tests/js/ (the browser client)")


def test_browser_client_passes_its_node_test_suites() -> None:
    node = node_or_skip()
    try:
        result = subprocess.run(
            [node, "--test", "--test-reporter=tap", str(JS_TESTS)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            cwd=JS_TESTS.parent.parent,
            env={**os.environ, "NO_COLOR": "1", "NODE_OPTIONS": ""},
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"node --test did not finish within {TIMEOUT}s:\n{exc.stdout}\n{exc.stderr}")
    assert result.returncode == 0, f"node --test failed:\n{result.stdout}\n{result.stderr}"
    # A run that found no test files exits 0 too: make sure the suites ran.
    passed = re.search(r"^# pass (\d+)$", result.stdout, re.MULTILINE)
    assert passed is not None, result.stdout
    assert int(passed.group(1)) > 0, result.stdout
    assert re.search(r"^# fail 0$", result.stdout, re.MULTILINE), result.stdout
    # The suites' benchmark figures (pytest -s shows them).
    for figure in re.findall(r"^\s*# (benchmark: .*)$", result.stdout, re.MULTILINE):
        print(figure)


# ---------------------------------------------------------------------------------------------
# The npm package (frontend/): the served files, packed byte for byte.

ROOT = JS_TESTS.parent.parent
FRONTEND = ROOT / "frontend"
STATIC = ROOT / "asgi_session_sync" / "static"
TSC = JS_TESTS / "node_modules" / ".bin" / "tsc"
# Seconds for `npm pack`, `node` and `tsc` runs (each takes about a second when healthy).
TOOL_TIMEOUT = 120


def tool_or_skip(name: str) -> str:
    """The named program on PATH; else skip (fail under CI)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must pack the browser client, but {name} is not on PATH")
        pytest.skip(f"{name} is not on PATH: install Node.js 20.11+ with npm")
    return path


def tsc_or_skip() -> Path:
    """tests/js's pinned TypeScript compiler; skip when not installed (fail under CI)."""
    if not TSC.exists():
        if os.environ.get("CI"):
            pytest.fail("CI must type-check the package: run `npm ci --prefix tests/js` first")
        pytest.skip("run `npm ci --prefix tests/js` to type-check the package")
    return TSC


def run(command: list[str], cwd: Path) -> str:
    """Run a tool, bounded; its stdout. Fails the test with both outputs when it fails."""
    try:
        result = subprocess.run(
            command,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT,
            env={**os.environ, "NO_COLOR": "1", "NODE_OPTIONS": ""},
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{command[:2]} did not finish within {TOOL_TIMEOUT}s:\n{exc.stderr}")
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


class Packed:
    """What `npm pack` made of frontend/: its report and the unpacked tarball."""

    def __init__(self, report: dict[str, Any], root: Path) -> None:
        self.report = report
        self.root = root  # the tarball's "package/" directory
        self.manifest: dict[str, Any] = json.loads((root / "package.json").read_text())

    @property
    def files(self) -> set[str]:
        """The paths in the tarball, relative to its package directory."""
        return {entry["path"] for entry in self.report["files"]}


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Packed:
    """frontend/ packed by `npm pack` (which runs its prepack build) into a temporary directory,
    and unpacked; skipped in an sdist, which does not carry frontend/."""
    if not FRONTEND.is_dir():
        pytest.skip("no frontend/ here (an sdist): the npm package is built from a clone")
    node_or_skip()
    npm = tool_or_skip("npm")
    out = tmp_path_factory.mktemp("npm-pack")
    # --silent keeps npm's own lines off stdout, so it holds the JSON report alone.
    stdout = run([npm, "pack", "--json", "--silent", "--pack-destination", str(out)], FRONTEND)
    [report] = json.loads(stdout)
    with tarfile.open(out / report["filename"]) as archive:
        archive.extractall(out / "unpacked", filter="data")
    return Packed(report, out / "unpacked" / "package")


def served_files() -> dict[str, bytes]:
    """The files the wheel serves from static/, by name."""
    return {path.name: path.read_bytes() for path in STATIC.iterdir() if path.is_file()}


def test_npm_pack_ships_the_served_client_byte_for_byte(packed: Packed) -> None:
    served = served_files()
    assert {
        "session-sync.js",
        "session-sync.d.ts",
        "session-sync-react.js",
        "session-sync-react.d.ts",
    } <= served.keys()
    assert packed.files == {
        "package.json",
        "README.md",
        "LICENSE",
        *(f"dist/{name}" for name in served),
    }
    for name, content in served.items():
        assert (packed.root / "dist" / name).read_bytes() == content, name
    assert (packed.root / "LICENSE").read_bytes() == (ROOT / "LICENSE").read_bytes()


def npm_version(python_version: str) -> str:
    """The npm (SemVer) spelling of a PEP 440 version: 0.1.0.dev0 is 0.1.0-dev.0."""
    release, _, dev = python_version.partition(".dev")
    return f"{release}-dev.{dev}" if dev else release


def test_package_json_is_an_es_module_with_types_and_no_runtime_dependencies(
    packed: Packed,
) -> None:
    import asgi_session_sync

    manifest = packed.manifest
    assert manifest["name"] == "asgi-session-sync"
    assert manifest["version"] == npm_version(asgi_session_sync.__version__)
    assert manifest["type"] == "module"
    assert manifest["license"] == "MIT"
    assert "dependencies" not in manifest
    assert "bundledDependencies" not in manifest
    # React only for the hook's entry point: optional, so the core installs without it.
    assert manifest["peerDependencies"] == {"react": ">=18"}
    assert manifest["peerDependenciesMeta"] == {"react": {"optional": True}}
    assert "private" not in manifest  # ready to publish
    exports = manifest["exports"]
    assert exports["."] == {
        "types": "./dist/session-sync.d.ts",
        "default": "./dist/session-sync.js",
    }
    assert exports["./react"] == {
        "types": "./dist/session-sync-react.d.ts",
        "default": "./dist/session-sync-react.js",
    }
    targets = [manifest["main"], manifest["types"]]
    for entry in exports.values():
        targets.extend([entry] if isinstance(entry, str) else entry.values())
    for target in targets:
        assert target.startswith("./"), target
        assert target[2:] in packed.files, target


def install(packed: Packed, app: Path, *dependencies: str) -> None:
    """Install the unpacked tarball into ``app``'s node_modules, with ``dependencies`` (linked
    from tests/js/node_modules) beside it."""
    modules = app / "node_modules"
    shutil.copytree(packed.root, modules / "asgi-session-sync")
    for name in dependencies:
        source = JS_TESTS / "node_modules" / name
        if not source.exists():
            if os.environ.get("CI"):
                pytest.fail(f"CI must run this test: run `npm ci --prefix tests/js` for {name}")
            pytest.skip(f"run `npm ci --prefix tests/js` for {name}")
        (modules / name).parent.mkdir(parents=True, exist_ok=True)
        (modules / name).symlink_to(source, target_is_directory=True)


def test_the_installed_package_resolves_under_node_through_its_exports(
    packed: Packed, tmp_path: Path
) -> None:
    # Without React: the core entry point has no dependency at all.
    node = node_or_skip()
    app = tmp_path / "app"
    install(packed, app)
    script = """
        const client = await import("asgi-session-sync");
        let deep = null;
        try {
            await import("asgi-session-sync/dist/session-sync.js");
        } catch (error) {
            deep = error.code;
        }
        console.log(JSON.stringify({
            resolved: import.meta.resolve("asgi-session-sync"),
            exports: Object.keys(client).sort(),
            deep,
        }));
    """
    found = json.loads(run([node, "--input-type=module", "--eval", script], app))
    assert found["resolved"].endswith("/node_modules/asgi-session-sync/dist/session-sync.js")
    assert {"SessionSync", "applyPatch", "asVersion", "compareVersions"} <= set(found["exports"])
    # Only what `exports` names is public: no reaching into dist/.
    assert found["deep"] == "ERR_PACKAGE_PATH_NOT_EXPORTED"


SERVER_RENDER = """
    import { createElement } from "react";
    import { renderToString } from "react-dom/server";
    import { useSessionSync } from "asgi-session-sync/react";

    function Status() {
        const { status, session, streaming } = useSessionSync("ws://127.0.0.1:9/ws/sessions/a");
        return createElement("p", null, `${status} ${session} ${streaming}`);
    }
    console.log(JSON.stringify({
        resolved: import.meta.resolve("asgi-session-sync/react"),
        html: renderToString(createElement(Status)),
    }));
"""


def test_the_react_entry_point_resolves_and_renders_on_the_server(
    packed: Packed, tmp_path: Path
) -> None:
    # The hook with React as the app's own dependency; rendering on the server (Next.js and
    # the like) runs no effect, so it opens nothing and touches no browser global.
    node = node_or_skip()
    app = tmp_path / "app"
    install(packed, app, "react", "react-dom", "scheduler")
    found = json.loads(run([node, "--input-type=module", "--eval", SERVER_RENDER], app))
    assert found["resolved"].endswith("/asgi-session-sync/dist/session-sync-react.js")
    assert found["html"] == "<p>connecting undefined false</p>"


CONSUMER = """
import { createElement } from "react";
import { SessionSync, applyPatch, type SessionPatch } from "asgi-session-sync";
import { useSessionSync, type SessionSyncView, type SessionStatus } from "asgi-session-sync/react";

interface Chat {
  title: string;
}

const sync = new SessionSync<Chat>({ url: "/ws/sessions/abc", onSession: (chat) => chat.title });
const title: string | undefined = sync.session?.title;
const next: Chat = applyPatch<Chat>({ title: "a" }, [{ op: "replace", path: "/title", value: 1 }]);
const patch: SessionPatch["type"] = "session_patch";

export function View() {
  const view: SessionSyncView<Chat> = useSessionSync<Chat>("/ws/sessions/abc", {
    isStreaming: (chat) => chat.title.endsWith("…"),
  });
  const status: SessionStatus = view.status;
  return createElement("p", { onClick: view.reconnect }, `${status} ${view.session?.title}`);
}
export { next, patch, title };
"""


@pytest.mark.parametrize("resolution", ["bundler", "node16"])
def test_the_installed_package_types_resolve_for_typescript(
    packed: Packed, tmp_path: Path, resolution: str
) -> None:
    # A TypeScript app that installed the tarball finds the declarations through `exports`'
    # "types" condition, as bundlers and Node.js ("node16") resolve it.
    tsc = tsc_or_skip()
    node = node_or_skip()
    app = tmp_path / "app"
    install(packed, app, "react", "@types/react")
    (app / "package.json").write_text(json.dumps({"type": "module", "private": True}))
    (app / "index.ts").write_text(CONSUMER)
    config = {
        "compilerOptions": {
            "target": "ES2022",
            "module": "ESNext" if resolution == "bundler" else "Node16",
            "moduleResolution": resolution,
            "lib": ["ES2022", "DOM"],
            "strict": True,
            "noEmit": True,
            "skipLibCheck": False,
            "types": [],
        },
        "files": ["index.ts"],
    }
    (app / "tsconfig.json").write_text(json.dumps(config))
    run([node, str(tsc), "-p", "."], app)


# ---------------------------------------------------------------------------------------------
# Under Node.js's built-in WebSocket, against the real API killed with SIGKILL and restarted.


class FollowingClient:
    """tests/js/follow-session.mjs in a Node.js process, its output lines read as they come."""

    def __init__(self, node: str, url: str, options: dict[str, Any]) -> None:
        builtin = subprocess.run(
            [node, "--eval", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"],
            timeout=TOOL_TIMEOUT,
            check=False,
        )
        # Node.js 20 has the WebSocket behind a flag; 22 and later by default.
        flags = [] if builtin.returncode == 0 else ["--experimental-websocket"]
        script = JS_TESTS / "follow-session.mjs"
        self.process = subprocess.Popen(
            [node, *flags, str(script), url, json.dumps(options)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "NO_COLOR": "1", "NODE_OPTIONS": ""},
        )
        self.records: list[dict[str, Any]] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, name="follow-session", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self.changed:
                self.records.append(json.loads(line))
                self.changed.notify_all()

    def states(self) -> list[dict[str, Any]]:
        """The state records so far: ``{"state", "attempt", "delay"}``."""
        with self.changed:
            return [record for record in self.records if "state" in record]

    def last(self, key: str) -> Any:
        """The latest value of ``key`` in the records (``state``, ``version``, ``session``)."""
        with self.changed:
            return next((r[key] for r in reversed(self.records) if key in r), None)

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float) -> float:
        """Wait up to ``timeout`` s until ``check()``; the seconds it took. Fails with the
        client's output when it does not come."""
        start = time.monotonic()
        with self.changed:
            if self.changed.wait_for(check, timeout):
                return time.monotonic() - start
            tail = self.records[-15:]
        pytest.fail(f"the client did not get {what} within {timeout}s; it printed: {tail}")

    def close(self) -> str:
        """SIGTERM (the client closes), bounded; its stderr."""
        self.process.terminate()
        try:
            _, stderr = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, stderr = self.process.communicate(timeout=10)
        self.reader.join(timeout=10)
        return stderr


class BlackHole:
    """A listener on 127.0.0.1:``port`` that accepts TCP connections and never answers, so a
    WebSocket handshake sent to it neither opens nor closes (a black-holed network, a stuck
    proxy). ``accepted`` counts the connections."""

    def __init__(self, port: int) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(16)
        self.listener.settimeout(0.1)  # so the accepting thread sees `closing` within 0.1 s
        self.held: list[socket.socket] = []
        self.accepted = threading.Condition()
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._accept, name="black-hole", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            with self.accepted:
                self.held.append(connection)
                self.accepted.notify_all()

    def wait_connections(self, count: int, timeout: float) -> bool:
        """Whether ``count`` connections came within ``timeout`` s."""
        with self.accepted:
            return self.accepted.wait_for(lambda: len(self.held) >= count, timeout)

    def close(self) -> None:
        self.closing.set()
        self.thread.join(timeout=5)
        self.listener.close()
        for connection in self.held:
            connection.close()


@pytest.mark.e2e
def test_under_node_websocket_the_client_outlives_kill_9_and_a_hanging_attempt(
    tmp_path: Path,
) -> None:
    # Node.js's WebSocket fires error and never close on a refused connection, and an attempt
    # to a listener that never answers stays CONNECTING: before the connect timeout, the client
    # stayed "reconnecting" for good after the first. Here it must end live and current.
    from e2e.answer_api import running_api

    node = node_or_skip()
    # Refused attempts are retried within the backoff (100 + 200 + 400 ms at most), well before
    # the 3 s connect timeout: an error without a close is given up at once, not timed out.
    options = {"connectTimeout": 3000, "minDelay": 100, "maxDelay": 1000, "jitter": 0.5}
    with running_api(tmp_path) as api:
        api.store.create("s1", "node")
        client = FollowingClient(node, f"ws://127.0.0.1:{api.port}/ws/sessions/s1", options)
        try:
            client.wait_for("the snapshot", lambda: client.last("version") == 1, 15)
            version = api.post_tokens("s1", 5)
            client.wait_for("the live patches", lambda: client.last("version") == version, 15)

            api.kill()
            client.wait_for("the drop", lambda: client.last("state") == "reconnecting", 15)
            before = len(client.states())
            # Refused attempts: each errors without a close, and is retried.
            client.wait_for(
                "three retries of refused attempts",
                lambda: sum(s["delay"] > 0 for s in client.states()[before:]) >= 3,
                2.5,
            )
            hole = BlackHole(api.port)
            try:
                # An attempt that hangs is abandoned after connectTimeout and retried.
                assert hole.wait_connections(2, 15), "the client never gave up a hanging attempt"
            finally:
                hole.close()
            [(_, _, version)] = api.store.append("s1", [" (written while the API was down)"])

            api.start()
            restarted = time.monotonic()
            stored = api.store.read("s1")
            client.wait_for(
                "the database's state after the restart",
                lambda: (
                    (client.last("version"), client.last("session")) == (stored[1], stored[0])
                    and client.last("state") == "live"
                ),
                15,
            )
            caught_up = time.monotonic() - restarted
            version = api.post_tokens("s1", 3, status="complete")
            stored = api.store.read("s1")
            client.wait_for(
                "the live patches after the restart",
                lambda: (client.last("version"), client.last("session")) == (version, stored[0]),
                15,
            )
        finally:
            stderr = client.close()
    assert stored[0]["answer"] == {
        "text": "token " * 5 + " (written while the API was down)" + "token " * 3,
        "status": "complete",
    }
    assert "Error" not in stderr.replace("ExperimentalWarning", ""), stderr
    print(f"node client: current {caught_up:.2f} s after the API was back")
