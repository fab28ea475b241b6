"""What runs in the API process beside the app: NATS, the bridge, and the lease sweeper."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from types import TracebackType

import anyio

from asgi_session_sync.nats import NatsBridge
from asgi_session_sync.nats_server import EmbeddedNats

from .leases import LeaseSweeper
from .publishing import SessionPublisher
from .settings import NATS_USER, ChatSettings
from .store import ChatStore

__all__ = ["HEARTBEAT", "LiveChat"]

logger = logging.getLogger("examples.chat")

# Retry a lost broker often: a restarted nats-server is back in well under a second, and each
# reconnect resyncs every open WebSocket, so the sooner it happens the sooner pages are current.
NATS_RECONNECT_WAIT = 0.25

HEARTBEAT = 15.0
"""Seconds of quiet after which a WebSocket gets a heartbeat frame (the page expects one), and an
event stream a comment (it keeps proxies from closing the stream: nginx's default is 60 s)."""


class LiveChat:
    """The API's running parts, for its lifespan: ``async with LiveChat(store, settings):``.

    Entering starts the private ``nats-server`` on ``settings.nats_port`` when no
    ``settings.nats_url`` is set (it dies with this process, even on SIGKILL, and admits only
    ``settings.nats_password``), opens the bridge, and starts the lease sweeper. Leaving
    stops them in reverse order.

    Args:
        store: The chat store (entered separately).
        settings: The example's settings.
        name: The NATS connection's name, shown in the server's monitoring.
    """

    def __init__(self, store: ChatStore, settings: ChatSettings, *, name: str) -> None:
        self.store = store
        self.settings = settings
        self.name = name
        self._bridge: NatsBridge | None = None
        self._publisher: SessionPublisher | None = None
        self._stack: AsyncExitStack | None = None

    @property
    def bridge(self) -> NatsBridge:
        """The open bridge.

        Raises:
            RuntimeError: The lifespan has not started.
        """
        if self._bridge is None:
            raise RuntimeError("LiveChat is not running: enter it in the app's lifespan")
        return self._bridge

    @property
    def publisher(self) -> SessionPublisher:
        """Publishes committed changes through the bridge.

        Raises:
            RuntimeError: The lifespan has not started.
        """
        if self._publisher is None:
            raise RuntimeError("LiveChat is not running: enter it in the app's lifespan")
        return self._publisher

    async def __aenter__(self) -> LiveChat:
        """Start NATS if it is ours, open the bridge, start the sweeper."""
        if self._stack is not None:
            raise RuntimeError("LiveChat is already running")
        async with AsyncExitStack() as stack:
            url = self.settings.nats_url
            if url is None:
                password = self.settings.nats_password
                server = EmbeddedNats(
                    port=self.settings.nats_port, user=NATS_USER, password=password
                )
                # The URL carries the password: log the one without it.
                url = (await stack.enter_async_context(server)).url
                logger.info("started nats-server url=%s", server.display_url)
                if password is None:
                    logger.warning(
                        "NATS_PASSWORD is not set: the private nats-server's password is this "
                        "process's own, so no worker can reach it; run python -m "
                        "examples.<app> (it sets one), or export the same NATS_PASSWORD to both"
                    )
            bridge = await stack.enter_async_context(
                NatsBridge(url, name=self.name, reconnect_time_wait=NATS_RECONNECT_WAIT)
            )
            publisher = SessionPublisher(bridge)
            tasks = await stack.enter_async_context(anyio.create_task_group())
            # Registered after the task group, so it runs first on exit: the group then only
            # waits for the cancelled sweeper.
            stack.callback(tasks.cancel_scope.cancel)
            sweeper = LeaseSweeper(
                self.store,
                publisher,
                interval=self.settings.sweep_interval,
                claim_within=self.settings.lease_seconds,
            )
            tasks.start_soon(sweeper.run, name="lease sweeper")
            self._bridge, self._publisher = bridge, publisher
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the sweeper, close the bridge, stop NATS if it is ours."""
        stack, self._stack = self._stack, None
        try:
            if stack is not None:
                await stack.__aexit__(exc_type, exc, tb)
        finally:
            self._bridge = self._publisher = None
