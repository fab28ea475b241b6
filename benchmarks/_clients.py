"""The one client helper: the load generator's side of every benchmark.

- :func:`server_pair` starts servers of :mod:`benchmarks._server` side by side, each in its
  own process, each with a :class:`Control` socket (its CPU time, its counters, streams).
- :func:`open_client` opens a real WebSocket client (``websockets``) as every part does;
  :func:`first_frame` connects, receives the first frame and closes.
- :class:`RawWebSocket` is a client that does as little as a client can (a hand-written
  handshake, frames read as bytes and checked after the clock stops), so that the server,
  not the client, bounds a stream of frames.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from websockets.asyncio.client import ClientConnection, connect

from ._server import CONTROL_PATH, PREFIX, ServerProcess, running_server, server_args

__all__ = [
    "Control",
    "FirstFrame",
    "RawWebSocket",
    "Server",
    "encoded_frames",
    "first_frame",
    "open_client",
    "rotate",
    "server_pair",
]


def rotate(variants: Sequence[str], turn: int) -> list[str]:
    """``variants`` starting from a different one each turn, so none always goes first."""
    shift = turn % len(variants)
    return [*variants[shift:], *variants[:shift]]


async def open_client(url: str, *, bound: float) -> ClientConnection:
    """A ``websockets`` client as every benchmark opens it.

    No compression (neither side then pays for deflate, which would hide the middleware's
    share), no keepalive pings, no proxy, no size limit; the handshake and the close bounded
    by ``bound`` seconds.
    """
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
        answer = await self.ws.recv()
        return answer if isinstance(answer, str) else answer.decode()

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

    def url(self, session_id: str) -> str:
        """The WebSocket URL of ``session_id`` on this server."""
        return f"{self.process.ws_url}{PREFIX}{session_id}"


@asynccontextmanager
async def server_pair(
    variants: Mapping[str, Sequence[str]] | Sequence[str] = ("bare", "wrapped"),
    *options: str,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[dict[str, Server]]:
    """Start fresh servers concurrently, one per variant; always stop them all.

    ``variants`` names each server's variant (``bare`` or ``wrapped``), or maps a name to the
    arguments of its server; ``options`` are added to every server's arguments, ``env`` to
    every server's environment.
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
            process = processes[name]
            ws = await open_client(f"{process.ws_url}{CONTROL_PATH}", bound=10)
            stack.push_async_callback(ws.close)
            servers[name] = Server(name, process, Control(ws))
        yield servers


@dataclass
class FirstFrame:
    """One connection: seconds to the handshake and to the first frame, and that frame."""

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
            frame = await ws.recv()
            done = time.perf_counter()
        finally:
            await ws.close()
    text = frame if isinstance(frame, str) else frame.decode()
    return FirstFrame(opened=opened - started, total=done - started, text=text)


def encoded_frames(texts: Sequence[str]) -> bytes:
    """The bytes a server sends for these text frames: unmasked, uncompressed, one per text."""
    out = bytearray()
    for text in texts:
        payload = text.encode()
        out += frame_header(0x1, len(payload), masked=False)
        out += payload
    return bytes(out)


def frame_header(opcode: int, length: int, *, masked: bool) -> bytes:
    """A final frame's header (RFC 6455 section 5.2), without the masking key."""
    mask_bit = 0x80 if masked else 0
    if length < 126:
        return bytes([0x80 | opcode, mask_bit | length])
    if length < 1 << 16:
        return bytes([0x80 | opcode, mask_bit | 126]) + length.to_bytes(2, "big")
    return bytes([0x80 | opcode, mask_bit | 127]) + length.to_bytes(8, "big")


class _Received(asyncio.Protocol):
    """Every byte the server sent, in one buffer; wakes a waiter once enough has arrived."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self._want = 0
        self._waiter: asyncio.Future[None] | None = None
        self._lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        waiter = self._waiter
        if waiter is not None and len(self.buffer) >= self._want and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionError("connection closed by the server")
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(self._lost)

    async def until(self, size: int) -> None:
        """Return once the buffer holds at least ``size`` bytes."""
        while len(self.buffer) < size:
            if self._lost is not None:
                raise self._lost
            self._want = size
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


class RawWebSocket:
    """A minimal WebSocket client (RFC 6455) on asyncio: handshake, masked sends, raw reads.

    Received frames are not parsed as they arrive: :meth:`receive_exactly` waits for a known
    number of bytes, so reading a stream costs the client nearly nothing and the server is
    what bounds it. The caller checks the bytes against what it expected.
    """

    def __init__(self, protocol: _Received) -> None:
        self._protocol = protocol
        self._offset = 0

    @classmethod
    async def connect(cls, port: int, path: str) -> RawWebSocket:
        """Open a connection and complete the handshake (no extensions, no subprotocol)."""
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(_Received, "127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        assert protocol.transport is not None
        protocol.transport.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        ws = cls(protocol)
        while (end := protocol.buffer.find(b"\r\n\r\n")) < 0:
            await protocol.until(len(protocol.buffer) + 1)
        if not protocol.buffer.startswith(b"HTTP/1.1 101 "):
            raise ConnectionError(f"handshake refused: {bytes(protocol.buffer[:40])!r}")
        ws._offset = end + 4
        return ws

    async def receive_text(self) -> str:
        """Read one whole text frame (unfragmented, as the servers here send them)."""
        return (await self.receive_frame()).decode()

    async def receive_frame(self) -> bytes:
        """Read one whole text frame's payload, as bytes, undecoded (the cheapest read).

        A ping on the way is answered with its pong (uvicorn pings every 20 s, and closes a
        connection that does not answer), a pong skipped. The buffer is trimmed as the stream
        goes, so a stream of any length costs its frames.
        """
        while True:
            first, payload = await self._next_frame()
            if first == 0x81:
                return payload
            if first == 0x89:
                self._send(0xA, payload)
            elif first != 0x8A:
                raise ConnectionError(f"expected a final text frame, got first byte {first:#x}")

    async def _next_frame(self) -> tuple[int, bytes]:
        """The next frame's first byte and its payload."""
        buffer = self._protocol
        await buffer.until(self._offset + 2)
        first, second = buffer.buffer[self._offset], buffer.buffer[self._offset + 1]
        length, start = second & 0x7F, self._offset + 2
        if length == 126:
            await buffer.until(start + 2)
            length, start = int.from_bytes(buffer.buffer[start : start + 2], "big"), start + 2
        elif length == 127:
            await buffer.until(start + 8)
            length, start = int.from_bytes(buffer.buffer[start : start + 8], "big"), start + 8
        await buffer.until(start + length)
        self._offset = start + length
        payload = bytes(buffer.buffer[start : self._offset])
        self._trim()
        return first, payload

    async def receive_exactly(self, size: int) -> bytes:
        """Wait for the next ``size`` bytes the server sends and return them."""
        end = self._offset + size
        await self._protocol.until(end)
        data = bytes(self._protocol.buffer[self._offset : end])
        self._offset = end
        self._trim()
        return data

    def _trim(self) -> None:
        if self._offset > 1 << 22:  # keep the buffer small over a long stream
            del self._protocol.buffer[: self._offset]
            self._offset = 0

    def send_text(self, text: str) -> None:
        """Send one masked text frame."""
        self._send(0x1, text.encode())

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert self._protocol.transport is not None
        self._protocol.transport.write(
            frame_header(opcode, len(payload), masked=True) + mask + masked
        )

    async def close(self) -> None:
        """Send a close frame (1000) and drop the connection."""
        transport = self._protocol.transport
        if transport is None or transport.is_closing():
            return
        self._send(0x8, (1000).to_bytes(2, "big"))
        transport.close()
