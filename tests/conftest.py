from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from asgi_session_sync import SessionContext
from asgi_session_sync._types import Receive, Scope, Send
from asgi_session_sync.nats import EmbeddedNats

# The app and the loader the core tests share. Test modules import them from here
# (``from conftest import greeting_app``), in-process and under real servers alike.

SESSION = {"title": "demo", "interactions": [{"prompt": "hi", "response": "hello"}]}


async def greeting_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Accepts (with "v2" when the client offers it), greets at once, then echoes until the
    client leaves."""
    assert scope["type"] == "websocket"
    assert (await receive())["type"] == "websocket.connect"
    subprotocol = "v2" if "v2" in scope.get("subprotocols", ()) else None
    await send({"type": "websocket.accept", "subprotocol": subprotocol})
    await send({"type": "websocket.send", "text": "hello"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        await send({"type": "websocket.send", "text": "echo:" + message["text"]})


class RecordingLoader:
    """A loader that records every context it was called with and returns ``result(ctx)``."""

    def __init__(self, result: Any = None) -> None:
        self.fixed = SESSION if result is None else result
        self.calls: list[SessionContext] = []

    async def __call__(self, ctx: SessionContext) -> Any:
        self.calls.append(ctx)
        return self.result(ctx)

    def result(self, ctx: SessionContext) -> Any:
        """What to return for ``ctx``: the fixed result by default."""
        return self.fixed


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def nats_server() -> AsyncIterator[EmbeddedNats]:
    """A private nats-server on a free port of 127.0.0.1, stopped after the test.

    nats-py runs on asyncio only: modules using it set ``anyio_backend`` to ``"asyncio"``.
    """
    async with EmbeddedNats() as server:
        yield server
