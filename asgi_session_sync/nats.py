"""Live session updates over NATS, fanned out once per process, with repair after any loss.

The middleware (or :meth:`~asgi_session_sync.SessionSync.accept`) sends the current state once,
when a WebSocket opens. This module carries the changes that follow: a publisher calls
:meth:`NatsBridge.publish` (the whole new state) or :meth:`NatsBridge.publish_patch` (an RFC 6902
patch from one version to the next) after it changes a session, and every WebSocket watching
that session receives the event, from whichever app replica it is connected to.

```python
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from asgi_session_sync import SessionSync
from asgi_session_sync.nats import NatsBridge

sync = SessionSync(load_session)  # your loader: the session and its version from the database
bridge = NatsBridge(["nats://nats-1:4222", "nats://nats-2:4222", "nats://nats-3:4222"])


async def session_socket(websocket: WebSocket) -> None:
    session_id = websocket.path_params["session_id"]
    # Subscribe BEFORE accepting: the snapshot is loaded during accept, so any update
    # published after that load is already on its way to this subscription.
    async with bridge.subscribe(session_id) as updates:
        socket = await sync.accept(websocket.scope, websocket.send, session_id)
        await updates.forward(socket, websocket.receive, heartbeat=15)


@asynccontextmanager
async def lifespan(app):
    async with bridge:
        yield


app = Starlette(routes=[WebSocketRoute("/ws/sessions/{session_id}", session_socket)],
                lifespan=lifespan)

# Wherever a session changes (a request handler, a worker), after the database commit:
await bridge.publish(session_id, session, owner=owner, version=version)
# or, for a small change to a large session, the change alone:
await bridge.publish_patch(session_id, make_patch(before, after),
                           base_version=version - 1, version=version)
```

What the bridge guarantees (the ordering rules are in ``docs/concepts.md``):

* **One subscription per session per process.** The sockets of one process that watch a
  session share one NATS subscription (:class:`~asgi_session_sync.hub.Hub`); each message is
  parsed once and offered to each socket's queue.
* **No gap between snapshot and updates.** ``subscribe`` waits for the server's
  acknowledgement of the subscription before the ``async with`` body runs, so an update
  published after the snapshot's load reaches the socket.
* **One ordering engine.** Each socket judges every frame with its cursor
  (:mod:`asgi_session_sync.cursor`): newer updates and chained patches are sent, stale ones
  dropped, and a patch that does not chain makes the socket resync from the database; the
  snapshot replaces what the client had (``reset``), even at a lower version, so one bad
  message never freezes a socket.
* **No stale state after broker trouble.** NATS core delivers at most once. Whenever the
  connection is re-established, or NATS drops messages of a slow subscription, the affected
  sockets resync.
* **Bounded memory, in bytes.** Each socket queues at most ``max_socket_bytes`` and the
  process at most ``max_process_bytes``; a socket that falls further behind is resynced
  instead of buffered (``slow_consumers``).
* **Frames are checked against the subscription.** A frame on a session's subject that names
  another session, or another owner than the snapshot's, reaches no socket
  (``refused_frames``).
* **Nothing reaches NATS from an invalid id.** Session ids are checked (the middleware's own
  rule) before a subject is built, so no id can name a wildcard (``*``, ``>``), another
  subject (``.``) or inject protocol lines.

Scaling out: run several app replicas behind a load balancer, each with one ``NatsBridge``
connected to the same NATS cluster, and one database that is the source of truth. Use NATS
accounts or permissions so that only publishers may publish under the prefix.

:class:`EmbeddedNats` starts a private ``nats-server`` (the one the ``nats`` extra installs) for
tests and local development; it lives in :mod:`asgi_session_sync.nats_server` and is
re-exported here.

nats-py runs on asyncio only, so this module does too.
"""

from __future__ import annotations

import itertools
import logging
import re
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, suppress
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
from pydantic import BaseModel

try:
    from nats.aio.client import Client, Credentials
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.errors import Error as NatsError
    from nats.errors import NoRespondersError, SlowConsumerError
    from nats.errors import TimeoutError as NatsTimeoutError
except ImportError as exc:
    raise ImportError("install asgi-session-sync[nats] to use asgi_session_sync.nats") from exc

from ._paths import clip_for_log
from ._session_ids import DEFAULT_SESSION_ID_PATTERN, SessionIdRules
from .hub import Hub, SessionStream, Unsubscribe
from .nats_server import EmbeddedNats, find_nats_server
from .protocol import SessionPatch, SessionUpdate, Version, version_from_text
from .stats import BridgeStats, MetricHook

__all__ = ["EmbeddedNats", "NatsBridge", "SessionStream", "find_nats_server"]

logger = logging.getLogger("asgi_session_sync")

UserCallback = Callable[..., Any]

_PREFIX = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_CONFIRM_TIMEOUT = 2.0
"""Seconds the server has to confirm a subscription before the session's sockets resync."""
_WATCH_INTERVAL = 0.25
"""Seconds between two looks at an adopted client's public ``stats`` for a reconnect."""
_CALLBACKS = ("error_cb", "disconnected_cb", "reconnected_cb", "closed_cb")
_REQUEST_TIMEOUT = 1.0
"""Seconds a producer has to answer a catch-up or a stop before the asker does without."""


class NatsBridge:
    """Publishes session updates to NATS and fans them out to the WebSockets watching a session.

    Use it as an async context manager, typically for the app's lifespan: entering connects
    (or adopts ``client``), leaving ends every open stream's iteration and drains and closes
    the connection it made.

    Args:
        servers: The NATS URL, or several URLs of one cluster (``nats://host:4222``). No default:
            the bridge never guesses a broker.
        client: An already connected ``nats.aio.client.Client`` to use instead of connecting.
            The bridge uses its public API only: it notices a reconnect from the client's
            ``stats["reconnects"]`` within 0.25 s, and never closes this client. Exclusive
            with ``servers`` and the connect options.
        prefix: Subject prefix; updates of session ``s1`` go to ``<prefix>.s1``. Dot-separated
            tokens of letters, digits, ``_`` and ``-``.
        session_id_pattern: Regular expression a session id must fully match. Whatever it
            allows, ``.``, ``*``, ``>``, whitespace and control characters never pass.
        max_socket_bytes: Bytes of frames each socket may have queued (and held while it is
            repaired), at most; past it the socket is resynced instead (a slow consumer).
        max_process_bytes: Bytes of frames every socket of this bridge may have queued,
            together, at most; past it the socket that would exceed it is resynced instead.
        pending_msgs_limit: Messages nats-py buffers per session subscription before the
            bridge reads them; past it NATS drops messages and the session's sockets resync.
        pending_bytes_limit: The same, in bytes.
        max_concurrent_resyncs: Resyncs that may load at once; the rest wait their turn.
        startup_timeout: Seconds entering may take to connect, across retries.
        close_timeout: Seconds leaving may take to drain before the connection is closed.
        user: User name, when the server requires one.
        password: Password for ``user``.
        token: Authentication token.
        user_credentials: A ``.creds`` file (or its JWT and seed files), for decentralised auth.
        tls: An ``ssl.SSLContext`` for ``tls://`` servers.
        name: Connection name shown in the server's monitoring.
        connect_timeout: Seconds each connection attempt may take.
        reconnect_time_wait: Seconds between attempts on the same server.
        max_reconnect_attempts: Attempts per server before it is dropped; ``-1`` (the default)
            never gives up, so a broker outage never leaves the bridge dead for good.
        on_metric: Optional ``def on_metric(name, value)`` called for each increment of
            :attr:`stats`.
        **connect_options: Any other ``nats.connect`` option, passed through unchanged. Given
            ``error_cb``, ``disconnected_cb``, ``reconnected_cb`` or ``closed_cb`` run after
            the bridge's own handlers.

    Raises:
        ValueError: The prefix, the limits, or the choice of ``servers``/``client`` is invalid.
    """

    def __init__(
        self,
        servers: str | Sequence[str] | None = None,
        *,
        client: Client | None = None,
        prefix: str = "session_sync",
        session_id_pattern: str | re.Pattern[str] = DEFAULT_SESSION_ID_PATTERN,
        max_socket_bytes: int = 4 * 1024 * 1024,
        max_process_bytes: int = 256 * 1024 * 1024,
        pending_msgs_limit: int = 65536,
        pending_bytes_limit: int = 64 * 1024 * 1024,
        max_concurrent_resyncs: int = 32,
        startup_timeout: float = 10.0,
        close_timeout: float = 5.0,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        user_credentials: Credentials | None = None,
        tls: ssl.SSLContext | None = None,
        name: str | None = None,
        connect_timeout: float | None = None,
        reconnect_time_wait: float | None = None,
        max_reconnect_attempts: int | None = None,
        on_metric: MetricHook | None = None,
        **connect_options: Any,
    ) -> None:
        named = {
            "user": user,
            "password": password,
            "token": token,
            "user_credentials": user_credentials,
            "tls": tls,
            "name": name,
            "connect_timeout": connect_timeout,
            "reconnect_time_wait": reconnect_time_wait,
            "max_reconnect_attempts": max_reconnect_attempts,
        }
        options: dict[str, Any] = {k: v for k, v in named.items() if v is not None}
        options.update(connect_options)
        if client is not None:
            if servers is not None:
                raise ValueError("pass either servers or client, not both")
            if options:
                raise ValueError(
                    "connect options apply only when the bridge connects; configure the "
                    f"client you pass instead: got {sorted(options)}"
                )
        elif servers is None:
            raise ValueError("servers is required: a NATS URL or a list of cluster URLs")
        if isinstance(servers, str):
            servers = [servers]
        if servers is not None and (not servers or not all(isinstance(s, str) for s in servers)):
            raise ValueError(f"servers must be a URL or a non-empty list of URLs: got {servers!r}")
        if not isinstance(prefix, str) or _PREFIX.fullmatch(prefix) is None:
            raise ValueError(
                "prefix must be dot-separated tokens of letters, digits, '_' and '-' "
                f"(no wildcards or spaces): got {prefix!r}"
            )
        for option, value in (
            ("max_socket_bytes", max_socket_bytes),
            ("max_process_bytes", max_process_bytes),
            ("pending_msgs_limit", pending_msgs_limit),
            ("pending_bytes_limit", pending_bytes_limit),
            ("max_concurrent_resyncs", max_concurrent_resyncs),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{option} must be a positive int: got {value!r}")
        if not startup_timeout > 0 or not close_timeout > 0:
            raise ValueError("startup_timeout and close_timeout must be positive seconds")
        options.setdefault("max_reconnect_attempts", -1)
        self.prefix = prefix
        self.pending_msgs_limit = pending_msgs_limit
        self.pending_bytes_limit = pending_bytes_limit
        self.startup_timeout = startup_timeout
        self.close_timeout = close_timeout
        self._servers = None if servers is None else list(servers)
        self._client = client
        self._owns_client = client is None
        self._user_callbacks: dict[str, UserCallback] = {
            key: options.pop(key) for key in _CALLBACKS if options.get(key) is not None
        }
        self._connect_options = options
        self._session_ids = SessionIdRules(session_id_pattern)
        self.stats = BridgeStats(on_metric=on_metric)
        """Counters since the bridge was created (:class:`~asgi_session_sync.stats.BridgeStats`)."""
        self.hub = Hub(
            self,
            stats=self.stats,
            max_socket_bytes=max_socket_bytes,
            max_process_bytes=max_process_bytes,
            max_concurrent_resyncs=max_concurrent_resyncs,
        )
        """The process's fan-out: one subscription per session, shared by its sockets."""
        self._sessions: dict[Subscription, str] = {}
        self._stack: AsyncExitStack | None = None
        self._entered = False
        self._open = False
        self._closing = False
        self._startup_error: Exception | None = None
        self._probe_subject = ""
        self._probes: dict[bytes, anyio.Event] = {}
        self._probe_tokens = itertools.count()

    @property
    def client(self) -> Client:
        """The NATS client, once the bridge is open.

        Raises:
            RuntimeError: The bridge is not open.
        """
        if not self._open or self._client is None:
            raise RuntimeError("the bridge is not open: use `async with NatsBridge(...)` first")
        return self._client

    async def __aenter__(self) -> NatsBridge:
        """Connect (or adopt the given client) and start handling its events."""
        if self._entered:
            raise RuntimeError("a NatsBridge can be entered once")
        self._entered = True
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self._running())
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """End every stream's iteration; drain and close the connection the bridge made."""
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.__aexit__(exc_type, exc, tb)

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        if self._owns_client:
            self._client = await self._connect()
        else:
            assert self._client is not None
            if not self._client.is_connected:
                raise RuntimeError("the client passed to NatsBridge must be connected")
        client = self._client
        try:
            # Where subscriptions are confirmed: see _confirm.
            self._probe_subject = client.new_inbox()
            probes = await client.subscribe(self._probe_subject, cb=self._on_probe)
            async with anyio.create_task_group() as tg:
                if not self._owns_client:
                    tg.start_soon(self._watch, client)
                self._open = True
                try:
                    yield
                finally:
                    self._closing = True
                    self._open = False
                    self.hub.end_all()
                    tg.cancel_scope.cancel()
                    if not self._owns_client:
                        with anyio.CancelScope(shield=True), suppress(NatsError):
                            await probes.unsubscribe()
        finally:
            if self._owns_client:
                await self._close(client)

    async def _close(self, client: Client) -> None:
        # Shielded: a cancelled lifespan must still close its socket and nats-py's tasks.
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self.close_timeout):
                try:
                    await client.drain()
                except (NatsError, OSError) as error:
                    logger.debug("nats drain failed, closing: %s", error)
            if not client.is_closed:
                try:
                    await client.close()
                except (NatsError, OSError) as error:
                    # The broker went first (a process stopping with its embedded server):
                    # flushing the last bytes fails, and the connection is closed all the same.
                    logger.debug("nats close: %s", error)

    async def _connect(self) -> Client:
        assert self._servers is not None
        client = Client()
        try:
            with anyio.fail_after(self.startup_timeout):
                await client.connect(
                    self._servers,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                    **self._connect_options,
                )
        except BaseException as failure:
            # Shielded: a half-made connection holds a socket and tasks that must not leak.
            with anyio.CancelScope(shield=True):
                self._closing = True
                await client.close()
            if isinstance(failure, TimeoutError):
                servers = ", ".join(_without_credentials(url) for url in self._servers)
                raise ConnectionError(
                    f"could not connect to NATS at {servers} within {self.startup_timeout}s "
                    f"(last error: {self._startup_error or 'none'})"
                ) from None
            raise
        return client

    async def _watch(self, client: Client) -> None:
        """An adopted client: notice reconnects and the end through its public API."""
        reconnects = client.stats["reconnects"]
        while not client.is_closed:
            await anyio.sleep(_WATCH_INTERVAL)
            if client.stats["reconnects"] != reconnects:
                reconnects = client.stats["reconnects"]
                self._reconnected(client)
        if not self._closing:
            self._closed()

    # Callbacks from nats-py. They run in nats-py's tasks, so they only signal streams.

    async def _on_error(self, exc: Exception) -> None:
        if not self._open and not self._closing:
            self._startup_error = exc  # reported by _connect if it times out
        if isinstance(exc, SlowConsumerError):
            self.stats.incr("slow_consumer_drops")
            session_id = self._sessions.get(exc.sub)
            if session_id is not None:
                self.hub.resync(session_id, "slow consumer: nats dropped messages")
        elif self._open and not self._closing:
            logger.warning("nats error: %s: %s", type(exc).__name__, exc)
        await self._call_user("error_cb", exc)

    async def _on_disconnected(self) -> None:
        if self._open and not self._closing:
            logger.warning("nats disconnected; updates are lost until it reconnects")
        await self._call_user("disconnected_cb")

    async def _on_reconnected(self) -> None:
        if self._client is not None:
            self._reconnected(self._client)
        await self._call_user("reconnected_cb")

    def _reconnected(self, client: Client) -> None:
        self.stats.incr("reconnects")
        url = client.connected_url
        logger.info(
            "nats reconnected server=%s:%s; resyncing the sockets of %d sessions",
            url.hostname if url is not None else None,
            url.port if url is not None else None,
            self.hub.sessions,
        )
        self.hub.resync_all("nats reconnected")

    async def _on_closed(self) -> None:
        if not self._closing:
            self._closed()
        await self._call_user("closed_cb")

    def _closed(self) -> None:
        logger.error(
            "nats connection closed for good; ending the streams of %d sessions",
            self.hub.sessions,
        )
        self.hub.end_all()

    async def _call_user(self, key: str, *args: Exception) -> None:
        callback = self._user_callbacks.get(key)
        if callback is None:
            return
        try:
            await callback(*args)
        except Exception:
            logger.exception("nats %s raised", key)

    # The hub's backend.

    async def subscribe_subject(
        self, session_id: str, deliver: Callable[[bytes], None]
    ) -> Unsubscribe:
        """Subscribe to ``session_id``'s subject once for the process (the hub's backend)."""
        client = self.client
        subject = self.subject(session_id)

        async def on_message(msg: Msg) -> None:
            deliver(msg.data)

        sub = await client.subscribe(
            subject,
            cb=on_message,
            pending_msgs_limit=self.pending_msgs_limit,
            pending_bytes_limit=self.pending_bytes_limit,
        )
        self._sessions[sub] = session_id

        async def unsubscribe() -> None:
            self._sessions.pop(sub, None)
            try:
                await sub.unsubscribe()
            except NatsError as error:
                # A closed or draining connection: the server forgets it by itself.
                logger.debug("nats unsubscribe skipped subject=%s: %s", subject, error)

        try:
            await self._confirm(client, session_id)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await unsubscribe()
            raise
        return unsubscribe

    async def _confirm(self, client: Client, session_id: str) -> None:
        # One round trip: the server handles a connection's messages in order, so once a probe
        # published after the SUB comes back, it has the subscription, and what is published
        # after the snapshot's load reaches us. Not client.flush(): a flush cancelled or timed
        # out leaves its future behind, and the late PONG stops nats-py's reading task
        # (nats-py 2.16). While disconnected there is no one to ask; nats-py re-subscribes on
        # reconnect and the reconnect triggers a resync.
        if not client.is_connected:
            logger.warning(
                "nats not connected; subscription pending until reconnect session_id=%s",
                session_id,
            )
            return
        token = str(next(self._probe_tokens)).encode()
        probed = self._probes[token] = anyio.Event()
        try:
            await client.publish(self._probe_subject, token)
            with anyio.move_on_after(_CONFIRM_TIMEOUT):
                await probed.wait()
                return
            problem = f"no answer within {_CONFIRM_TIMEOUT}s"
        except (NatsError, OSError) as error:
            problem = str(error)
        finally:
            del self._probes[token]
        logger.warning(
            "nats did not confirm the subscription, resyncing session_id=%s: %s",
            session_id,
            problem,
        )
        self.hub.resync(session_id, "subscription not confirmed")

    async def catch_up(self, session_id: str, version: Version) -> bytes | None:
        """Ask the session's producer for a patch from ``version`` (the hub's backend).

        A NATS request on ``<prefix>.<session_id>.catchup``; ``None`` when no producer
        answers for that version within a second, or none is streaming into the session.
        """
        try:
            msg = await self.client.request(
                f"{self.subject(session_id)}.catchup",
                str(version).encode(),
                timeout=_REQUEST_TIMEOUT,
            )
        except (NoRespondersError, NatsTimeoutError):
            return None
        except (NatsError, OSError) as error:
            logger.warning("catch-up request failed session_id=%s: %s", session_id, error)
            return None
        return msg.data or None

    async def stop_answer(self, session_id: str, text_path: str) -> bool:
        """Ask the producer streaming the answer at ``text_path`` to stop it.

        A NATS request on ``<prefix>.<session_id>.stop``. The producer
        (:class:`~asgi_session_sync.streaming.AnswerStream`) stops, ends the answer as
        ``cancelled`` and publishes that to every socket. Closing a socket never stops an
        answer: only this does.

        Args:
            session_id: The session; validated before any subject is built.
            text_path: The answer's ``text_path`` (a JSON Pointer), as its producer has it.

        Returns:
            ``True`` when the producer acknowledged within a second; ``False`` when none did
            (the answer is not streaming, or its producer is gone).

        Raises:
            ValueError: ``session_id`` is invalid.
            RuntimeError: The bridge is not open.
        """
        try:
            msg = await self.client.request(
                f"{self.subject(session_id)}.stop", text_path.encode(), timeout=_REQUEST_TIMEOUT
            )
        except (NoRespondersError, NatsTimeoutError):
            return False
        except (NatsError, OSError) as error:
            logger.warning("stop request failed session_id=%s: %s", session_id, error)
            return False
        return msg.data == b"stopping"

    @asynccontextmanager
    async def serve_answer(
        self,
        session_id: str,
        text_path: str,
        *,
        catch_up: Callable[[Version], bytes | None],
        stop: Callable[[], bool],
    ) -> AsyncIterator[None]:
        """Answer a streamed answer's catch-up and stop requests while the block runs.

        For :class:`~asgi_session_sync.streaming.AnswerStream`. ``catch_up(version)`` returns
        a ``session_patch`` frame from ``version`` or ``None`` (it does not know that
        version); ``stop()`` is called for a stop request naming ``text_path``, and says
        whether the answer stops (``False``: it is already ending).

        Raises:
            ValueError: ``session_id`` is invalid.
            RuntimeError: The bridge is not open.
        """
        subject = self.subject(session_id)
        client = self.client

        async def on_catch_up(msg: Msg) -> None:
            version = version_from_text(msg.data.decode(errors="replace"))
            reply = None if version is None else catch_up(version)
            with suppress(NatsError, OSError):
                await msg.respond(reply or b"")

        async def on_stop(msg: Msg) -> None:
            if msg.data.decode(errors="replace") != text_path:
                return  # another answer's producer may be the one asked
            reply = b"stopping" if stop() else b"ending"
            with suppress(NatsError, OSError):
                await msg.respond(reply)

        subs = [
            await client.subscribe(f"{subject}.catchup", cb=on_catch_up),
            await client.subscribe(f"{subject}.stop", cb=on_stop),
        ]
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                for sub in subs:
                    with suppress(NatsError):
                        await sub.unsubscribe()

    async def _on_probe(self, msg: Msg) -> None:
        probed = self._probes.get(msg.data)
        if probed is not None:
            probed.set()

    # Public API.

    def subject(self, session_id: str) -> str:
        """Return the subject carrying updates of ``session_id``: ``<prefix>.<session_id>``.

        Raises:
            ValueError: ``session_id`` is not a valid session id (the message says why).
        """
        if not isinstance(session_id, str):
            raise TypeError(f"session_id must be a str: got {type(session_id).__name__}")
        problem = self._session_ids.problem(session_id)
        if problem is not None:
            raise ValueError(f"invalid session id {clip_for_log(session_id)!r}: {problem}")
        return f"{self.prefix}.{session_id}"

    async def publish(
        self,
        session_id: str,
        session: Mapping[str, Any] | BaseModel,
        *,
        owner: str | None = None,
        version: Version | None = None,
    ) -> None:
        """Publish the full current state of a session to everyone watching it.

        Sends a ``session_update`` event (without ``reset``: only a snapshot from the loader
        carries it). Publish after the change is committed where the loader reads, and with
        the version it committed, so sockets can order updates.

        Args:
            session_id: The session; validated before any subject is built.
            session: Its whole state, serialisable by pydantic.
            owner: Who owns the session, sent as ``owner``.
            version: The state's version, a whole number from 0 to ``2**53 - 1``.

        Raises:
            ValueError: ``session_id`` or ``version`` is invalid; nothing was sent.
            RuntimeError: The bridge is not open.
            nats.errors.Error: nats-py refused the message (connection closed, payload too
                large, reconnect buffer full).
        """
        subject = self.subject(session_id)
        event = SessionUpdate(session_id=session_id, owner=owner, session=session, version=version)
        await self.client.publish(subject, event.to_json())

    async def publish_patch(
        self,
        session_id: str,
        patch: Sequence[Mapping[str, Any]],
        *,
        base_version: Version,
        version: Version,
        owner: str | None = None,
    ) -> None:
        """Publish a change to a session as an RFC 6902 JSON Patch from one version to the next.

        Sends a ``session_patch`` event (:class:`~asgi_session_sync.protocol.SessionPatch`):
        applying ``patch`` to the session's state at ``base_version`` gives its state at
        ``version``. Publish after committing ``version`` where the loader reads, one patch
        per committed version, in order: a socket is sent a patch only at ``base_version``,
        and is resynced when it missed one.
        :func:`~asgi_session_sync.protocol.make_patch` computes ``patch`` from the two states.

        Args:
            session_id: The session; validated before any subject is built.
            patch: RFC 6902 operations, such as
                ``[{"op": "replace", "path": "/interactions/3/response", "value": "Hel"}]``.
            base_version: The version the patch applies to.
            version: The version it produces: greater than ``base_version``, at most
                ``2**53 - 1``.
            owner: Who owns the session, sent as ``owner`` when given.

        Raises:
            ValueError: ``session_id`` is invalid, ``patch`` is not RFC 6902 operations, or
                a version is not a version or ``version`` is not greater than
                ``base_version``; nothing was sent.
            RuntimeError: The bridge is not open.
            nats.errors.Error: nats-py refused the message.
        """
        subject = self.subject(session_id)
        event = SessionPatch(
            session_id=session_id,
            owner=owner,
            base_version=base_version,
            version=version,
            patch=[dict(operation) for operation in patch],
        )
        await self.client.publish(subject, event.to_json())

    def subscribe(self, session_id: str) -> AbstractAsyncContextManager[SessionStream]:
        """Watch a session's updates: ``async with bridge.subscribe(session_id) as updates``.

        The process subscribes to the session's subject when its first socket enters (later
        ones share it), and waits for the server's acknowledgement, so enter it *before*
        accepting the WebSocket. Then hand the socket to
        :meth:`~asgi_session_sync.hub.SessionStream.forward`.

        Raises:
            ValueError: ``session_id`` is invalid.
            RuntimeError: The bridge is not open.
        """
        self.subject(session_id)  # validated now, not when entered
        return self.hub.subscribe(session_id)


def _without_credentials(url: str) -> str:
    """``url`` without a user or password it may carry, for messages and logs."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}:{parts.port}" if parts.port else f"{parts.scheme}://{host}"
