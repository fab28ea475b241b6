"""The one benchmark server, in its own process: the app, its store, and both ends of running it.

``python -m benchmarks._server --variant V [options]`` serves :class:`LiveApp` under uvicorn with
one configuration for every part, on a loopback port it binds itself, and prints ``{"port": N,
"pid": N}`` once it listens; :func:`running_server` is the parent's end. The variants differ in
who sends the snapshot (``by_hand``, ``seed``, ``wrapped``, ``bridge``, ``forwarder``), over a
WebSocket (``/ws/sessions/{id}``, where ``burst N`` asks for ``N`` token frames) or an event
stream (``GET /sse/sessions/{id}``); ``benchmarks/README.md`` has the table. ``/control``
answers ``cpu``, ``stats`` and ``timings`` (with ``--time``).
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
    with_answer,
)

PROFILE_ENV = "BENCHMARKS_PROFILE_DIR"
"""When set, every server runs under cProfile and writes its stats in this folder."""
NATS_URL_ENV = "BENCHMARKS_NATS_URL"
PREFIX, SSE_PREFIX, CONTROL_PATH = "/ws/sessions/", "/sse/sessions/", "/control"
VARIANTS = ("by_hand", "seed", "wrapped", "bridge", "forwarder")
START_TIMEOUT, STOP_TIMEOUT = 30.0, 10.0  # a server that does not start or stop hangs nothing
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
    """The app's burst frames: 4,096 token events of one size, each with a ``version``, of a
    type the middleware does not fence, so its fence looks at each one and lets it pass."""
    delta = FILLER[:64]
    return [
        f'{{"type":"token","session_id":"{session_id}","version":{n},"delta":"{delta}"}}'
        for n in range(1_000_000, 1_004_096)
    ]


def subject(session_id: str) -> str:
    """The NATS subject of a session's updates, as ``NatsBridge`` names it by default."""
    return f"session_sync.{session_id}"


class MemoryStore:
    """Sessions in a dict: the cheapest loader there is, so only the middleware is measured."""

    def __init__(self, sessions: dict[str, Snapshot]) -> None:
        self.sessions, self.calls = sessions, 0

    async def __call__(self, ctx: SessionContext) -> Snapshot | None:
        """The middleware's loader."""
        return await self.load(ctx.session_id)

    async def load(self, session_id: str) -> Snapshot | None:
        """One dict lookup, counted."""
        self.calls += 1
        return self.sessions.get(session_id)


class LiveApp:
    """A raw ASGI app serving sessions as its variant says (see the module's docstring)."""

    def __init__(self, variant: str, store: Any, sync: SessionSync, nats: Any, user: Any) -> None:
        self.variant, self.store, self.sync = variant, store, sync
        self.nats = nats  # the bridge, or the forwarder's nats-py client
        self.user = user  # whose sessions the by-hand loads check, if anyone's
        self.timings: list[float] = []  # see Timed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve an event stream, the control socket or a session's socket."""
        path = scope["path"]
        if scope["type"] == "http" and path.startswith(SSE_PREFIX):
            await self.event_stream(path[len(SSE_PREFIX) :], receive, send)
        elif scope["type"] != "websocket" or (await receive())["type"] != "websocket.connect":
            return
        elif path == CONTROL_PATH:
            await self.control(receive, send)
        elif self.variant == "bridge":
            async with self.nats.subscribe(session_id := path[len(PREFIX) :]) as updates:
                socket = await self.sync.accept(scope, send, session_id)
                await updates.forward(socket, receive)
        elif self.variant == "forwarder":
            await self.forward_by_hand(path[len(PREFIX) :], receive, send)
        else:
            await self.session_socket(path[len(PREFIX) :], receive, send)

    async def snapshot(self, session_id: str) -> tuple[str, Any] | None:
        """Load and serialise by hand: the snapshot frame's text and its version."""
        found = await self.store.load(session_id, *[self.user] * (self.user is not None))
        return None if found is None else (snapshot_text(session_id, found), found.version)

    async def session_socket(self, session_id: str, receive: Receive, send: Send) -> None:
        """Accept, with the snapshot when the variant sends it, then answer bursts."""
        first = await self.snapshot(session_id) if self.variant == "by_hand" else None
        await send({"type": "websocket.accept"})  # the middleware sends its snapshot here
        if self.variant == "seed":
            first = await self.snapshot(session_id)
        if first is not None:
            await send({"type": "websocket.send", "text": first[0]})
        del first  # an idle connection keeps no copy
        while (message := await receive())["type"] == "websocket.receive":
            request = message.get("text") or ""
            count = int(request[6:]) if request.startswith("burst ") else 0
            for frame in token_frames(session_id)[:count]:
                await send({"type": "websocket.send", "text": frame})

    async def event_stream(self, session_id: str, receive: Receive, send: Send) -> None:
        """Start an event stream, with the snapshot when the variant sends it; then idle."""
        first, body = await self.snapshot(session_id) if self.variant == "by_hand" else None, b""
        await send(SSE_START)  # the middleware sends its snapshot here
        if first is not None:  # no local keeps the event: an idle stream holds no copy
            body = snapshot_event(*first).encode()
            await send({"type": "http.response.body", "body": body, "more_body": True})
        del first, body
        while (await receive())["type"] != "http.disconnect":
            pass

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
            answer = repr(time.process_time())
            if message.get("text") == "timings":
                answer, self.timings = json.dumps(self.timings), []
            elif message.get("text") == "stats":
                counters = self.sync.stats.as_dict() if self.variant == "wrapped" else None
                stats = {"loader_calls": self.store.calls, "cpu_seconds": time.process_time()}
                answer = json.dumps(stats | {"middleware": counters})
            await send({"type": "websocket.send", "text": answer})


class Timed:
    """Outermost: the connecting user in each session socket's scope, as an auth middleware
    sets it, and (``record``) the seconds from the ASGI call to the snapshot sent, into
    ``live.timings``."""

    def __init__(self, app: Any, live: LiveApp, record: bool) -> None:
        self.app, self.live, self.record = app, live, record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one connection, timing a session socket's first frame."""
        if scope["type"] != "websocket" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        started, timings = time.perf_counter(), self.live.timings if self.record else None

        async def send_timed(message: Any) -> None:
            await send(message)
            nonlocal timings
            if timings is not None and message["type"] == "websocket.send":
                timings.append(time.perf_counter() - started)
                timings = None

        await self.app({**scope, "user": self.live.user}, receive, send_timed)


async def serve(args: argparse.Namespace) -> None:
    """Build the variant's app over its store and serve it until told to stop."""
    async with AsyncExitStack() as stack:
        if args.db is None:
            text = FILLER if args.interaction_bytes is None else filler(args.interaction_bytes)
            sizes = dict.fromkeys(numbered_ids(args.sessions), args.interactions)
            sizes |= {session_id_for(size, n): size for size in args.sizes for n in range(4)}
            sessions = memory_sessions(sizes, text=text)
            for snapshot in sessions.values() if args.answer else ():
                with_answer(snapshot)
            store: Any = MemoryStore(sessions)
            loader = store
        else:
            from ._database import HandLoader, library_loader, open_engine

            engine = open_engine(args.db, schema=args.schema, pool_size=args.pool_size)
            stack.push_async_callback(engine.dispose)
            store = HandLoader(engine, latency=args.db_latency_ms / 1000)
            await store.warm_up(args.pool_size)
            loader = store
            if args.loader != "hand":
                loader = library_loader(engine, sessionmaker=args.loader == "sessionmaker")
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
        options = {"max_concurrent_loads": args.max_concurrent_loads}
        if args.single_flight is not None:
            options["single_flight"] = args.single_flight == "on"
        options = {k: v for k, v in options.items() if v is not None}
        live = LiveApp(args.variant, store, SessionSync(loader, **options), nats, args.user)
        app: Any = live
        if args.variant == "wrapped":
            paths = [PREFIX + "{session_id}", SSE_PREFIX + "{session_id}"]
            app = SessionSyncMiddleware(app, sync=live.sync, paths=paths)
        if args.user is not None or args.time:
            app = Timed(app, live, args.time)
        await serve_app(app, watch_stdin=args.watch_stdin)


async def serve_app(app: Any, *, watch_stdin: bool = False) -> None:
    """Serve ``app`` under uvicorn until SIGTERM/SIGINT, announcing its port and pid on stdout.
    With ``watch_stdin`` it also stops at stdin's end of file: the parent holds that pipe, so a
    parent killed before it could stop this server leaves nothing behind."""
    import uvicorn  # the load generator imports this module too, but never serves

    raise_open_files_limit()
    # No pings: nothing but the frames measured crosses a socket.
    options = {"ws": "websockets-sansio", "http": "h11", "lifespan": "off", "backlog": 4096}
    options |= {"log_level": "warning", "access_log": False, "ws_ping_interval": None}
    server = uvicorn.Server(uvicorn.Config(app, **options))
    # Bound here, on port 0, so the port is free by construction and known before the parent
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
        print(json.dumps({"port": sock.getsockname()[1], "pid": os.getpid()}), flush=True)

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


def main(argv: Sequence[str] | None = None) -> int:
    """Run one server (under cProfile when ``BENCHMARKS_PROFILE_DIR`` is set)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks._server")
    add = parser.add_argument
    add("--variant", choices=VARIANTS, required=True)
    add("--sessions", type=int, default=200, help="in-memory sessions s0000...")
    add("--interactions", type=int, default=20, help="interactions of each")
    add("--sizes", type=int, nargs="*", default=[], help="and n<size>-000 to -003 of each")
    add("--interaction-bytes", type=int, help="filler per interaction content")
    add("--answer", action="store_true", help="each session ends with an answer streaming")
    add("--db", help="a database URL (see benchmarks._database)")
    add("--schema", help="the database's schema (PostgreSQL)")
    add("--loader", choices=("hand", "library", "sessionmaker"), default="hand", help="wrapped's")
    add("--user", help="the connecting user of every session socket; by hand checks the owner")
    add("--time", action="store_true", help="time each session socket to its snapshot sent")
    add("--db-latency-ms", type=float, default=0.0, help="simulated round trip")
    add("--pool-size", type=int, default=2)
    add("--single-flight", choices=("on", "off"))
    add("--max-concurrent-loads", type=int)
    add("--watch-stdin", action="store_true", help="stop when stdin closes")
    args = parser.parse_args(argv)
    if args.variant in ("bridge", "forwarder") and not os.environ.get(NATS_URL_ENV):
        parser.error(f"--variant {args.variant} needs the NATS URL in ${NATS_URL_ENV}")
    raise_open_files_limit()
    if not (profile_dir := os.environ.get(PROFILE_ENV)):
        anyio.run(serve, args)
        return 0
    # uvicorn shuts down cleanly on SIGTERM, then raises the signal again with the handler it
    # found: the default one would end the process before the stats are written.
    signal.signal(signal.SIGTERM, lambda number, frame: None)
    profiler = cProfile.Profile()
    try:
        profiler.runcall(anyio.run, serve, args)
    finally:
        profiler.dump_stats(os.path.join(profile_dir, f"{args.variant}-{os.getpid()}.prof"))
    return 0


# The parent: starting, watching and stopping a server.


@dataclass(frozen=True)
class ServerProcess:
    """A running benchmark server: where it listens, and its memory from ``/proc``."""

    port: int
    pid: int

    def rss_bytes(self) -> int:
        """The server's resident set size now (``VmRSS`` in ``/proc/<pid>/status``)."""
        with open(f"/proc/{self.pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


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
    """A private nats-server around a part's rounds, ``max_payload`` 8 MB (a full-state event
    of 1,000 interactions is 1.1 MB); servers get its URL through ``env``, never arguments."""
    from asgi_session_sync.nats_server import EmbeddedNats

    async with EmbeddedNats(config={"max_payload": 8 * 2**20}) as nats:
        assert nats.process is not None
        yield Broker(nats.url, nats.process.pid)


@asynccontextmanager
async def running_server(
    module_args: Sequence[str], *, env: Mapping[str, str] | None = None
) -> AsyncIterator[ServerProcess]:
    """Run ``python -m <module_args>`` from the repository; yield it once it listens.

    ``env`` adds environment variables for the server only. It is always stopped (SIGTERM,
    then SIGKILL after 10 s), even when the caller is cancelled.
    """
    command = [sys.executable, "-m", *module_args]
    environment, pipe = None if env is None else {**os.environ, **env}, subprocess.PIPE
    # stderr=None: the server's log goes to ours; a pipe no one reads would block it when full.
    process = await anyio.open_process(
        command, stdin=pipe, stdout=pipe, stderr=None, cwd=REPOSITORY, env=environment
    )
    try:
        assert process.stdout is not None
        try:
            with anyio.fail_after(START_TIMEOUT):
                line = await BufferedByteReceiveStream(process.stdout).receive_until(b"\n", 4096)
        except (anyio.IncompleteRead, anyio.EndOfStream):
            raise RuntimeError(f"the server exited before listening: {' '.join(command)}") from None
        announced = json.loads(line)
        yield ServerProcess(port=int(announced["port"]), pid=int(announced["pid"]))
    finally:
        with anyio.CancelScope(shield=True):  # stopped even when this run is being cancelled
            await stop(process)


async def stop(process: Process) -> None:
    """SIGTERM the server, SIGKILL it if it is still running after the bound, and reap it."""
    if process.returncode is None:
        process.terminate()
        with anyio.move_on_after(STOP_TIMEOUT):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()
    await process.aclose()


if __name__ == "__main__":
    sys.exit(main())
