"""The React hook (static/session-sync-react.js) in a real Chromium, following a session of a
real API (tests/e2e/answer_api.py) that is killed with SIGKILL and restarted, over a WebSocket
and over Server-Sent Events.

No bundler: React's own CommonJS builds, installed in tests/js/node_modules, are wrapped as ES
modules and named in an import map, as a Vite-free page maps the ESM builds a CDN serves; the
hook is imported from the path the Python package serves it at.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .answer_api import AnswerApi, running_api

pytestmark = pytest.mark.e2e

NODE_MODULES = Path(__file__).resolve().parents[1] / "js" / "node_modules"
WAIT_MS = 15_000  # every wait for the page, in ms

# Each module the page imports: React's production build of it, and what that file requires.
VENDOR = {
    "react": ("react/cjs/react.production.js", []),
    "scheduler": ("scheduler/cjs/scheduler.production.js", []),
    "react-dom": ("react-dom/cjs/react-dom.production.js", ["react"]),
    "react-dom/client": (
        "react-dom/cjs/react-dom-client.production.js",
        ["react", "react-dom", "scheduler"],
    ),
}

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>useSessionSync</title>
<script type="importmap">IMPORT_MAP</script>
<div id="root"></div>
<script type="module">
import { createElement as h, useEffect } from "react";
import { createRoot } from "react-dom/client";
import { useSessionSync } from "/static/session-sync/session-sync-react.js";

// Animation frames since the page loaded, and one record per committed render.
window.frame = 0;
const count = () => {
  window.frame++;
  requestAnimationFrame(count);
};
requestAnimationFrame(count);
window.commits = [];
window.statuses = []; // every status, as onStatus reports it (not batched)

const transport = new URLSearchParams(location.search).get("transport");
const url = transport === "sse" ? "/sse/sessions/s1" : "/ws/sessions/s1";

function Answer() {
  const view = useSessionSync(url, {
    transport,
    minDelay: 100,
    maxDelay: 1000,
    connectTimeout: 3000,
    heartbeatInterval: 1000,
    isStreaming: (session) => session.answer.status === "streaming",
    onStatus: (status) => window.statuses.push(status),
  });
  window.view = view;
  const frame = window.frame; // the animation frame this render follows
  useEffect(() => {
    const { status, version, streaming } = view;
    window.commits.push({ frame, status, version, streaming });
  });
  const text = view.session === undefined ? "" : view.session.answer.text;
  return h(
    "article",
    null,
    h("p", { id: "status" }, view.status),
    view.streaming ? h("p", { id: "streaming" }, "answering…") : null,
    h("pre", { id: "text" }, text),
  );
}

createRoot(document.getElementById("root")).render(h(Answer));
</script>
"""


def as_es_module(source: str, requires: list[str], names: list[str]) -> str:
    """A CommonJS file as an ES module: its ``require`` calls become imports, its exports the
    module's default and named exports."""
    imports = "".join(f'import dep{i} from "{name}";\n' for i, name in enumerate(requires))
    table = ", ".join(f'"{name}": dep{i}' for i, name in enumerate(requires))
    return (
        f"{imports}const module = {{ exports: {{}} }};\n"
        'const process = { env: { NODE_ENV: "production" } };\n'
        f"const require = (name) => ({{ {table} }})[name];\n"
        f"(function (module, exports, require, process) {{\n{source}\n}})"
        "(module, module.exports, require, process);\n"
        "export default module.exports;\n"
        f"export const {{ {', '.join(names)} }} = module.exports;\n"
    )


def export_names() -> dict[str, list[str]]:
    """The names each vendored module exports, as Node.js loads React's production builds."""
    script = (
        "const names = {};"
        f"for (const name of {json.dumps(list(VENDOR))}) names[name] = Object.keys(require(name));"
        "console.log(JSON.stringify(names));"
    )
    result = subprocess.run(
        ["node", "--eval", script],
        cwd=NODE_MODULES.parent,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NODE_ENV": "production", "NODE_OPTIONS": ""},
        check=True,
    )
    names: dict[str, list[str]] = json.loads(result.stdout)
    return names


@pytest.fixture
def pages(tmp_path: Path) -> Path:
    """The page above and React as ES modules, in a directory the API serves at /pages/."""
    if not (NODE_MODULES / "react-dom").is_dir():
        if os.environ.get("CI"):
            pytest.fail("CI must run the hook's browser test: run `npm ci --prefix tests/js`")
        pytest.skip("run `npm ci --prefix tests/js` for React")
    directory = tmp_path / "pages"
    vendor = directory / "vendor"
    vendor.mkdir(parents=True)
    names = export_names()
    imports = {}
    for name, (path, requires) in VENDOR.items():
        file_name = name.replace("/", "-") + ".js"
        source = (NODE_MODULES / path).read_text(encoding="utf-8")
        (vendor / file_name).write_text(as_es_module(source, requires, names[name]))
        imports[name] = f"/pages/vendor/{file_name}"
    page = PAGE.replace("IMPORT_MAP", json.dumps({"imports": imports}))
    (directory / "react.html").write_text(page, encoding="utf-8")
    return directory


@pytest.fixture
def api(tmp_path: Path, pages: Path) -> Iterator[AnswerApi]:
    with running_api(tmp_path, pages=pages, heartbeat=1) as api:
        api.store.create("s1", "react")
        yield api


def wait_view(page: Any, condition: str, arg: object = None) -> None:
    """Wait until ``condition`` (a JS expression over ``view`` and ``arg``) holds."""
    page.wait_for_function(
        f"(arg) => {{ const view = window.view; return view !== undefined && ({condition}); }}",
        arg=arg,
        timeout=WAIT_MS,
    )


def stored(api: AnswerApi) -> tuple[str, int]:
    """The answer's text and the session's version, as the database has them."""
    found = api.store.read("s1")
    assert found is not None
    return found[0]["answer"]["text"], found[1]


STREAMED = 200  # deltas published 2 ms apart, about 8 per animation frame
BURST = 200  # deltas published back to back


@pytest.mark.parametrize("transport", ["websocket", "sse"])
def test_react_page_follows_a_session_through_kill_9_rendering_once_per_frame(
    browser: Any, api: AnswerApi, transport: str
) -> None:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto(f"{api.url}/pages/react.html?transport={transport}")
        wait_view(page, "view.status === 'live' && view.version === 1 && view.streaming")

        # Deltas faster than the screen refreshes, as a model streams tokens: at most one
        # render per animation frame, so far fewer renders than deltas.
        before = page.evaluate("window.commits.length")
        version = api.post_tokens("s1", STREAMED, interval_ms=2)
        wait_view(page, "view.version === arg", version)
        streamed = page.evaluate("(before) => window.commits.slice(before)", before)
        # A burst published at once.
        before = page.evaluate("window.commits.length")
        version = api.post_tokens("s1", BURST)
        wait_view(page, "view.version === arg", version)
        burst = page.evaluate("(before) => window.commits.slice(before)", before)
        text, _ = stored(api)
        assert page.text_content("#text") == text == "token " * (STREAMED + BURST)

        # kill -9: the page says stale, keeps what it shows, and comes back equal to the
        # database, which changed while the API was down.
        api.kill()
        wait_view(page, "view.status === 'stale'")
        assert page.text_content("#text") == text
        assert page.is_visible("#streaming")
        api.store.append("s1", [" (written while the API was down)"])
        api.start()
        text, version = stored(api)
        wait_view(page, "view.status === 'live' && view.version === arg", version)
        assert page.text_content("#text") == text

        # Live deltas after the restart, whose offsets count UTF-16 code units ("👍🏽" is 4);
        # the answer completes, so nothing streams.
        version = api.post_tokens("s1", 3, text="👍🏽 ", status="complete")
        wait_view(page, "view.version === arg && !view.streaming", version)
        text, _ = stored(api)
        assert page.text_content("#text") == text

        # reconnect(): stale for a moment (maybe too short for a frame to show it), then live.
        marker = page.evaluate("window.statuses.length")
        page.evaluate("window.view.reconnect()")
        wait_view(page, "window.statuses.length > arg + 1 && view.status === 'live'", marker)
        reconnected = page.evaluate("(marker) => window.statuses.slice(marker)", marker)
        commits = page.evaluate("window.commits")
        statuses = page.evaluate("window.statuses")
    finally:
        page.close()

    assert errors == []
    down = " (written while the API was down)"
    assert text == "token " * (STREAMED + BURST) + down + "👍🏽 " * 3
    assert statuses == ["connecting", "live", "stale", "live", "stale", "live"]
    assert reconnected == ["stale", "live"]
    assert {commit["status"] for commit in commits} == {"connecting", "live", "stale"}
    assert commits[-1]["version"] == version
    # Each render follows an animation frame of its own: never two renders in one frame.
    frames = [commit["frame"] for commit in streamed]
    spanned = frames[-1] - frames[0] + 1
    assert len(frames) == len(set(frames)), f"two renders after one frame: {streamed}"
    assert len(streamed) <= STREAMED // 2, f"{len(streamed)} renders for {STREAMED} deltas"
    # Back to back, the deltas still take tens of ms through NATS and the socket: a few frames.
    frames = [commit["frame"] for commit in burst]
    assert len(frames) == len(set(frames)), f"two renders after one frame: {burst}"
    assert 1 <= len(burst) <= BURST // 10, f"{len(burst)} renders for a burst of {BURST} deltas"
    print(
        f"react hook over {transport}: {STREAMED} deltas 2 ms apart, {len(streamed)} renders"
        f" over {spanned} animation frames; {BURST} deltas at once, {len(burst)} renders"
    )
