"""A real ``websockets`` client with every wait bounded, shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from .conftest import WAIT


@asynccontextmanager
async def client(url: str, *, subprotocols: Sequence[str] = ()) -> AsyncIterator[ClientConnection]:
    """A real WebSocket client with every wait bounded; never goes through a proxy."""
    async with connect(
        url,
        # None, not []: websockets would send an empty Sec-WebSocket-Protocol header.
        subprotocols=[Subprotocol(p) for p in subprotocols] or None,
        proxy=None,
        open_timeout=WAIT,
        close_timeout=WAIT,
    ) as ws:
        yield ws


async def receive_text(ws: ClientConnection) -> str:
    """The next frame, which must be a text frame, within ``WAIT`` seconds."""
    with anyio.fail_after(WAIT):
        frame = await ws.recv()
    assert isinstance(frame, str), f"expected a text frame, got {frame!r}"
    return frame
