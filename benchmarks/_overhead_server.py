"""The server side of the overhead benchmarks: one app, served bare or wrapped.

``python -m benchmarks._overhead_server --variant bare|wrapped`` serves :class:`LiveApp` under
uvicorn (see :func:`benchmarks._serving.serve_app`), announcing its port on stdout:

- ``bare``, the floor: the app itself sends the snapshot right after ``websocket.accept``,
  built with the library's own ``SessionUpdate`` from the same store;
- ``wrapped``: the same app without that line, wrapped in ``SessionSyncMiddleware`` whose loader
  reads the same store; the middleware sends the snapshot.

Everything else is the same code on both sides. The store is in memory (a dict lookup) unless
``--db`` names a chat database (see :mod:`benchmarks._chat_db`): then ``bare`` loads by hand with
SQLAlchemy Core and ``wrapped`` uses the library's SQLAlchemy loader.

On a session's WebSocket (``/ws/sessions/{id}``), after the snapshot, a client message
``burst N`` makes the app send the first ``N`` of :func:`token_frames` as fast as it can.
``/cpu`` is a control WebSocket (a path the middleware does not serve): each message is
answered with this process's CPU seconds, to the nanosecond.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import cache
from typing import Any

import anyio

from asgi_session_sync import SessionContext, SessionSyncMiddleware, Snapshot
from asgi_session_sync._types import Receive, Scope, Send
from asgi_session_sync.events import SessionUpdate

from ._serving import raise_open_files_limit, serve_app

__all__ = [
    "CPU_PATH",
    "PREFIX",
    "PROFILE_ENV",
    "LiveApp",
    "MemoryStore",
    "memory_sessions",
    "server_args",
    "snapshot_text",
    "token_frames",
]

PROFILE_ENV = "BENCHMARKS_PROFILE_DIR"
"""When set, every overhead server runs under cProfile and writes its stats in this folder."""
PREFIX = "/ws/sessions/"
CPU_PATH = "/cpu"
VARIANTS = ("bare", "wrapped")
MAX_BURST = 4096
SNAPSHOT_VERSION = 7
# About 240 bytes per message: a 20-interaction snapshot is ~6.5 KB of JSON, as in mass_reconnect.
FILLER = "lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 4


def memory_sessions(count: int, interactions: int) -> dict[str, Snapshot]:
    """``count`` sessions ``s0000``... of ``interactions`` messages each, with owner and version."""
    return {
        f"s{i:04d}": Snapshot(
            {
                "id": f"s{i:04d}",
                "title": f"Session s{i:04d}",
                "interactions": [
                    {
                        "position": n,
                        "role": "user" if n % 2 == 0 else "assistant",
                        "content": f"s{i:04d} #{n}: {FILLER}",
                        "created_at": f"2025-01-01T00:{n // 60 % 60:02d}:{n % 60:02d}+00:00",
                    }
                    for n in range(interactions)
                ],
            },
            owner=f"user{i % 50}",
            version=SNAPSHOT_VERSION,
        )
        for i in range(count)
    }


def snapshot_text(session_id: str, snapshot: Snapshot) -> str:
    """The snapshot frame, as the bare app builds it: the library's event, ``model_dump_json``.

    The same JSON the middleware sends (it serialises the same ``SessionUpdate``).
    """
    return SessionUpdate(
        session_id=session_id,
        owner=snapshot.owner,
        session=snapshot.session,
        version=snapshot.version,
    ).model_dump_json()


@cache
def token_frames(session_id: str) -> list[str]:
    """The app's live frames for a session: token events, all of one size, each carrying a version.

    Their type is not one the middleware fences by default, but they carry a ``version``: while
    the fence is active it must parse each one (the costliest case for a frame that passes).
    """
    return [
        f'{{"type":"token","session_id":"{session_id}","version":{1_000_000 + n},'
        f'"delta":"{FILLER[:64]}"}}'
        for n in range(MAX_BURST)
    ]


class MemoryStore:
    """Sessions in a dict: the cheapest loader there is, so only the middleware is measured."""

    def __init__(self, sessions: dict[str, Snapshot]) -> None:
        self.sessions = sessions

    async def load(self, ctx: SessionContext) -> Snapshot | None:
        """The middleware's loader: one dict lookup."""
        return self.sessions.get(ctx.session_id)

    async def frame(self, session_id: str) -> str | None:
        """The bare app's snapshot: the same lookup, the same event."""
        snapshot = self.sessions.get(session_id)
        return None if snapshot is None else snapshot_text(session_id, snapshot)


class LiveApp:
    """A raw ASGI WebSocket app: accept, snapshot (``by_hand`` only), then bursts on request.

    ``by_hand`` is the bare app's own snapshot: ``async def frame(session_id) -> text | None``,
    sent right after accepting. ``None`` when the middleware sends it instead.
    """

    def __init__(self, by_hand: Callable[[str], Awaitable[str | None]] | None) -> None:
        self.by_hand = by_hand

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            return
        if scope["path"] == CPU_PATH:
            await self.report_cpu(receive, send)
            return
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        session_id = scope["path"][len(PREFIX) :]
        if self.by_hand is not None:
            await self.send_snapshot(session_id, send)
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return
            request = message.get("text") or ""
            if request.startswith("burst "):
                for frame in token_frames(session_id)[: int(request[6:])]:
                    await send({"type": "websocket.send", "text": frame})

    async def send_snapshot(self, session_id: str, send: Send) -> None:
        """The bare app's snapshot, in a call of its own so the idle connection keeps no copy."""
        assert self.by_hand is not None
        text = await self.by_hand(session_id)
        if text is not None:
            await send({"type": "websocket.send", "text": text})

    async def report_cpu(self, receive: Receive, send: Send) -> None:
        """Answer every message with this process's CPU seconds (all threads)."""
        await receive()
        await send({"type": "websocket.accept"})
        while (await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": repr(time.process_time())})


def server_args(variant: str, *, db: str | None = None, schema: str | None = None) -> list[str]:
    """The module and arguments that run one overhead server in a child process."""
    args = ["benchmarks._overhead_server", "--variant", variant, "--watch-stdin"]
    if db is not None:
        args += ["--db", db]
    if schema is not None:
        args += ["--schema", schema]
    return args


async def serve(args: argparse.Namespace) -> None:
    """Build the variant's app over its store and serve it until told to stop."""
    engine: Any = None
    loader: Any
    if args.db is None:
        store = MemoryStore(memory_sessions(args.sessions, args.interactions))
        loader, by_hand = store.load, store.frame
    else:
        from ._chat_db import HandLoader, library_loader, open_engine

        engine = open_engine(args.db, schema=args.schema)
        loader, by_hand = library_loader(engine), HandLoader(engine).frame
    try:
        app: Callable[..., Any]
        if args.variant == "bare":
            app = LiveApp(by_hand)
        else:
            app = SessionSyncMiddleware(
                LiveApp(None), loader=loader, paths=[PREFIX + "{session_id}"]
            )
        await serve_app(app, watch_stdin=args.watch_stdin)
    finally:
        if engine is not None:
            await engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one overhead server."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks._overhead_server")
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--interactions", type=int, default=20)
    parser.add_argument("--db", help="a chat database URL (see benchmarks._chat_db)")
    parser.add_argument("--schema", help="the chat tables' PostgreSQL schema")
    parser.add_argument("--watch-stdin", action="store_true", help="stop when stdin closes")
    args = parser.parse_args(argv)
    raise_open_files_limit()
    profile_dir = os.environ.get(PROFILE_ENV)
    if not profile_dir:
        anyio.run(serve, args)
        return 0
    # cProfile over the whole server, written when it stops (SIGTERM ends uvicorn cleanly).
    profiler = cProfile.Profile()
    try:
        profiler.runcall(anyio.run, serve, args)
    finally:
        profiler.dump_stats(os.path.join(profile_dir, f"{args.variant}-{os.getpid()}.prof"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
