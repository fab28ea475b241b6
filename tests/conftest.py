from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest

from asgi_session_sync import SessionContext
from asgi_session_sync._types import Receive, Scope, Send
from asgi_session_sync.nats import EmbeddedNats
from asgi_session_sync.testing import connect_websocket

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


async def closed_before_any_frame(app: Any, path: str, *, within: float = 5.0) -> int:
    """Open ``path`` on ``app``: it accepts, then closes with no frame at all; the close code.

    What the examples do with a socket whose snapshot was refused (1008) or failed (1011).
    """
    async with connect_websocket(app, path, timeout=within) as ws:
        message = await ws.receive()
        assert message["type"] == "websocket.close", message
        code: int = message["code"]
        return code


async def follow_a_prompt(
    receive_event: Callable[[], Awaitable[dict[str, Any]]],
    snapshot: dict[str, Any],
    *,
    within: float,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Follow the examples' stream of one prompt from ``snapshot`` (a ``session_update``).

    The prompt comes first, as a patch from the snapshot's version appending its interaction
    (whatever the session's size); then the answer's patches (the claim, ``append`` deltas,
    the end), each chained on the one before, until the response is done. Returns the state
    they build (:func:`asgi_session_sync.protocol.apply_patch`: RFC 6902 and ``append``) and
    the answer's patches. Bounded by ``within`` seconds.
    """
    import anyio

    from asgi_session_sync.protocol import apply_patch

    prompt = await receive_event()
    assert prompt["type"] == "session_patch"
    assert (prompt["base_version"], prompt["version"]) == (1, 2)
    assert [(op["op"], op["path"]) for op in prompt["patch"]] == [("add", "/interactions/-")]
    state, patches = apply_patch(snapshot["session"], prompt["patch"]), []
    version = prompt["version"]
    with anyio.fail_after(within):
        while not state["interactions"][-1]["done"]:
            patch = await receive_event()
            assert patch["type"] == "session_patch", patch
            assert patch["base_version"] == version, (patch, version)
            patches.append(patch)
            state, version = apply_patch(state, patch["patch"]), patch["version"]
    return state, patches


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


class MonitoredNats:
    """A private nats-server with its HTTP monitoring on (``-m``), to count what it holds."""

    def __init__(self, server: EmbeddedNats, monitor_port: int) -> None:
        self.server = server
        self.monitor_port = monitor_port

    @property
    def url(self) -> str:
        """The client URL, with the server's credentials (:attr:`EmbeddedNats.url`)."""
        return self.server.url

    async def subscriptions(self, subject: str) -> int:
        """Subscriptions on ``subject`` the server holds, over every client connection.

        Read from the server's ``/connz?subs=1`` monitoring endpoint.
        """
        import httpx

        async with httpx.AsyncClient(timeout=5.0) as http:
            response = await http.get(
                f"http://127.0.0.1:{self.monitor_port}/connz", params={"subs": "1"}
            )
        response.raise_for_status()
        return sum(
            connection.get("subscriptions_list", []).count(subject)
            for connection in response.json()["connections"]
        )

    async def subscriptions_once_settled(self, subject: str, expected: int) -> int:
        """:meth:`subscriptions`, read again until it is ``expected`` or 5 s have passed.

        An UNSUB leaves the client's buffer on its own flush, so the server may learn of it a
        moment after the block that unsubscribed has ended; the server's state announces
        nothing, so it is read again (bounded).
        """
        with anyio.move_on_after(5.0):
            while (count := await self.subscriptions(subject)) != expected:  # noqa: ASYNC110
                await anyio.sleep(0.02)
            return count
        return await self.subscriptions(subject)


@pytest.fixture
async def monitored_nats() -> AsyncIterator[MonitoredNats]:
    """A private nats-server on a free port of 127.0.0.1, with HTTP monitoring on another.

    The monitoring port has no credentials: it shows subscriptions (subjects), never messages,
    and lives only as long as the test.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        monitor_port = int(sock.getsockname()[1])
    async with EmbeddedNats(args=["-m", str(monitor_port)]) as server:
        yield MonitoredNats(server, monitor_port)
