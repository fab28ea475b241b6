"""The load generator's side of every part: servers side by side, and the clients that use them.

- :func:`running_servers` starts servers of :mod:`benchmarks._server` concurrently, each in its
  own process, each with a :class:`Control` socket (its CPU time, its counters, streams).
- :func:`open_client` is the ``websockets`` asyncio client as every part opens it, and
  :func:`first_frame` connects with it, receives the first frame and closes.
- :func:`first_event` is the same for an event stream, over ``h11`` (the HTTP/1.1 library
  uvicorn serves with): 0.34 ms of client CPU per connection here, where httpx took 1.4 ms and
  would have hidden the server's share.
- :class:`LightClient` is ``websockets``' own sans-I/O protocol on an asyncio transport, with no
  task per connection, for where the client must cost less than the server: a burst read as
  bytes and parsed after the clock stops (the asyncio client takes 4.2 us of CPU per frame, the
  server 2.5 us to send it), and :func:`storm`, thousands of clients at once in several worker
  processes (``python -m benchmarks._clients`` is a worker).
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
from collections.abc import AsyncIterator, Mapping, Sequence
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
from ._sessions import SNAPSHOT_VERSION
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

__all__ = [
    "Control",
    "FirstFrame",
    "LightClient",
    "Server",
    "first_event",
    "first_frame",
    "open_client",
    "open_event_stream",
    "rotate",
    "running_servers",
    "server_pair",
    "storm",
]


def rotate(variants: Sequence[Any], turn: int) -> list[Any]:
    """``variants`` starting from a different one each turn, so none always goes first."""
    shift = turn % len(variants)
    return [*variants[shift:], *variants[:shift]]


async def open_client(url: str, *, bound: float) -> ClientConnection:
    """A ``websockets`` client as every part opens it: no compression (neither side pays for
    deflate, which would hide the middleware's share), no pings, no proxy, no size limit; the
    handshake and the close bounded by ``bound`` seconds."""
    return await connect(
        url,
        compression=None,
        ping_interval=None,
        proxy=None,
        open_timeout=bound,
        close_timeout=bound,
        max_size=None,
    )


class Control:
    """The server's control socket (see :mod:`benchmarks._server`): one answer per request."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def ask(self, request: str) -> str:
        """Send ``request``; return the answer."""
        await self.ws.send(request)
        return str(await self.ws.recv(decode=True))

    async def cpu(self) -> float:
        """The server process's CPU seconds now (all threads, nanosecond resolution)."""
        return float(await self.ask("cpu"))

    async def stats(self) -> dict[str, Any]:
        """The middleware's counters, the loader's own call count, the CPU seconds."""
        answer: dict[str, Any] = json.loads(await self.ask("stats"))
        return answer


@dataclass
class Server:
    """One running server: its variant, its process and its control socket."""

    variant: str
    process: ServerProcess
    control: Control

    def url(self, session_id: str, transport: str = "websocket") -> str:
        """The URL of ``session_id`` on this server: a WebSocket's, or an event stream's."""
        if transport == "sse":
            return f"http://127.0.0.1:{self.process.port}{SSE_PREFIX}{session_id}"
        return f"{self.process.ws_url}{PREFIX}{session_id}"


@asynccontextmanager
async def running_servers(
    variants: Mapping[str, Sequence[str]] | Sequence[str],
    *options: str,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[dict[str, Server]]:
    """Start fresh servers concurrently, one per variant; always stop them all.

    ``variants`` names each server's variant, or maps a name to the arguments of its server;
    ``options`` are added to every server's arguments, ``env`` to its environment.
    """
    if not isinstance(variants, Mapping):
        variants = {v: server_args(v) for v in variants}
    async with AsyncExitStack() as stack:
        processes: dict[str, ServerProcess] = {}

        async def start(name: str, args: Sequence[str]) -> None:
            server = running_server([*args, *options], env=env)
            processes[name] = await stack.enter_async_context(server)

        async with anyio.create_task_group() as tg:
            for name, args in variants.items():
                tg.start_soon(start, name, args)
        servers = {}
        for name in variants:
            ws = await open_client(f"{processes[name].ws_url}{CONTROL_PATH}", bound=10)
            stack.push_async_callback(ws.close)
            servers[name] = Server(name, processes[name], Control(ws))
        yield servers


server_pair = running_servers  # the name benchmarks.snapshot_cost knows


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
    """Open an event stream, read its first event, leave; time from starting to connect to
    the end of that event (its blank line). ``opened`` is when the response's head arrived.

    Raises:
        TimeoutError: After ``bound`` seconds.
        ConnectionError: The response is not a 200 (its status is in the message).
    """
    with anyio.fail_after(bound):
        first, stream = await open_event_stream(url)
        await stream.aclose()
    return first


async def open_event_stream(url: str) -> tuple[FirstFrame, anyio.abc.ByteStream]:
    """Open an event stream and read its first event (see :func:`first_event`); the stream
    stays open for the caller to close."""
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
            elif isinstance(event, h11.Response):
                if event.status_code != 200:
                    raise ConnectionError(f"status {event.status_code}")
                opened = time.perf_counter()
            elif isinstance(event, h11.Data):
                body += event.data
            else:
                raise ConnectionError(f"the stream ended before its first event: {event!r}")
    except BaseException:
        await stream.aclose()
        raise
    first = FirstFrame(opened - started, time.perf_counter() - started, body.decode())
    return first, stream


class LightClient(asyncio.Protocol):
    """``websockets``' sans-I/O ``ClientProtocol`` on an asyncio transport, and nothing else.

    Bytes are kept as they arrive and handed to the protocol only when a caller asks for an
    event (:meth:`next_text`), or taken whole (:meth:`receive_bytes`) and parsed by the caller
    after its clock stopped. Servers here send no pings (``ws_ping_interval=None``).
    """

    def __init__(self, url: str) -> None:
        self.protocol = ClientProtocol(parse_uri(url), max_size=None)
        self.received = bytearray()
        self.transport: asyncio.Transport | None = None
        self._events: deque[Any] = deque()
        self._want = 0
        self._waiter: asyncio.Future[None] | None = None
        self._lost: BaseException | None = None
        self.connected_at = 0.0  # when the TCP connection was up (the kernel accepted it)

    @classmethod
    async def connect(cls, url: str) -> LightClient:
        """Connect and complete the handshake (no extensions, no subprotocol).

        Raises:
            websockets.exceptions.InvalidHandshake: The server refused the handshake.
        """
        where = urllib.parse.urlsplit(url)
        _, client = await asyncio.get_running_loop().create_connection(
            lambda: cls(url), where.hostname, where.port
        )
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
        if self._waiter is not None and len(self.received) >= self._want:
            self._waiter.set_result(None)
            self._waiter = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionError("connection closed by the server")
        if self._waiter is not None:
            self._waiter.set_exception(self._lost)
            self._waiter = None

    async def _until(self, size: int) -> None:
        while len(self.received) < size:
            if self._lost is not None:
                raise self._lost
            self._want, self._waiter = size, asyncio.get_running_loop().create_future()
            await self._waiter

    async def receive_bytes(self, size: int) -> bytes:
        """The next ``size`` bytes the server sends, unparsed: parse them with :meth:`parse`."""
        await self._until(size)
        data = bytes(self.received[:size])
        del self.received[:size]
        return data

    def parse(self, data: bytes) -> list[Any]:
        """Every event ``data`` (a response, frames) holds, parsed by the protocol."""
        self.protocol.receive_data(data)
        self._write()
        return self.protocol.events_received()

    async def next_event(self) -> Any:
        """The next event: the handshake's response, then frames."""
        while not self._events:
            if not self.received:
                await self._until(1)
            data = bytes(self.received)
            self.received.clear()
            self._events.extend(self.parse(data))
        return self._events.popleft()

    async def next_text(self) -> bytes:
        """The next frame's payload, which must be text.

        Raises:
            ConnectionError: The next frame is not a text frame.
        """
        frame = await self.next_event()
        if not isinstance(frame, Frame) or frame.opcode is not Opcode.TEXT:
            raise ConnectionError(f"expected a text frame, got {frame!r}")
        return frame.data

    def send_text(self, text: str) -> None:
        """Send one text frame."""
        self.protocol.send_text(text.encode())
        self._write()

    def _write(self) -> None:
        assert self.transport is not None
        for data in self.protocol.data_to_send():
            if data:
                self.transport.write(data)

    def close(self) -> None:
        """Send a close frame (1000) and drop the connection."""
        if self.transport is not None and not self.transport.is_closing():
            self.protocol.send_close(1000)
            self._write()
            self.transport.close()


def encoded_frames(texts: Sequence[str]) -> bytes:
    """The bytes a server sends for these text frames (unmasked), encoded by ``websockets``."""
    return b"".join(
        Frame(Opcode.TEXT, text.encode()).serialize(mask=False, extensions=[]) for text in texts
    )


@dataclass
class Storm:
    """Every client's ``[TCP connected s, handshake s, total s, finished at, error or None]``
    (seconds from its start), the moment they were
    released (``time.perf_counter``, one clock across processes on Linux), and CPU seconds
    from the release until every client had its snapshot or failed: the workers', the
    server's, and the whole machine's."""

    clients: list[list[Any]]
    released_at: float
    client_cpu: float
    server_cpu: float
    machine_cpu: float


async def storm(
    url: str, session_ids: Sequence[str], *, server_pid: int, workers: int, bound: float
) -> Storm:
    """Connect a client to each of ``session_ids`` (``url`` + id) at once, spread over
    ``workers`` processes, each client checking its first frame is its session's current
    snapshot; every connection stays open until every client has its snapshot or failed."""
    async with AsyncExitStack() as stack:
        pipes = []
        for index in range(workers):
            process = await stack.enter_async_context(
                await anyio.open_process(
                    [sys.executable, "-m", "benchmarks._clients"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=None,
                    cwd=REPOSITORY,
                )
            )
            assert process.stdin is not None and process.stdout is not None
            pipes.append((process.stdin, BufferedByteReceiveStream(process.stdout)))
            config = {"url": url, "ids": list(session_ids[index::workers]), "bound": bound}
            await process.stdin.send(json.dumps(config).encode() + b"\n")

        async def each(say: bytes) -> list[bytes]:
            for stdin, _ in pipes if say else ():
                await stdin.send(say)
            with anyio.fail_after(bound + 60):
                return [await stdout.receive_until(b"\n", 1 << 26) for _, stdout in pipes]

        if await each(b"") != [b"ready"] * workers:
            raise RuntimeError("a storm worker did not start")
        server_cpu, machine_cpu = cpu_seconds(server_pid), machine_cpu_seconds()
        released_at = time.perf_counter()
        if await each(b"go\n") != [b"current"] * workers:
            raise RuntimeError("a storm worker did not finish")
        server_cpu = cpu_seconds(server_pid) - server_cpu
        machine_cpu = machine_cpu_seconds() - machine_cpu
        results = [json.loads(line) for line in await each(b"close\n")]
    clients = [client for result in results for client in result["clients"]]
    client_cpu = sum(result["cpu"] for result in results)
    return Storm(clients, released_at, client_cpu, server_cpu, machine_cpu)


def machine_cpu_seconds() -> float:
    """CPU seconds all processes used since boot (``/proc/stat``, idle and iowait left out)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


async def storm_worker() -> None:
    """A storm's worker process: read its clients, say ``ready``, connect them all on ``go``,
    say ``current`` once each has its snapshot or failed, close them on ``close``, and write
    the results as one JSON line."""
    raise_open_files_limit()
    config = json.loads(await anyio.to_thread.run_sync(sys.stdin.readline))
    release, answered = anyio.Event(), anyio.Event()
    clients: list[list[Any]] = []
    frames: list[tuple[bytes | None, str]] = []
    opened: list[LightClient] = []

    async def client(session_id: str) -> None:
        await release.wait()
        started = time.perf_counter()
        result: list[Any] = [None, None, None, 0.0, None]
        frame = None
        try:
            with anyio.fail_after(config["bound"]):
                ws = await LightClient.connect(config["url"] + session_id)
                opened.append(ws)
                result[:2] = ws.connected_at - started, time.perf_counter() - started
                frame = await ws.next_text()
            result[2] = time.perf_counter() - started
        except Exception as exc:
            result[4] = type(exc).__name__
        result[3] = time.perf_counter()
        clients.append(result)
        frames.append((frame, session_id))
        if len(clients) == len(config["ids"]):
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
    for result, (frame, session_id) in zip(clients, frames, strict=True):
        if result[4] is None:
            result[4] = problem(frame, session_id)
    print(json.dumps({"clients": clients, "cpu": cpu}), flush=True)


def problem(frame: bytes | None, session_id: str) -> str | None:
    """Why ``frame`` is not the current snapshot of ``session_id``, or ``None`` when it is."""
    try:
        event = json.loads(frame or b"")
    except ValueError:
        return "first frame is not JSON"
    if event.get("type") != "session_update" or event.get("session_id") != session_id:
        return "first frame is not the session's snapshot"
    if not event.get("session", {}).get("interactions"):
        return "snapshot without interactions"
    return None if event.get("version") == SNAPSHOT_VERSION else "snapshot not current"


if __name__ == "__main__":
    anyio.run(storm_worker)
