"""The one benchmark server, in its own process: the app, its store, and both ends of running it.

``python -m benchmarks._server --variant V [options]`` serves :class:`LiveApp` under uvicorn,
one configuration for every part (one worker, ``websockets-sansio`` and ``h11``, no access log,
no lifespan, no pings, backlog 4096) on a loopback port it binds itself, and prints ``{"port": N, "pid":
N}`` once it accepts connections. :func:`running_server` is the parent's end: it starts it,
reads that line, and always stops it (SIGTERM, then SIGKILL after 10 s).

The app serves a session over a WebSocket (``/ws/sessions/{id}``) and as an event stream
(``GET /sse/sessions/{id}``). Each variant differs only in who sends the snapshot, and when:

- ``by_hand``, the floor with the middleware's guarantee: the app loads and serialises, then
  accepts (or starts its response), then sends the snapshot, built with the library's own
  ``SessionUpdate`` (an event stream's event written by hand);
- ``seed`` (``bare`` too, its old name): the seed design's order, accept first, then load;
- ``wrapped``: the same app sending no snapshot, in ``SessionSyncMiddleware(app, sync=
  SessionSync(loader), paths=[both paths])``, options at their defaults unless given;
- ``bridge`` (NATS): the app subscribes with ``NatsBridge.subscribe``, accepts with
  ``SessionSync.accept`` and runs ``updates.forward``, as the bridge's documentation shows;
- ``forwarder`` (NATS), the floor of fan-out: a nats-py subscription per socket, confirmed
  (``flush``) before the accept and the snapshot by hand; each message's text is sent as it came.

The store is in memory (:class:`MemoryStore`) unless ``--db`` names a database: then every
variant loads by hand with SQLAlchemy Core (:class:`benchmarks._database.HandLoader`, sleeping
``--db-latency-ms`` while it holds its pooled connection), and ``wrapped`` uses the library's
SQLAlchemy loader instead with ``--loader library``. NATS variants read the broker's URL from
``BENCHMARKS_NATS_URL`` (it carries credentials, so never the command line).

After the snapshot, a client message ``burst N`` makes the app send the first ``N`` of
:func:`token_frames` as fast as it can. ``/control`` is a control WebSocket (a path the
middleware does not serve); each message gets one answer: ``cpu`` (this process's CPU
seconds), ``stats`` (JSON: the middleware's counters, the loader's own call count, the CPU
seconds), ``stream <session id> <full|patch> <tokens> <clients>`` (``--stream``: publish that
many changes through the bridge, each once the last reached every socket; ``done`` or
``failed: <why>``).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import anyio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from asgi_session_sync import SessionContext, SessionSync, SessionSyncMiddleware, Snapshot
from asgi_session_sync._types import Receive, Scope, Send

from ._report import REPOSITORY
from ._sessions import (
    FILLER,
    filler,
    memory_sessions,
    numbered_ids,
    session_id_for,
    snapshot_event,
    snapshot_text,
    streamed_content,
    with_answer,
)

__all__ = [
    "CONTROL_PATH",
    "NATS_URL_ENV",
    "PREFIX",
    "PROFILE_ENV",
    "SSE_PREFIX",
    "Broker",
    "ServerProcess",
    "cpu_seconds",
    "embedded_nats",
    "raise_open_files_limit",
    "running_server",
    "server_args",
    "subject",
    "token_frames",
]

PROFILE_ENV = "BENCHMARKS_PROFILE_DIR"
"""When set, every server runs under cProfile and writes its stats in this folder."""
NATS_URL_ENV = "BENCHMARKS_NATS_URL"
PREFIX = "/ws/sessions/"
SSE_PREFIX = "/sse/sessions/"
CONTROL_PATH = "/control"
VARIANTS = ("by_hand", "seed", "bare", "wrapped", "bridge", "forwarder")
MAX_BURST = 4096
SERVER_START_TIMEOUT = 30.0  # bounded waits: a server that does not start or stop hangs nothing
SERVER_STOP_TIMEOUT = 10.0
TOKEN_TIMEOUT = 30.0
NATS_MAX_PAYLOAD = 8 * 1024 * 1024  # a full-state event of 1,000 interactions is about 1.1 MB
SSE_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
}


def raise_open_files_limit() -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` to the hard limit; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@cache
def token_frames(session_id: str) -> list[str]:
    """The app's burst frames for a session: token events of one size, each with a version.

    Their type is not one the middleware fences, but they carry a ``version``: the fence must
    look at each one while its window is open.
    """
    return [
        f'{{"type":"token","session_id":"{session_id}","version":{1_000_000 + n},'
        f'"delta":"{FILLER[:64]}"}}'
        for n in range(MAX_BURST)
    ]


def subject(session_id: str) -> str:
    """The NATS subject of a session's updates, as ``NatsBridge`` names it by default."""
    return f"session_sync.{session_id}"


# The child: the app and its store.


class MemoryStore:
    """Sessions in a dict: the cheapest loader there is, so only the middleware is measured."""

    def __init__(self, sessions: dict[str, Snapshot]) -> None:
        self.sessions = sessions
        self.calls = 0

    async def __call__(self, ctx: SessionContext) -> Snapshot | None:
        """The middleware's loader."""
        return await self.load(ctx.session_id)

    async def load(self, session_id: str) -> Snapshot | None:
        """One dict lookup, counted."""
        self.calls += 1
        return self.sessions.get(session_id)


class Forwarded:
    """How many frames the app has sent to the sockets of each session; wait for a count."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._waiting: dict[str, tuple[int, anyio.Event]] = {}

    def add(self, session_id: str) -> None:
        """Count one frame sent to a socket of ``session_id``."""
        self.counts[session_id] += 1
        waiting = self._waiting.get(session_id)
        if waiting is not None and self.counts[session_id] >= waiting[0]:
            waiting[1].set()

    async def until(self, session_id: str, count: int) -> None:
        """Return once ``count`` frames in all were sent to the sockets of ``session_id``."""
        if self.counts[session_id] < count:
            self._waiting[session_id] = (count, anyio.Event())
            try:
                await self._waiting[session_id][1].wait()
            finally:
                del self._waiting[session_id]


async def stream_tokens(
    store: MemoryStore, bridge: Any, forwarded: Forwarded, request: list[str]
) -> None:
    """``stream <id> <full|patch> <tokens> <clients>``: publish changes to a session's last
    interaction, the whole session (``NatsBridge.publish``) or a JSON Patch replacing its
    content (``publish_patch``), each once the last reached every socket.

    Raises:
        ValueError: A mode that is neither ``full`` nor ``patch``.
        TimeoutError: A token did not reach every socket within ``TOKEN_TIMEOUT``.
    """
    session_id, mode, tokens, clients = request[0], request[1], int(request[2]), int(request[3])
    if mode not in ("full", "patch"):
        raise ValueError(f"mode must be full or patch: got {mode!r}")
    snapshot = store.sessions[session_id]
    session, owner, version = snapshot.session, snapshot.owner, snapshot.version
    assert isinstance(session, dict) and isinstance(version, int)
    last = len(session["interactions"]) - 1
    for k in range(1, tokens + 1):
        content = streamed_content(session_id, last, k)
        session["interactions"][last]["content"] = content
        version += 1
        store.sessions[session_id] = Snapshot(session, owner=owner, version=version)
        target = forwarded.counts[session_id] + clients
        if mode == "full":
            await bridge.publish(session_id, session, owner=owner, version=version)
        else:
            patch = [{"op": "replace", "path": f"/interactions/{last}/content", "value": content}]
            await bridge.publish_patch(
                session_id, patch, base_version=version - 1, version=version, owner=owner
            )
        with anyio.fail_after(TOKEN_TIMEOUT):
            await forwarded.until(session_id, target)


class LiveApp:
    """A raw ASGI app serving sessions as the variant says (see the module's docstring)."""

    def __init__(self, variant: str, store: Any, *, sync: Any = None, nats: Any = None) -> None:
        self.variant = variant
        self.store = store
        self.sync = sync
        self.nats = nats  # the bridge, or the forwarder's nats-py client
        self.forwarded = Forwarded()
        self.streaming = False  # --stream: sockets count the frames they forward

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve a session socket, an event stream or the control socket."""
        path = scope["path"]
        if scope["type"] == "http" and path.startswith(SSE_PREFIX):
            await self.event_stream(path[len(SSE_PREFIX) :], receive, send)
        elif scope["type"] != "websocket" or (await receive())["type"] != "websocket.connect":
            return
        elif path == CONTROL_PATH:
            await self.control(receive, send)
        elif self.variant == "bridge":
            await self.forward_updates(scope, path[len(PREFIX) :], receive, send)
        elif self.variant == "forwarder":
            await self.forward_by_hand(path[len(PREFIX) :], receive, send)
        else:
            await self.session_socket(path[len(PREFIX) :], receive, send)

    async def snapshot(self, session_id: str) -> tuple[str, Any] | None:
        """Load and serialise by hand: the snapshot frame's text and its version."""
        snapshot = await self.store.load(session_id)
        return None if snapshot is None else (snapshot_text(session_id, snapshot), snapshot.version)

    async def session_socket(self, session_id: str, receive: Receive, send: Send) -> None:
        """Accept, with the snapshot when the variant sends it, then answer bursts."""
        first = await self.snapshot(session_id) if self.variant == "by_hand" else None
        await send({"type": "websocket.accept"})  # the middleware sends its snapshot here
        if self.variant in ("seed", "bare"):
            first = await self.snapshot(session_id)
        if first is not None:
            await send({"type": "websocket.send", "text": first[0]})
        del first  # an idle connection keeps no copy
        while (message := await receive())["type"] == "websocket.receive":
            request = message.get("text") or ""
            if request.startswith("burst "):
                for frame in token_frames(session_id)[: int(request[6:])]:
                    await send({"type": "websocket.send", "text": frame})

    async def event_stream(self, session_id: str, receive: Receive, send: Send) -> None:
        """Start an event stream, with the snapshot as its first event when the variant
        sends it, then wait for the client to leave."""
        first = await self.snapshot(session_id) if self.variant == "by_hand" else None
        await send(SSE_START)  # the middleware sends its snapshot here
        if self.variant in ("seed", "bare"):
            first = await self.snapshot(session_id)
        if first is not None:
            body = snapshot_event(*first).encode()
            await send({"type": "http.response.body", "body": body, "more_body": True})
        del first
        while (await receive())["type"] != "http.disconnect":
            pass

    async def forward_updates(
        self, scope: Scope, session_id: str, receive: Receive, send: Send
    ) -> None:
        """Subscribe before accepting, then forward every update, as the bridge's docs show."""
        accepted = False

        async def counted_send(message: dict[str, Any]) -> None:
            await send(message)
            if accepted:  # a forwarded frame, not the accept or the snapshot
                self.forwarded.add(session_id)

        async with self.nats.subscribe(session_id) as updates:
            socket = await self.sync.accept(
                scope, counted_send if self.streaming else send, session_id
            )
            accepted = True
            await updates.forward(socket, receive)

    async def forward_by_hand(self, session_id: str, receive: Receive, send: Send) -> None:
        """The floor of fan-out: a subscription per socket, each message sent as it came."""

        async def deliver(msg: Any) -> None:
            await send({"type": "websocket.send", "text": msg.data.decode()})

        subscription = await self.nats.subscribe(subject(session_id), cb=deliver)
        try:
            # One round trip, as the bridge's subscribe: the broker has the subscription
            # before the client has its snapshot, so no update published after it is missed.
            await self.nats.flush()
            await send({"type": "websocket.accept"})
            if (first := await self.snapshot(session_id)) is not None:
                await send({"type": "websocket.send", "text": first[0]})
            while (await receive())["type"] != "websocket.disconnect":
                pass
        finally:
            with anyio.CancelScope(shield=True):
                await subscription.unsubscribe()

    async def control(self, receive: Receive, send: Send) -> None:
        """Answer every message of the control socket (see the module's docstring)."""
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            request = (message.get("text") or "").split()
            if request == ["cpu"]:
                answer = repr(time.process_time())
            elif request == ["stats"]:
                stats = None if self.sync is None else self.sync.stats.as_dict()
                answer = json.dumps(
                    {
                        "middleware": stats,
                        "loader_calls": getattr(self.store, "calls", None),
                        "cpu_seconds": time.process_time(),
                    }
                )
            elif request[:1] == ["stream"] and self.streaming and len(request) == 5:
                try:
                    await stream_tokens(self.store, self.nats, self.forwarded, request[1:])
                    answer = "done"
                except Exception as exc:
                    answer = f"failed: {type(exc).__name__}: {exc}"
            else:
                answer = f"failed: unknown request {request!r}"
            await send({"type": "websocket.send", "text": answer})


async def serve(args: argparse.Namespace) -> None:
    """Build the variant's app over its store and serve it until told to stop."""
    async with AsyncExitStack() as stack:
        loader: Any
        if args.db is None:
            text = FILLER if args.interaction_bytes is None else filler(args.interaction_bytes)
            sizes = dict.fromkeys(numbered_ids(args.sessions), args.interactions)
            sizes |= {session_id_for(size, 0): size for size in args.session_sizes}
            sessions = memory_sessions(sizes, text=text)
            for snapshot in sessions.values() if args.answer else ():
                with_answer(snapshot)
            store = loader = MemoryStore(sessions)
        else:
            from ._database import HandLoader, library_loader, open_engine

            engine = open_engine(args.db, schema=args.schema, pool_size=args.pool_size)
            stack.push_async_callback(engine.dispose)
            store = HandLoader(engine, latency=args.db_latency_ms / 1000)
            await store.warm_up(args.pool_size)
            loader = library_loader(engine) if args.loader == "library" else store
        nats: Any = None
        if args.variant == "bridge":
            from asgi_session_sync.nats import NatsBridge

            # Full-state frames of 1,000 interactions are about 1 MiB each: allow the
            # subscriptions to hold a few of them rather than report a slow consumer.
            bridge = NatsBridge(os.environ[NATS_URL_ENV], pending_bytes_limit=256 * 2**20)
            nats = await stack.enter_async_context(bridge)
        elif args.variant == "forwarder":
            import nats as nats_py

            nats = await nats_py.connect(os.environ[NATS_URL_ENV])
            stack.push_async_callback(nats.close)
        options: dict[str, Any] = {"max_concurrent_loads": args.max_concurrent_loads}
        if args.single_flight is not None:
            options["single_flight"] = args.single_flight == "on"
        sync = SessionSync(loader, **{k: v for k, v in options.items() if v is not None})
        app: Any = LiveApp(args.variant, store, sync=sync, nats=nats)
        app.streaming = args.stream
        if args.variant == "wrapped":
            paths = [PREFIX + "{session_id}", SSE_PREFIX + "{session_id}"]
            app = SessionSyncMiddleware(app, sync=sync, paths=paths)
        elif args.variant != "bridge":
            app.sync = None  # no service: its counters would say nothing
        await serve_app(app, watch_stdin=args.watch_stdin)


async def serve_app(app: Any, *, watch_stdin: bool = False) -> None:
    """Serve ``app`` under uvicorn until SIGTERM/SIGINT (or stdin EOF with ``watch_stdin``).

    Announces ``{"port": N, "pid": N}`` on stdout once the server accepts connections. With
    ``watch_stdin`` it also stops when stdin reaches end of file: the parent holds the other
    end of that pipe, so a parent killed before it could stop this server leaves nothing behind.
    """
    import uvicorn  # the load generator imports this module too, but never serves

    raise_open_files_limit()
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        ws="websockets-sansio",
        http="h11",
        lifespan="off",
        backlog=4096,
        ws_ping_interval=None,  # no pings: nothing but the frames measured crosses a socket
    )
    server = uvicorn.Server(config)
    # Bind here, on port 0, so the port is free by construction and known before the parent
    # connects. IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose
    # proto says TCP, as it does for the sockets uvicorn binds itself. Without it, Nagle's
    # algorithm holds each small frame until the client's delayed ACK (40 ms on Linux).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await anyio.sleep(0.01)
        sys.stdout.write(json.dumps({"port": sock.getsockname()[1], "pid": os.getpid()}) + "\n")
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


def server_args(variant: str, *options: str) -> list[str]:
    """The module and arguments that run one server of ``variant`` in a child process."""
    return ["benchmarks._server", "--variant", variant, "--watch-stdin", *options]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The server's command line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks._server")
    add = parser.add_argument
    add("--variant", choices=VARIANTS, required=True)
    add("--sessions", type=int, default=200, help="in-memory sessions s0000...")
    add("--interactions", type=int, default=20, help="interactions of each")
    add("--session-sizes", type=int, nargs="*", default=[], help="and one n<size>-000 of each")
    add("--interaction-bytes", type=int, help="filler per interaction content")
    add("--answer", action="store_true", help="each session ends with an answer streaming")
    add("--db", help="a database URL (see benchmarks._database)")
    add("--schema", help="the tables' PostgreSQL schema")
    add("--loader", choices=("library", "hand"), default="library", help="wrapped --db's")
    add("--db-latency-ms", type=float, default=0.0, help="simulated round trip")
    add("--pool-size", type=int, default=2)
    add("--single-flight", choices=("on", "off"))
    add("--max-concurrent-loads", type=int)
    add("--stream", action="store_true", help="publish token streams on request (bridge)")
    add("--watch-stdin", action="store_true", help="stop when stdin closes")
    args = parser.parse_args(argv)
    if args.stream and (args.variant != "bridge" or args.db is not None):
        parser.error("--stream needs --variant bridge over the in-memory store")
    if args.variant in ("bridge", "forwarder") and not os.environ.get(NATS_URL_ENV):
        parser.error(f"--variant {args.variant} needs the NATS URL in ${NATS_URL_ENV}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run one server (under cProfile when ``BENCHMARKS_PROFILE_DIR`` is set)."""
    args = parse_args(argv)
    raise_open_files_limit()
    profile_dir = os.environ.get(PROFILE_ENV)
    if not profile_dir:
        anyio.run(serve, args)
        return 0
    # uvicorn shuts down cleanly on SIGTERM, then raises the signal again with the handler it
    # found: the default one would end the process before the stats are written.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    profiler = cProfile.Profile()
    try:
        profiler.runcall(anyio.run, serve, args)
    except KeyboardInterrupt:
        pass
    finally:
        profiler.dump_stats(os.path.join(profile_dir, f"{args.variant}-{os.getpid()}.prof"))
    return 0


# The parent: starting, watching and stopping a server.


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


def cpu_seconds(pid: int) -> float:
    """CPU seconds process ``pid`` used so far, to the nanosecond: the sum over its threads
    (``/proc/<pid>/task/*/schedstat``; a thread that has exited no longer counts)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/schedstat") as schedstat:
            total += int(schedstat.read().split()[0])
    return total / 1e9


@dataclass(frozen=True)
class Broker:
    """A running nats-server: its URL (a secret: it carries the credentials) and its pid."""

    url: str
    pid: int


@asynccontextmanager
async def embedded_nats(options: Any = None) -> AsyncIterator[Broker]:
    """A private nats-server around a part's rounds (its ``environment``), ``max_payload`` 8 MB.

    Hand its URL to a server through ``env={NATS_URL_ENV: broker.url}``, never its arguments.
    """
    from asgi_session_sync.nats_server import EmbeddedNats

    async with EmbeddedNats(config={"max_payload": NATS_MAX_PAYLOAD}) as nats:
        assert nats.process is not None
        yield Broker(nats.url, nats.process.pid)


@asynccontextmanager
async def running_server(
    module_args: Sequence[str], *, env: Mapping[str, str] | None = None
) -> AsyncIterator[ServerProcess]:
    """Run ``python -m <module_args>`` from the repository; yield it once it listens.

    ``env`` adds environment variables for the server only (secrets such as
    :data:`NATS_URL_ENV` go there, never in the arguments). It is always stopped, within
    bounds, even when the caller is cancelled.
    """
    command = [sys.executable, "-m", *module_args]
    process = await anyio.open_process(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,
        cwd=REPOSITORY,
        env=None if env is None else {**os.environ, **env},
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
        with anyio.CancelScope(shield=True):  # stopped even when this run is being cancelled
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


if __name__ == "__main__":
    sys.exit(main())
