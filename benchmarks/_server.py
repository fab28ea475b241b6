"""The one benchmark server, in its own process: the app, its stores, and both ends of running it.

``python -m benchmarks._server --variant bare|wrapped [options]`` serves :class:`LiveApp` under
uvicorn with one configuration for every part (one worker, ``websockets-sansio``, no access
log, no lifespan, backlog 4096) on a loopback port it binds itself, and prints ``{"port": N,
"pid": N}`` once it accepts connections. :func:`running_server` is the parent's end: it starts
it, reads that line, and always stops it (SIGTERM, then SIGKILL after 10 s).

- ``bare``, the floor: the app itself sends the snapshot right after ``websocket.accept``,
  built with the library's own ``SessionUpdate`` from the same store.
- ``wrapped``: the same app without that line, wrapped in ``SessionSyncMiddleware(app,
  sync=SessionSync(loader), paths=["/ws/sessions/{session_id}"])``, every other option at its
  default unless given (``--single-flight``, ``--max-concurrent-loads``).

With ``--answer``, every in-memory session ends with an answer being streamed (an empty
``content`` and a ``status``, see :mod:`benchmarks._answers`), for a producer outside the server.

The store is in memory (a dict lookup, see :mod:`benchmarks._sessions`) unless ``--db`` names
a database (:mod:`benchmarks._database`, imported only then): then ``bare`` loads by hand
with SQLAlchemy Core and ``wrapped`` uses the loader ``--loader`` names (the library's
SQLAlchemy loader, or the same hand-written one).

On a session's WebSocket (``/ws/sessions/{id}``), after the snapshot, a client message ``burst
N`` makes the app send the first ``N`` of :func:`token_frames` as fast as it can. With
``--nats``, the app instead forwards the session's updates from the NATS server at the URL in
the ``BENCHMARKS_NATS_URL`` environment variable (it carries the broker's credentials, so never
the command line), on the session's :func:`subject`:

- ``wrapped``: through the bridge, as its documentation shows: ``NatsBridge.subscribe``, accept
  with ``SessionSync.accept`` (the same service, no middleware), ``updates.forward(socket,
  receive)``. With ``--stream``, the server also publishes token streams (``stream`` below).
- ``bare``, the hand-written forwarder: one plain nats-py subscription per socket, confirmed
  (``flush``) before the accept and the snapshot by hand; its callback sends each message's
  text as it came, with no ordering and no repair.

``/control`` is a control WebSocket (a path the middleware does not serve, so both variants
answer it with the same code). Each message gets one answer:

- ``cpu``: this process's CPU seconds (``time.process_time()``, all threads), to the nanosecond;
- ``stats``: JSON of the snapshot service's counters (``"middleware"``, ``null`` for ``bare``),
  the loader's own call count and the CPU seconds;
- ``stream <session id> <full|patch> <tokens> <clients>`` (``--stream`` only): publish
  ``tokens`` changes to the session through the bridge, each after the previous one reached
  all ``clients`` sockets; answers ``done`` or ``failed: <why>``.
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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
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
    snapshot_text,
    streamed_content,
)

__all__ = [
    "CONTROL_PATH",
    "NATS_URL_ENV",
    "PREFIX",
    "PROFILE_ENV",
    "Broker",
    "LiveApp",
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
"""The NATS URL a ``--nats`` server connects to: a secret (credentials), so not an argument."""
PREFIX = "/ws/sessions/"
CONTROL_PATH = "/control"
MAX_BURST = 4096
# Bounded waits, in seconds: a server that does not start, or stop, does not hang the run.
SERVER_START_TIMEOUT = 30.0
SERVER_STOP_TIMEOUT = 10.0
TOKEN_TIMEOUT = 30.0
# A full-state event of 1,000 interactions is about 1.1 MB, over NATS's default of 1 MB.
NATS_MAX_PAYLOAD = 8 * 1024 * 1024


def raise_open_files_limit() -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` to the hard limit; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@cache
def token_frames(session_id: str) -> list[str]:
    """The app's burst frames for a session: token events of one size, each with a version.

    Their type is not one the middleware fences by default, but they carry a ``version``: while
    the fence is active it must parse each one (the costliest case for a frame that passes).
    """
    return [
        f'{{"type":"token","session_id":"{session_id}","version":{1_000_000 + n},'
        f'"delta":"{FILLER[:64]}"}}'
        for n in range(MAX_BURST)
    ]


def subject(session_id: str) -> str:
    """The NATS subject of a session's updates, as ``NatsBridge`` names it by default."""
    return f"session_sync.{session_id}"


# The child: the app and its stores.


class MemoryStore:
    """Sessions in a dict: the cheapest loader there is, so only the middleware is measured."""

    def __init__(self, sessions: dict[str, Snapshot]) -> None:
        self.sessions = sessions
        self.calls = 0

    async def __call__(self, ctx: SessionContext) -> Snapshot | None:
        """The middleware's loader: one dict lookup."""
        self.calls += 1
        return self.sessions.get(ctx.session_id)

    async def frame(self, session_id: str) -> str | None:
        """The bare app's snapshot: the same lookup, the same event."""
        snapshot = self.sessions.get(session_id)
        return None if snapshot is None else snapshot_text(session_id, snapshot)


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
        """Return once ``count`` frames in all were sent to the sockets of ``session_id``.

        One waiter per session at a time: a session streams one response at a time.
        """
        if self.counts[session_id] >= count:
            return
        reached = anyio.Event()
        self._waiting[session_id] = (count, reached)
        try:
            await reached.wait()
        finally:
            del self._waiting[session_id]


class TokenStream:
    """Streams a response into a session's last interaction, one token at a time, via NATS.

    Each token changes the in-memory session (so the loader's snapshot stays current), bumps
    its version and publishes the change: the whole session (``full``, ``NatsBridge.publish``)
    or a JSON Patch that replaces the interaction's content (``patch``,
    ``NatsBridge.publish_patch``). The next token waits until this one reached every socket, so
    nothing queues and the CPU time is that of the tokens themselves.
    """

    def __init__(self, store: MemoryStore, bridge: Any, forwarded: Forwarded) -> None:
        self.store = store
        self.bridge = bridge
        self.forwarded = forwarded

    async def run(self, session_id: str, mode: str, tokens: int, clients: int) -> None:
        """Publish ``tokens`` changes, each once the previous one reached ``clients`` sockets.

        Raises:
            ValueError: ``mode`` is neither ``full`` nor ``patch``.
            TimeoutError: A token did not reach every socket within ``TOKEN_TIMEOUT``.
        """
        if mode not in ("full", "patch"):
            raise ValueError(f"mode must be full or patch: got {mode!r}")
        snapshot = self.store.sessions[session_id]
        session, owner, version = snapshot.session, snapshot.owner, snapshot.version
        assert isinstance(session, dict)
        assert isinstance(version, int)
        last = len(session["interactions"]) - 1
        for k in range(1, tokens + 1):
            content = streamed_content(session_id, last, k)
            session["interactions"][last]["content"] = content
            version += 1
            self.store.sessions[session_id] = Snapshot(session, owner=owner, version=version)
            target = self.forwarded.counts[session_id] + clients
            if mode == "full":
                await self.bridge.publish(session_id, session, owner=owner, version=version)
            else:
                patch = [
                    {"op": "replace", "path": f"/interactions/{last}/content", "value": content}
                ]
                await self.bridge.publish_patch(
                    session_id, patch, base_version=version - 1, version=version, owner=owner
                )
            with anyio.fail_after(TOKEN_TIMEOUT):
                await self.forwarded.until(session_id, target)


class LiveApp:
    """A raw ASGI WebSocket app: accept, snapshot (``by_hand`` only), then bursts or updates.

    ``by_hand`` is the bare app's own snapshot: ``async def frame(session_id) -> text | None``,
    sent right after accepting; ``None`` when ``sync`` sends it instead, through the middleware
    or, with a ``bridge``, through :meth:`SessionSync.accept` in :meth:`forward_updates`. With a
    ``bridge``, each session socket forwards the session's updates from NATS; with a plain
    nats-py client (``nats``) instead, it forwards them by hand (:meth:`forward_by_hand`).

    Raises:
        ValueError: A ``bridge`` without a ``sync``: the forwarding loop needs its socket.
    """

    def __init__(
        self,
        by_hand: Callable[[str], Awaitable[str | None]] | None,
        *,
        loader: Any = None,
        sync: SessionSync | None = None,
        bridge: Any = None,
        nats: Any = None,
        stream: TokenStream | None = None,
    ) -> None:
        if bridge is not None and sync is None:
            raise ValueError("forwarding updates needs a SessionSync: run the wrapped variant")
        self.by_hand = by_hand
        self.loader = loader
        self.sync = sync
        self.bridge = bridge
        self.nats = nats
        self.stream = stream
        self.forwarded = stream.forwarded if stream is not None else Forwarded()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve a session socket or the control socket; ignore everything else."""
        if scope["type"] != "websocket":
            return
        if scope["path"] == CONTROL_PATH:
            await self.control(receive, send)
            return
        session_id = scope["path"][len(PREFIX) :]
        if self.bridge is not None:
            await self.forward_updates(scope, session_id, receive, send)
            return
        if self.nats is not None:
            await self.forward_by_hand(session_id, receive, send)
            return
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})  # the middleware sends the snapshot here
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

    async def forward_updates(
        self, scope: Scope, session_id: str, receive: Receive, send: Send
    ) -> None:
        """Subscribe before accepting, then forward every update, as the bridge's docs show."""
        assert self.sync is not None
        if (await receive())["type"] != "websocket.connect":
            return
        accepted = False

        async def counted_send(message: dict[str, Any]) -> None:
            await send(message)
            if accepted:  # a forwarded frame, not the accept or the snapshot
                self.forwarded.add(session_id)

        # Only a token stream waits for the count: without one, the bridge gets the server's
        # own send, as the hand-written forwarder does.
        send_to_socket = send if self.stream is None else counted_send
        async with self.bridge.subscribe(session_id) as updates:
            socket = await self.sync.accept(scope, send_to_socket, session_id)
            accepted = True
            await updates.forward(socket, receive)

    async def forward_by_hand(self, session_id: str, receive: Receive, send: Send) -> None:
        """The floor of fan-out: a subscription per socket, each message sent as it came."""
        if (await receive())["type"] != "websocket.connect":
            return

        async def deliver(msg: Any) -> None:
            await send({"type": "websocket.send", "text": msg.data.decode()})

        subscription = await self.nats.subscribe(subject(session_id), cb=deliver)
        try:
            # One round trip, as the bridge's subscribe: the broker has the subscription
            # before the client has its snapshot, so no update published after it is missed.
            await self.nats.flush()
            await send({"type": "websocket.accept"})
            await self.send_snapshot(session_id, send)
            while (await receive())["type"] != "websocket.disconnect":
                pass
        finally:
            with anyio.CancelScope(shield=True):
                await subscription.unsubscribe()

    async def control(self, receive: Receive, send: Send) -> None:
        """Answer every message of the control socket (see the module's docstring)."""
        await receive()
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            request = (message.get("text") or "").split()
            if request == ["cpu"]:
                answer = repr(time.process_time())
            elif request == ["stats"]:
                answer = json.dumps(
                    {
                        "middleware": None if self.sync is None else self.sync.stats.as_dict(),
                        "loader_calls": getattr(self.loader, "calls", None),
                        "cpu_seconds": time.process_time(),
                    }
                )
            elif request[:1] == ["stream"] and self.stream is not None and len(request) == 5:
                try:
                    await self.stream.run(request[1], request[2], int(request[3]), int(request[4]))
                    answer = "done"
                except Exception as exc:
                    answer = f"failed: {type(exc).__name__}: {exc}"
            else:
                answer = f"failed: unknown request {request!r}"
            await send({"type": "websocket.send", "text": answer})


def sessions_of(args: argparse.Namespace) -> dict[str, Snapshot]:
    """The in-memory sessions the command line asks for."""
    text = FILLER if args.interaction_bytes is None else filler(args.interaction_bytes)
    sizes = dict.fromkeys(numbered_ids(args.sessions), args.interactions)
    sizes.update({session_id_for(size, 0): size for size in args.session_sizes})
    sessions = memory_sessions(sizes, text=text)
    if args.answer:
        from ._answers import with_answer  # the answer parts' session shape

        for snapshot in sessions.values():
            with_answer(snapshot)
    return sessions


async def serve(args: argparse.Namespace) -> None:
    """Build the variant's app over its store and serve it until told to stop."""
    async with AsyncExitStack() as stack:
        bridge: Any = None
        client: Any = None
        if args.nats and args.variant == "wrapped":
            from asgi_session_sync.nats import NatsBridge

            # Full-state frames of 1,000 interactions are about 1 MiB each: allow the
            # subscriptions to hold a few of them rather than report a slow consumer.
            bridge = await stack.enter_async_context(
                NatsBridge(os.environ[NATS_URL_ENV], pending_bytes_limit=256 * 2**20)
            )
        elif args.nats:
            import nats

            client = await nats.connect(os.environ[NATS_URL_ENV])
            stack.push_async_callback(client.close)
        loader: Any
        by_hand: Callable[[str], Awaitable[str | None]]
        stream = None
        if args.db is None:
            store = MemoryStore(sessions_of(args))
            loader, by_hand = store, store.frame
            if args.stream:
                stream = TokenStream(store, bridge, Forwarded())
        else:
            from ._database import HandLoader, library_loader, open_engine

            engine = open_engine(args.db, schema=args.schema, pool_size=args.pool_size)
            stack.push_async_callback(engine.dispose)
            hand = HandLoader(engine, latency=args.db_latency_ms / 1000)
            await hand.warm_up(args.pool_size)
            loader = hand if args.loader == "hand" else library_loader(engine)
            by_hand = hand.frame
        app: Any
        if args.variant == "bare":
            app = LiveApp(by_hand, loader=loader, nats=client)
        else:
            options: dict[str, Any] = {}
            if args.single_flight is not None:
                options["single_flight"] = args.single_flight == "on"
            if args.max_concurrent_loads is not None:
                options["max_concurrent_loads"] = args.max_concurrent_loads
            sync = SessionSync(loader, **options)
            app = LiveApp(None, loader=loader, sync=sync, bridge=bridge, stream=stream)
            if bridge is None:
                # With a bridge the app accepts through sync itself: no middleware then.
                app = SessionSyncMiddleware(app, sync=sync, paths=[PREFIX + "{session_id}"])
        await serve_app(app, watch_stdin=args.watch_stdin)


async def serve_app(app: Callable[..., Any], *, watch_stdin: bool = False) -> None:
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
        lifespan="off",
        backlog=4096,
    )
    server = uvicorn.Server(config)
    # Bind here, on port 0, so the port is free by construction and known before the parent
    # connects: no race between choosing a port and binding it. IPPROTO_TCP, not 0: asyncio
    # sets TCP_NODELAY only on accepted sockets whose proto says TCP, as it does for the
    # sockets uvicorn binds itself. Without it, Nagle's algorithm holds each small frame
    # until the client's delayed ACK (40 ms on Linux).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await anyio.sleep(0.01)
        port = sock.getsockname()[1]
        sys.stdout.write(json.dumps({"port": port, "pid": os.getpid()}) + "\n")
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
    parser.add_argument("--variant", choices=("bare", "wrapped"), required=True)
    parser.add_argument("--sessions", type=int, default=200, help="in-memory sessions s0000...")
    parser.add_argument("--interactions", type=int, default=20, help="interactions of each")
    parser.add_argument(
        "--session-sizes", type=int, nargs="*", default=[], help="and one n<size>-000 of each"
    )
    parser.add_argument("--interaction-bytes", type=int, help="filler per interaction content")
    parser.add_argument(
        "--answer",
        action="store_true",
        help="each session ends with an answer being streamed (see benchmarks._answers)",
    )
    parser.add_argument("--db", help="a database URL (see benchmarks._sessions)")
    parser.add_argument("--schema", help="the tables' PostgreSQL schema")
    parser.add_argument("--loader", choices=("library", "hand"), default="library")
    parser.add_argument("--db-latency-ms", type=float, default=0.0, help="simulated round trip")
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument("--single-flight", choices=("on", "off"))
    parser.add_argument("--max-concurrent-loads", type=int)
    parser.add_argument(
        "--nats", action="store_true", help=f"forward the sessions' updates from ${NATS_URL_ENV}"
    )
    parser.add_argument(
        "--stream", action="store_true", help="publish token streams on request (wrapped --nats)"
    )
    parser.add_argument("--watch-stdin", action="store_true", help="stop when stdin closes")
    args = parser.parse_args(argv)
    if args.stream and not (args.nats and args.variant == "wrapped" and args.db is None):
        parser.error("--stream needs --variant wrapped --nats over the in-memory store")
    if args.nats and not os.environ.get(NATS_URL_ENV):
        parser.error(f"--nats needs the NATS URL in ${NATS_URL_ENV}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run one server (under cProfile when ``BENCHMARKS_PROFILE_DIR`` is set)."""
    args = parse_args(argv)
    raise_open_files_limit()
    profile_dir = os.environ.get(PROFILE_ENV)
    if not profile_dir:
        anyio.run(serve, args)
        return 0
    # cProfile over the whole server, written when it stops. uvicorn shuts down cleanly on
    # SIGTERM, then raises the signal again with the handler it found: the default one would
    # end the process before the stats are written, so SIGTERM raises KeyboardInterrupt here.
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
        return rss_bytes(self.pid)


def rss_bytes(pid: int) -> int:
    """The resident set size of process ``pid`` now (``VmRSS`` in ``/proc/<pid>/status``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """CPU seconds process ``pid`` used so far, to the nanosecond: the sum over its threads.

    Read from ``/proc/<pid>/task/*/schedstat`` (the scheduler's run time of each thread), so a
    thread that has exited no longer counts; the servers measured keep their threads. Falls
    back to ``/proc/<pid>/stat`` (10 ms clock ticks) where schedstat is not available.
    """
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as schedstat:
                total += int(schedstat.read().split()[0])
    except (OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as stat:
            # The command name, in parentheses, may hold spaces: split after it.
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
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

    ``env`` adds environment variables to this process's, for the server only (secrets such as
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
        # Shielded: the server must be stopped even when this run is being cancelled.
        with anyio.CancelScope(shield=True):
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
