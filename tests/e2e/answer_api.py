"""A small real API for the browser client's end-to-end tests, in a process of its own.

Tests start it (``python -m e2e.answer_api``, from ``tests/``), SIGKILL it and start it again on
the same port while a client (the shipped client under Node.js, or a page in Chromium) follows a
session, and check that the client ends on what the database holds. It is the library as an app
uses it, with nothing mocked: a SQLite file is the truth, :class:`~asgi_session_sync.SessionSync`
sends each connection its snapshot (resuming from ``since`` or ``Last-Event-ID``), and a
:class:`~asgi_session_sync.nats.NatsBridge` over a real nats-server carries the live patches.

A session is ``{"title": ..., "answer": {"text": ..., "status": ...}}``; its answer grows by
``append`` patches, as a streamed LLM answer does. Routes:

- ``/ws/sessions/{session_id}``: a WebSocket, the snapshot then live updates.
- ``GET /sse/sessions/{session_id}``: the same as Server-Sent Events.
- ``POST /sessions/{session_id}/tokens?count=N&text=T&status=S&interval_ms=I``: appends ``T``
  to the answer ``N`` times in one transaction, one version each (and sets the status to ``S``
  with the last one, when given), then publishes the ``N`` patches, back to back or ``I`` ms
  apart (a model's pace); answers ``{"version": v}``.
- ``/static/session-sync/``: the shipped client (``STATIC_DIR``); ``/pages/``: the files of
  ``PAGES_DIR``, when set (the tests' pages).

Configured by the environment: ``PORT``, ``DATABASE`` (the SQLite file), ``NATS_URL``,
``PAGES_DIR`` (optional), ``HEARTBEAT`` (seconds, optional).

:class:`AnswerApi` is the tests' side: the process, its nats-server and its database.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing, contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from asgi_session_sync import SessionContext, SessionSync, Snapshot
from asgi_session_sync._types import Receive, Scope, Send
from asgi_session_sync.client import STATIC_DIR
from asgi_session_sync.nats import NatsBridge
from asgi_session_sync.protocol import utf16_length

from .app_process import ROOT, NatsProcess, ServerProcess, free_port

Patch = tuple[list[dict[str, Any]], int, int]
"""One committed change: its operations, its base version and its version."""


class Store:
    """The sessions, in a SQLite file: each a JSON state and a version, changed in transactions.

    Opened per call (the API and a test write the same file from two processes).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS sessions"
                " (id TEXT PRIMARY KEY, state TEXT NOT NULL, version INTEGER NOT NULL)"
            )

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: transactions are the explicit BEGIN IMMEDIATE ... COMMIT below.
        with closing(sqlite3.connect(self.path, timeout=10, isolation_level=None)) as db:
            yield db

    def create(self, session_id: str, title: str, version: int = 1) -> None:
        """A session with an empty answer that is streaming."""
        state = {"title": title, "answer": {"text": "", "status": "streaming"}}
        with self._connect() as db:
            db.execute(
                "INSERT INTO sessions (id, state, version) VALUES (?, ?, ?)",
                (session_id, json.dumps(state), version),
            )

    def read(self, session_id: str) -> tuple[dict[str, Any], int] | None:
        """The session's state and version, or ``None`` when there is no such session."""
        with self._connect() as db:
            row = db.execute(
                "SELECT state, version FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
        return None if row is None else (json.loads(row[0]), int(row[1]))

    def append(self, session_id: str, texts: list[str], status: str | None = None) -> list[Patch]:
        """Append each of ``texts`` to the answer, one version each, in one transaction.

        Returns the patch of each version, in order. With ``status``, the last one also sets the
        answer's status.

        Raises:
            KeyError: There is no such session.
        """
        patches: list[Patch] = []
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT state, version FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
            if row is None:
                db.execute("ROLLBACK")
                raise KeyError(session_id)
            state, version = json.loads(row[0]), int(row[1])
            answer = state["answer"]
            for index, text in enumerate(texts):
                offset = utf16_length(answer["text"])
                answer["text"] += text
                operations: list[dict[str, Any]] = [
                    {"op": "append", "path": "/answer/text", "offset": offset, "value": text}
                ]
                if status is not None and index == len(texts) - 1:
                    answer["status"] = status
                    operations.append({"op": "replace", "path": "/answer/status", "value": status})
                patches.append((operations, version, version + 1))
                version += 1
            db.execute(
                "UPDATE sessions SET state = ?, version = ? WHERE id = ?",
                (json.dumps(state), version, session_id),
            )
            db.execute("COMMIT")
        return patches


class SessionEvents:
    """``GET /sse/sessions/{session_id}``: the snapshot as the first event, then live updates.

    An ASGI app rather than a request handler, so Starlette's ``Route`` hands it ``send``.
    """

    def __init__(self, sync: SessionSync, bridge: NatsBridge, heartbeat: float) -> None:
        self.sync = sync
        self.bridge = bridge
        self.heartbeat = heartbeat

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one event stream until the client leaves."""
        session_id = scope["path_params"]["session_id"]
        async with self.bridge.subscribe(session_id) as updates:
            stream = await self.sync.accept_sse(scope, send, session_id)
            await updates.forward(stream, receive, heartbeat=self.heartbeat)


def create_app(store: Store, nats_url: str, pages: Path | None, heartbeat: float) -> Starlette:
    """The API over ``store``, publishing through the nats-server at ``nats_url``."""
    bridge = NatsBridge(nats_url, reconnect_time_wait=0.1, connect_timeout=2)

    async def load(ctx: SessionContext) -> Snapshot | None:
        found = await anyio.to_thread.run_sync(store.read, ctx.session_id)
        return None if found is None else Snapshot(found[0], version=found[1])

    async def load_version(ctx: SessionContext) -> int | None:
        found = await anyio.to_thread.run_sync(store.read, ctx.session_id)
        return None if found is None else found[1]

    sync = SessionSync(load, version_loader=load_version)

    async def session_socket(websocket: WebSocket) -> None:
        session_id = websocket.path_params["session_id"]
        async with bridge.subscribe(session_id) as updates:
            socket = await sync.accept(websocket.scope, websocket.send, session_id)
            if socket.version is None and not socket.known:
                await websocket.close(1011 if socket.failed else 1008)
                return
            await updates.forward(socket, websocket.receive, heartbeat=heartbeat)

    async def tokens(request: Request) -> JSONResponse:
        session_id = request.path_params["session_id"]
        count = int(request.query_params.get("count", "1"))
        text = request.query_params.get("text", "token ")
        status = request.query_params.get("status")
        interval = float(request.query_params.get("interval_ms", "0")) / 1000
        try:
            patches = await anyio.to_thread.run_sync(
                store.append, session_id, [text] * count, status
            )
        except KeyError:
            return JSONResponse({"error": "no such session"}, status_code=404)
        for index, (operations, base_version, version) in enumerate(patches):
            if interval and index:
                await anyio.sleep(interval)  # the pace tokens come at, not a synchronisation
            await bridge.publish_patch(
                session_id, operations, base_version=base_version, version=version
            )
        return JSONResponse({"version": patches[-1][2] if patches else None})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with bridge:
            yield

    routes: list[Any] = [
        WebSocketRoute("/ws/sessions/{session_id}", session_socket),
        Route(
            "/sse/sessions/{session_id}", SessionEvents(sync, bridge, heartbeat), methods=["GET"]
        ),
        Route("/sessions/{session_id}/tokens", tokens, methods=["POST"]),
        Mount("/static/session-sync", StaticFiles(directory=STATIC_DIR)),
    ]
    if pages is not None:
        routes.append(Mount("/pages", StaticFiles(directory=pages)))
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    """Serve the API as the environment says (see the module docstring)."""
    pages = os.environ.get("PAGES_DIR")
    app = create_app(
        Store(Path(os.environ["DATABASE"])),
        os.environ["NATS_URL"],
        Path(pages) if pages else None,
        float(os.environ.get("HEARTBEAT", "15")),
    )
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["PORT"]), log_level="warning")


class AnswerApi:
    """The API above in a process, with a nats-server and a SQLite file of its own.

    Everything lives in ``directory`` (the database, the logs). ``start()`` returns once the API
    accepts connections; ``kill()`` is a SIGKILL. The port stays the same across restarts, so a
    client reconnects to the same URL.
    """

    def __init__(
        self, directory: Path, *, pages: Path | None = None, heartbeat: float = 15
    ) -> None:
        self.store = Store(directory / "sessions.sqlite3")
        self.nats = NatsProcess(free_port(), directory / "nats-server.log")
        self.port = free_port()
        env = {
            "PORT": str(self.port),
            "DATABASE": str(self.store.path),
            "NATS_URL": self.nats.url,
            "HEARTBEAT": str(heartbeat),
            "PYTHONPATH": str(ROOT / "tests"),
            **({"PAGES_DIR": str(pages)} if pages is not None else {}),
        }
        self.api = ServerProcess(
            [sys.executable, "-m", "e2e.answer_api"], self.port, directory / "api.log", env
        )

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the API (and, the first time, its nats-server)."""
        if self.nats.process is None:
            self.nats.start()
        self.api.start()

    def kill(self) -> None:
        """SIGKILL the API: no shutdown code runs, its sockets are reset by the kernel."""
        self.api.kill()

    def stop(self) -> None:
        """Stop the API and the nats-server."""
        self.api.stop()
        self.nats.stop()

    def post_tokens(
        self,
        session_id: str,
        count: int,
        text: str = "token ",
        status: str | None = None,
        interval_ms: float = 0,
    ) -> int:
        """Append ``text`` ``count`` times through the API, published ``interval_ms`` apart;
        the session's version after."""
        params: dict[str, str | int | float] = {"count": count, "text": text}
        if interval_ms:
            params["interval_ms"] = interval_ms
        if status is not None:
            params["status"] = status
        response = httpx.post(f"{self.url}/sessions/{session_id}/tokens", params=params, timeout=10)
        response.raise_for_status()
        return int(response.json()["version"])

    def output(self) -> str:
        """The end of the API's log, for a failing test's message."""
        return self.api.output()[-3000:]


@contextmanager
def running_api(
    directory: Path, *, pages: Path | None = None, heartbeat: float = 15
) -> Iterator[AnswerApi]:
    """An :class:`AnswerApi`, started, and stopped (whatever happened) on exit."""
    api = AnswerApi(directory, pages=pages, heartbeat=heartbeat)
    try:
        api.start()
        yield api
    finally:
        api.stop()


if __name__ == "__main__":
    main()
