"""The load generator's side: servers side by side, and the clients that measure them.

:func:`running_servers` starts servers of :mod:`benchmarks._server`, each with a
:class:`Control` socket. :func:`first_frame` uses the ``websockets`` asyncio client;
:func:`open_event_stream` and :func:`first_event` use ``h11`` (0.34 ms of client CPU per
connection here, httpx 1.4 ms, which would hide the server's share). :class:`LightClient` is
``websockets``' sans-I/O protocol on an asyncio transport, with no task of its own, where the
client must cost less than the server: bursts read as bytes and parsed after the clock (the
asyncio client takes 4.2 us of CPU per frame, the server 2.5 us to send it), and :func:`storm`'s
thousands of clients in worker processes (``python -m benchmarks._clients`` is one).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import h11
from anyio.streams.buffered import BufferedByteReceiveStream
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from ._report import REPOSITORY
from ._server import (
    CONTROL_PATH,
    PREFIX,
    SSE_PREFIX,
    ServerProcess,
    cpu_seconds,
    raise_open_files_limit,
    running_server,
    server_args,
)
from ._sessions import SNAPSHOT_VERSION


def rotate(variants: Sequence[Any], turn: int) -> list[Any]:
    """``variants`` starting from a different one each turn, so none always goes first."""
    shift = turn % len(variants)
    return [*variants[shift:], *variants[:shift]]


async def open_client(url: str, *, bound: float) -> ClientConnection:
    """A ``websockets`` client as every part opens it: no compression (deflate would hide the
    middleware's share), no pings, no proxy, no size limit, bounded by ``bound`` seconds."""
    options = {"compression": None, "ping_interval": None, "proxy": None, "max_size": None}
    return await connect(url, open_timeout=bound, close_timeout=bound, **options)


@dataclass
class Control:
    """A server's control socket (see :mod:`benchmarks._server`): ``cpu``, ``stats`` (the
    loader's calls, the middleware's counters) and ``timings`` (seconds per session socket to
    its snapshot sent, since last asked, with ``--time``)."""

    ws: ClientConnection

    async def ask(self, request: str) -> Any:
        """The server's answer to ``request``, parsed as JSON."""
        await self.ws.send(request)
        return json.loads(await self.ws.recv(decode=True))

    async def cpu(self) -> float:
        """The server process's CPU seconds now."""
        return float(await self.ask("cpu"))


@dataclass
class Server:
    """One running server: its variant, its process and its control socket."""

    variant: str
    process: ServerProcess
    control: Control

    def url(self, session_id: str, transport: str = "websocket") -> str:
        """The URL of ``session_id`` on this server, as a WebSocket or an event stream."""
        scheme, prefix = ("http", SSE_PREFIX) if transport == "sse" else ("ws", PREFIX)
        return f"{scheme}://127.0.0.1:{self.process.port}{prefix}{session_id}"


@asynccontextmanager
async def running_servers(
    variants: Mapping[str, Sequence[str]] | Sequence[str],
    *options: str,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[dict[str, Server]]:
    """Start fresh servers at once, one per variant (or name: its server's arguments), with
    ``options`` added to each one's arguments and ``env`` to its environment; always stop them."""
    named = variants if isinstance(variants, Mapping) else {v: server_args(v) for v in variants}
    async with AsyncExitStack() as stack:
        processes: dict[str, ServerProcess] = {}

        async def start(name: str, args: Sequence[str]) -> None:
            server = running_server([*args, *options], env=env)
            processes[name] = await stack.enter_async_context(server)

        async with anyio.create_task_group() as tg:
            for name, args in named.items():
                tg.start_soon(start, name, args)
        servers = {}
        for name, process in processes.items():
            ws = await open_client(f"ws://127.0.0.1:{process.port}{CONTROL_PATH}", bound=10)
            stack.push_async_callback(ws.close)
            servers[name] = Server(name, process, Control(ws))
        yield {name: servers[name] for name in named}


async def measured(
    server: Server, broker: int, clients: Sequence[Any], work: Awaitable[Any], bound: float
) -> dict[str, float]:
    """Await ``work`` (within ``bound`` seconds) with ``clients`` connected, then close them:
    its wall seconds, and the CPU seconds of the server and of the broker (pid) meanwhile."""
    try:
        cpu, broker_cpu, started = (
            await server.control.cpu(),
            cpu_seconds(broker),
            time.perf_counter(),
        )
        with anyio.fail_after(bound):
            await work
        wall = time.perf_counter() - started
        cpu, broker_cpu = await server.control.cpu() - cpu, cpu_seconds(broker) - broker_cpu
        return {"wall": wall, "cpu": cpu, "nats_cpu": broker_cpu}
    finally:
        with anyio.CancelScope(shield=True):
            for client in clients:
                await client.close()


@dataclass
class FirstFrame:
    """One connection: seconds to the handshake and to the first frame (or event), and it."""

    opened: float
    total: float
    text: str


async def first_frame(url: str, *, bound: float) -> FirstFrame:
    """Connect, receive the first frame, close; time from starting to connect to the frame.

    Raises ``TimeoutError`` after ``bound`` seconds.
    """
    started = time.perf_counter()
    with anyio.fail_after(bound):
        ws = await open_client(url, bound=bound)
        try:
            opened = time.perf_counter()
            frame = await ws.recv(decode=True)
            done = time.perf_counter()
        finally:
            await ws.close()
    return FirstFrame(opened - started, done - started, str(frame))


async def first_event(url: str, *, bound: float) -> FirstFrame:
    """:func:`open_event_stream`, then leave: time from starting to connect to the end of
    the first event. Raises ``TimeoutError`` after ``bound`` seconds."""
    with anyio.fail_after(bound):
        first, stream = await open_event_stream(url)
        await stream.aclose()
    return first


async def open_event_stream(url: str) -> tuple[FirstFrame, anyio.abc.ByteStream]:
    """Open an event stream and read its first event (to its blank line); ``opened`` is when
    the response's head arrived. The stream stays open for the caller to close.

    Raises:
        ConnectionError: The response is not a 200, or ends before its first event.
    """
    where = urllib.parse.urlsplit(url)
    started = time.perf_counter()
    stream = await anyio.connect_tcp(where.hostname or "", where.port or 80)
    try:
        http = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target=where.path, headers=[("host", where.netloc)])
        await stream.send(http.send(request) or b"")
        opened, body = 0.0, b""
        while b"\n\n" not in body:
            event = http.next_event()
            if event is h11.NEED_DATA:
                http.receive_data(await stream.receive())
            elif isinstance(event, h11.Response) and event.status_code == 200:
                opened = time.perf_counter()
            elif isinstance(event, h11.Data):
                body += event.data
            else:
                raise ConnectionError(f"not an event stream's start: {event!r}")
    except BaseException:
        await stream.aclose()
        raise
    return FirstFrame(opened - started, time.perf_counter() - started, body.decode()), stream


class LightClient(asyncio.Protocol):
    """``websockets``' sans-I/O ``ClientProtocol`` on an asyncio transport, and nothing else.

    Bytes are kept as they arrive and parsed only when a caller asks for an event
    (:meth:`next_text`), or taken whole (:meth:`receive_bytes`) and parsed by the caller after
    its clock stopped (:meth:`parse`). The servers here send no pings.
    """

    def __init__(self, url: str) -> None:
        self.protocol = ClientProtocol(parse_uri(url), max_size=None)
        self.received = bytearray()
        self.transport: asyncio.Transport | None = None
        self.connected_at = 0.0  # when the TCP connection was up: the kernel accepted it
        self._events: deque[Any] = deque()
        self._waiter: tuple[int, asyncio.Future[None]] | None = None
        self._lost: BaseException | None = None

    @classmethod
    async def connect(cls, url: str) -> LightClient:
        """Connect and complete the handshake; raise the protocol's error if it failed."""
        where = urllib.parse.urlsplit(url)
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(lambda: cls(url), where.hostname, where.port)
        await client.next_event()  # the response
        if client.protocol.handshake_exc is not None:
            raise client.protocol.handshake_exc
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport, self.connected_at = transport, time.perf_counter()
        self.protocol.send_request(self.protocol.connect())
        self._write()

    def data_received(self, data: bytes) -> None:
        self.received += data
        if self._waiter is not None and len(self.received) >= self._waiter[0]:
            self._wake(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionError("connection closed by the server")
        self._wake(self._lost)

    def _wake(self, error: BaseException | None) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter[1].done():  # not cancelled by a timeout meanwhile
            waiter[1].set_result(None) if error is None else waiter[1].set_exception(error)

    async def receive_bytes(self, size: int) -> bytes:
        """The next ``size`` bytes the server sends, unparsed."""
        while len(self.received) < size:
            if self._lost is not None:
                raise self._lost
            self._waiter = (size, asyncio.get_running_loop().create_future())
            await self._waiter[1]
        data = bytes(self.received[:size])
        del self.received[:size]
        return data

    def parse(self, data: bytes) -> list[Any]:
        """Every event ``data`` holds (a response, frames), parsed by the protocol."""
        self.protocol.receive_data(data)
        self._write()
        return self.protocol.events_received()

    async def next_event(self) -> Any:
        """The next event: the handshake's response, then frames."""
        while not self._events:
            data = await self.receive_bytes(max(1, len(self.received)))
            self._events.extend(self.parse(data))
        return self._events.popleft()

    async def next_text(self) -> bytes:
        """The next frame's payload, which must be text (else ``ConnectionError``)."""
        frame = await self.next_event()
        if not isinstance(frame, Frame) or frame.opcode is not Opcode.TEXT:
            raise ConnectionError(f"expected a text frame, got {frame!r}")
        return bytes(frame.data)

    def send_text(self, text: str) -> None:
        """Send one text frame."""
        self.protocol.send_text(text.encode())
        self._write()

    def _write(self) -> None:
        assert self.transport is not None
        self.transport.writelines(self.protocol.data_to_send())

    def close(self) -> None:
        """Send a close frame (1000) and drop the connection."""
        if self.transport is not None and not self.transport.is_closing():
            self.protocol.send_close(1000)
            self._write()
            self.transport.close()


def encoded_frames(texts: Sequence[str]) -> bytes:
    """The bytes a server sends for these text frames, encoded by ``websockets``."""
    return b"".join(
        Frame(Opcode.TEXT, t.encode()).serialize(mask=False, extensions=[]) for t in texts
    )


@dataclass
class Storm:
    """Each client's ``[TCP connected, handshake done, snapshot]`` (seconds from its start, or
    ``None``), finish time and error; the release (``time.perf_counter``, one clock across
    processes on Linux); CPU seconds from the release to all current: workers, server, machine."""

    clients: list[list[Any]]
    released_at: float
    client_cpu: float
    server_cpu: float
    machine_cpu: float
    listen_drops: int  # connections the kernel dropped meanwhile, its listen queue full


async def storm(url: str, ids: Sequence[str], *, server: int, workers: int, bound: float) -> Storm:
    """Connect a client to each of ``ids`` (``url`` + id) at once, spread over ``workers``
    processes, each checking that its first frame is its session's current snapshot; every
    connection stays open until every client has its snapshot or failed. ``server``: its pid."""
    async with AsyncExitStack() as stack:
        pipes = []
        for index in range(workers):
            command, pipe = [sys.executable, "-m", "benchmarks._clients"], subprocess.PIPE
            worker = await anyio.open_process(
                command, stdin=pipe, stdout=pipe, stderr=None, cwd=REPOSITORY
            )
            stack.push_async_callback(worker.aclose)
            assert worker.stdin is not None
            assert worker.stdout is not None
            pipes.append((worker.stdin, BufferedByteReceiveStream(worker.stdout)))
            config = {"url": url, "ids": list(ids[index::workers]), "bound": bound}
            await worker.stdin.send(json.dumps(config).encode() + b"\n")

        async def each(say: bytes) -> list[bytes]:
            for stdin, _ in pipes if say else ():
                await stdin.send(say)
            with anyio.fail_after(bound + 60):
                return [await stdout.receive_until(b"\n", 1 << 26) for _, stdout in pipes]

        if await each(b"") != [b"ready"] * workers:
            raise RuntimeError("a storm worker did not start")
        before = cpu_seconds(server), machine_cpu_seconds(), listen_drops()
        released_at = time.perf_counter()
        if await each(b"go\n") != [b"current"] * workers:
            raise RuntimeError("a storm worker did not finish")
        after = cpu_seconds(server), machine_cpu_seconds(), listen_drops()
        results = [json.loads(line) for line in await each(b"close\n")]
    clients = [client for result in results for client in result["clients"]]
    spent = [b - a for a, b in zip(before, after, strict=True)]
    return Storm(clients, released_at, sum(r["cpu"] for r in results), *spent)  # type: ignore[arg-type]


def machine_cpu_seconds() -> float:
    """CPU seconds all processes used since boot (``/proc/stat``, idle and iowait left out)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def listen_drops() -> int:
    """Connections the kernel dropped since boot because a listen queue was full."""
    with open("/proc/net/netstat") as netstat:
        names, values = [line.split() for line in netstat if line.startswith("TcpExt:")][:2]
    return int(values[names.index("ListenDrops")])


async def storm_worker() -> None:
    """A storm's worker: read its clients, say ``ready``; connect them all on ``go``; say
    ``current`` once each has its snapshot or failed; on ``close``, close them, check the
    snapshots and write the results as one JSON line."""
    raise_open_files_limit()
    config = json.loads(await anyio.to_thread.run_sync(sys.stdin.readline))
    release, answered = anyio.Event(), anyio.Event()
    results: list[list[Any]] = []
    opened: list[LightClient] = []

    async def client(session_id: str) -> None:
        await release.wait()
        started = time.perf_counter()
        result: list[Any] = [None, None, None, 0.0, None, b"", session_id]
        try:
            with anyio.fail_after(config["bound"]):
                opened.append(ws := await LightClient.connect(config["url"] + session_id))
                result[:2] = ws.connected_at - started, time.perf_counter() - started
                result[5] = await ws.next_text()
                result[2] = time.perf_counter() - started
        except Exception as exc:
            result[4] = type(exc).__name__
        result[3] = time.perf_counter()
        results.append(result)
        if len(results) == len(config["ids"]):
            answered.set()

    async with anyio.create_task_group() as tg:
        for session_id in config["ids"]:
            tg.start_soon(client, session_id)
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)  # go
        cpu = time.process_time()
        release.set()
        await answered.wait()
        cpu = time.process_time() - cpu
        print("current", flush=True)
    await anyio.to_thread.run_sync(sys.stdin.readline)  # close
    for ws in opened:
        ws.close()
    for result in results:
        session_id, frame = result.pop(), result.pop()
        result[4] = result[4] or problem(frame, session_id)
    print(json.dumps({"clients": results, "cpu": cpu}), flush=True)


def problem(frame: bytes, session_id: str) -> str | None:
    """Why ``frame`` is not the current snapshot of ``session_id``, or ``None`` when it is."""
    try:
        event = json.loads(frame)
    except ValueError:
        return "first frame is not JSON"
    if event.get("type") != "session_update" or event.get("session_id") != session_id:
        return "first frame is not the session's snapshot"
    return None if event.get("version") == SNAPSHOT_VERSION else "snapshot not current"


if __name__ == "__main__":
    anyio.run(storm_worker)
