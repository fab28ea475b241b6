"""Live session updates over NATS, with a resync whenever the broker may have lost some.

The middleware sends the current state once, when a WebSocket opens. This module carries the
changes that follow: a publisher calls :meth:`NatsBridge.publish` (the whole new state) or
:meth:`NatsBridge.publish_patch` (an RFC 6902 patch from one version to the next) after it
changes a session, and every WebSocket watching that session receives the event, from whichever
app replica it is connected to.

```python
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from asgi_session_sync import SessionSyncMiddleware
from asgi_session_sync.nats import NatsBridge

bridge = NatsBridge(["nats://nats-1:4222", "nats://nats-2:4222", "nats://nats-3:4222"])


async def session_socket(websocket: WebSocket) -> None:
    session_id = websocket.path_params["session_id"]
    # Subscribe BEFORE accepting: the snapshot is loaded during accept, so any update
    # published after that load is already on its way to this subscription. The scope gives
    # the subscription the middleware's resync and the snapshot's version.
    async with bridge.subscribe(session_id, scope=websocket.scope) as updates:
        await websocket.accept()  # the middleware sends the snapshot here
        await updates.forward(websocket.send_text, websocket.receive, heartbeat=15)


@asynccontextmanager
async def lifespan(app):
    async with bridge:
        yield


app = SessionSyncMiddleware(
    Starlette(routes=[WebSocketRoute("/ws/sessions/{session_id}", session_socket)],
              lifespan=lifespan),
    loader=load_session,  # your loader: reads the session and its version from the database
    paths=["/ws/sessions/{session_id}"],
)

# Wherever a session changes (a request handler, a worker), after the database commit:
await bridge.publish(session_id, session, owner=owner, version=version)
# or, for a small change to a large session, the change alone:
await bridge.publish_patch(session_id, make_patch(before, after),
                           base_version=version - 1, version=version)
```

What the bridge guarantees:

* **No gap between snapshot and updates.** ``subscribe`` registers interest with the server
  and waits for its acknowledgement before the ``async with`` body runs, so an update
  published after the snapshot's load reaches the subscription.
* **No stale state after broker trouble.** NATS core delivers at most once: while a client is
  disconnected (a server restart, a failover to another cluster node) or too slow to keep up
  (NATS drops its messages), updates are lost. Whenever nats-py reports a reconnect, or a
  slow-consumer drop on a subscription, each affected subscription calls its ``resync()``
  (from :func:`~asgi_session_sync.get_resync`: the middleware's loader, same user, same
  limits) and yields the fresh snapshot in its stream, so the app's own loop sends it.
* **Order by version.** Each subscription knows the version its socket has (the snapshot's,
  then that of each frame it yielded) and drops a later full state (live or resync) whose
  version is not newer. Frames without a comparable version pass, so publish with versions
  when order matters.
* **Patches chain, or the socket is resynced.** A patch is yielded only when its
  ``base_version`` is the socket's version. A patch that does not chain (one before it was
  lost, or the socket's version is unknown) is never yielded: the subscription resyncs the
  socket and then yields the patches that chain from the fresh snapshot. No client receives a
  patch for a state it does not have, and none has to reconnect for it.
* **Liveness.** ``forward(..., heartbeat=N)`` sends ``{"type": "heartbeat"}`` after N seconds
  without a frame, so clients can tell a dead socket from a quiet session.
* **Bounded memory.** Each subscription buffers at most ``max_queued`` frames, and NATS at most
  ``pending_msgs_limit`` more; past that NATS drops updates and the subscription resyncs.
* **Nothing reaches NATS from an invalid id.** Session ids are checked (the middleware's own
  rule: letters, digits, ``_`` and ``-``, 1 to 128 characters) before a subject is built, so
  no id can name a wildcard (``*``, ``>``), another subject (``.``) or inject protocol lines.

Scaling out: run several app replicas behind a load balancer, each with one ``NatsBridge``
connected to the same NATS cluster (list several seed URLs; the client learns the rest), and
one database that is the source of truth. A publisher, in any replica or a worker, commits to
the database and then publishes the new full state, or the patch to it, with its version, on
the subject ``<prefix>.<session_id>``; every replica delivers it to its own WebSockets for that
session. A lost full state is repaired by the next one or by the resync from the database; a
lost patch is noticed at the next one, which does not chain, and repaired by a resync; a late
frame is dropped. Loading happens only on connect, on broker trouble and on a lost patch:
after a cluster-wide outage every open WebSocket reloads once, so size
``max_concurrent_resyncs`` (per replica) for what the database can take. Use NATS accounts or
permissions so that only publishers may publish under the prefix.

:class:`EmbeddedNats` starts a private ``nats-server`` (the one the ``nats`` extra installs) for
tests and local development; it lives in :mod:`asgi_session_sync.nats_server` and is
re-exported here.

nats-py runs on asyncio only, so this module does too.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
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
    from nats.errors import SlowConsumerError
except ImportError as exc:
    raise ImportError("install asgi-session-sync[nats] to use asgi_session_sync.nats") from exc

from ._feed import SessionFeed, parse_frame
from ._paths import clip_for_log
from ._session_ids import DEFAULT_SESSION_ID_PATTERN, SessionIdRules
from .events import SessionPatch, SessionUpdate, Version
from .middleware import Resync, get_resync
from .nats_server import EmbeddedNats, find_nats_server
from .stats import BridgeStats, MetricHook
from .versions import MAX_VERSION_CHARS, is_newer

__all__ = ["EmbeddedNats", "NatsBridge", "SessionSubscription", "find_nats_server"]

logger = logging.getLogger("asgi_session_sync")

UserCallback = Callable[..., Awaitable[None]]

_PREFIX = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
# Bounds on clean-up work that must finish even when the caller is cancelled.
_UNSUBSCRIBE_TIMEOUT = 2.0
_CONFIRM_TIMEOUT = 2  # nats-py types flush timeouts as int seconds


# --------------------------------------------------------------------------------------------
# Publishing and forwarding
# --------------------------------------------------------------------------------------------


class NatsBridge:
    """Publishes session updates to NATS and forwards them to the WebSockets watching a session.

    Use it as an async context manager, typically for the app's lifespan: entering connects
    (or adopts ``client``), leaving drains and closes the connection it made and ends every
    open subscription's iteration.

    Args:
        servers: The NATS URL, or several URLs of one cluster (``nats://host:4222``). No default:
            the bridge never guesses a broker.
        client: An already connected ``nats.aio.client.Client`` to use instead of connecting.
            The bridge chains its handlers in front of the client's error, disconnect,
            reconnect and close callbacks while it is open, restores them on exit, and never
            closes this client. Exclusive with ``servers`` and the connect options.
        prefix: Subject prefix; updates of session ``s1`` go to ``<prefix>.s1``. Dot-separated
            tokens of letters, digits, ``_`` and ``-``.
        event_type: The ``type`` field of published events; match the middleware's.
        session_id_pattern: Regular expression a session id must fully match. Whatever it
            allows, ``.``, ``*``, ``>``, whitespace and control characters never pass.
        max_queued: Frames each subscription buffers for a slow app loop.
        pending_msgs_limit: Messages nats-py buffers per subscription beyond ``max_queued``;
            past it NATS drops messages and the subscription resyncs.
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
        event_type: str = "session_update",
        session_id_pattern: str | re.Pattern[str] = DEFAULT_SESSION_ID_PATTERN,
        max_queued: int = 64,
        pending_msgs_limit: int = 256,
        pending_bytes_limit: int = 16 * 1024 * 1024,
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
        if not event_type:
            raise ValueError("event_type must be a non-empty string")
        for option, value in (
            ("max_queued", max_queued),
            ("pending_msgs_limit", pending_msgs_limit),
            ("pending_bytes_limit", pending_bytes_limit),
            ("max_concurrent_resyncs", max_concurrent_resyncs),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{option} must be a positive int: got {value!r}")
        if not startup_timeout > 0 or not close_timeout > 0:
            raise ValueError("startup_timeout and close_timeout must be positive seconds")
        options.setdefault("max_reconnect_attempts", -1)
        self.prefix = prefix
        self.event_type = event_type
        self.max_queued = max_queued
        self.pending_msgs_limit = pending_msgs_limit
        self.pending_bytes_limit = pending_bytes_limit
        self.max_concurrent_resyncs = max_concurrent_resyncs
        self.startup_timeout = startup_timeout
        self.close_timeout = close_timeout
        self._servers = None if servers is None else list(servers)
        self._client = client
        self._owns_client = client is None
        self._user_callbacks: dict[str, UserCallback | None] = {
            key: options.pop(key)
            for key in ("error_cb", "disconnected_cb", "reconnected_cb", "closed_cb")
            if key in options
        }
        self._connect_options = options
        self._session_ids = SessionIdRules(session_id_pattern)
        self._subscriptions: dict[Subscription, SessionSubscription] = {}
        self._resync_limiter: anyio.CapacityLimiter | None = None
        self.stats = BridgeStats(on_metric=on_metric)
        """Counters since the bridge was created (:class:`~asgi_session_sync.stats.BridgeStats`)."""
        self._open = False
        self._closing = False

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
        if self._open or self._closing:
            raise RuntimeError("a NatsBridge can be entered once")
        self._resync_limiter = anyio.CapacityLimiter(self.max_concurrent_resyncs)
        if self._owns_client:
            self._client = await self._connect()
        else:
            assert self._client is not None
            if not self._client.is_connected:
                raise RuntimeError("the client passed to NatsBridge must be connected")
            self._adopt(self._client)
        self._open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """End every subscription's iteration; drain and close the connection the bridge made."""
        self._closing = True
        self._open = False
        for subscription in list(self._subscriptions.values()):
            subscription._end()
        client = self._client
        if client is None:
            return
        if not self._owns_client:
            self._restore(client)
            return
        # Shielded: a cancelled lifespan must still close its socket and nats-py's tasks.
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self.close_timeout):
                try:
                    await client.drain()
                except (NatsError, OSError) as error:
                    logger.debug("nats drain failed, closing: %s", error)
            if not client.is_closed:
                await client.close()

    async def _connect(self) -> Client:
        assert self._servers is not None
        client = Client()
        error: Exception | None = None

        async def remember_error(exc: Exception) -> None:
            nonlocal error
            error = exc
            await self._on_error(exc)

        try:
            with anyio.fail_after(self.startup_timeout):
                await client.connect(
                    self._servers,
                    error_cb=remember_error,
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
                    f"(last error: {error or 'none'})"
                ) from None
            raise
        # Connected: startup errors need no remembering any more.
        client._error_cb = self._on_error
        return client

    def _adopt(self, client: Client) -> None:
        self._saved_callbacks = (
            client._error_cb,
            client._disconnected_cb,
            client._reconnected_cb,
            client._closed_cb,
        )
        self._user_callbacks = {
            "error_cb": client._error_cb,
            "disconnected_cb": client._disconnected_cb,
            "reconnected_cb": client._reconnected_cb,
            "closed_cb": client._closed_cb,
        }
        client._error_cb = self._on_error
        client._disconnected_cb = self._on_disconnected
        client._reconnected_cb = self._on_reconnected
        client._closed_cb = self._on_closed

    def _restore(self, client: Client) -> None:
        (
            client._error_cb,
            client._disconnected_cb,
            client._reconnected_cb,
            client._closed_cb,
        ) = self._saved_callbacks

    # Callbacks from nats-py. They run in nats-py's tasks, so they only signal subscriptions.

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, SlowConsumerError):
            self.stats.incr("slow_consumer_drops")
            subscription = self._subscriptions.get(exc.sub)
            if subscription is not None:
                subscription._request_resync("slow consumer: nats dropped messages")
            else:
                logger.debug("nats slow consumer on a subscription not ours: %s", exc)
        elif not self._closing:
            logger.warning("nats error: %s: %s", type(exc).__name__, exc)
        await self._call_user("error_cb", exc)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            logger.warning("nats disconnected; updates are lost until it reconnects")
        await self._call_user("disconnected_cb")

    async def _on_reconnected(self) -> None:
        self.stats.incr("reconnects")
        client = self._client
        url = client.connected_url if client is not None else None
        logger.info(
            "nats reconnected server=%s:%s; resyncing %d subscriptions",
            url.hostname if url is not None else None,
            url.port if url is not None else None,
            len(self._subscriptions),
        )
        for subscription in list(self._subscriptions.values()):
            subscription._request_resync("nats reconnected")
        await self._call_user("reconnected_cb")

    async def _on_closed(self) -> None:
        if not self._closing:
            logger.error(
                "nats connection closed for good; ending %d subscriptions",
                len(self._subscriptions),
            )
        for subscription in list(self._subscriptions.values()):
            subscription._end()
        await self._call_user("closed_cb")

    async def _call_user(self, key: str, *args: Exception) -> None:
        callback = self._user_callbacks.get(key)
        if callback is None:
            return
        try:
            await callback(*args)
        except Exception:
            logger.exception("nats %s raised", key)

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

        Sends the same ``session_update`` event the middleware sends as the snapshot, so
        clients apply both alike. Publish after the change is committed where the loader
        reads, and with the version it committed, so subscriptions can order updates.

        Args:
            session_id: The session; validated before any subject is built.
            session: Its whole state, serialisable by pydantic.
            owner: Who owns the session, sent as ``owner``.
            version: The state's version (an int or a timestamp).

        Raises:
            ValueError: ``session_id`` is invalid; nothing was sent.
            RuntimeError: The bridge is not open.
            nats.errors.Error: nats-py refused the message (connection closed, payload too
                large, reconnect buffer full).
        """
        subject = self.subject(session_id)
        event = SessionUpdate(
            type=self.event_type,
            session_id=session_id,
            owner=owner,
            session=session,
            version=version,
        )
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

        Sends a ``session_patch`` event (:class:`~asgi_session_sync.SessionPatch`): applying
        ``patch`` to the session's state at ``base_version`` gives its state at ``version``.
        Publish after committing ``version`` where the loader reads, one patch per committed
        version, in order: a subscription forwards a patch only to a socket at
        ``base_version``, and resyncs a socket that missed one.
        :func:`~asgi_session_sync.make_patch` computes ``patch`` from the two states.

        Args:
            session_id: The session; validated before any subject is built.
            patch: RFC 6902 operations, such as
                ``[{"op": "replace", "path": "/interactions/3/response", "value": "Hel"}]``.
            base_version: The version the patch applies to.
            version: The version it produces; newer than ``base_version``.
            owner: Who owns the session, sent as ``owner`` when given.

        Raises:
            ValueError: ``session_id`` is invalid, ``patch`` is not RFC 6902 operations, or
                ``version`` is not newer than ``base_version``; nothing was sent.
            RuntimeError: The bridge is not open.
            nats.errors.Error: nats-py refused the message.
        """
        subject = self.subject(session_id)
        if is_newer(version, base_version) is not True:
            raise ValueError(
                "version must be a version newer than base_version, of the same kind (an int "
                f"or a timestamp, at most {MAX_VERSION_CHARS} characters on the wire): "
                f"got base_version={clip_for_log(str(base_version))!r} "
                f"version={clip_for_log(str(version))!r}"
            )
        event = SessionPatch(
            session_id=session_id,
            base_version=base_version,
            version=version,
            patch=[dict(operation) for operation in patch],
        )
        if owner is not None:
            event = event.model_copy(update={"owner": owner})
        await self.client.publish(subject, event.to_json())

    def subscribe(
        self,
        session_id: str,
        *,
        scope: Mapping[str, Any] | None = None,
        resync: Resync | None = None,
        max_queued: int | None = None,
        pending_msgs_limit: int | None = None,
        pending_bytes_limit: int | None = None,
    ) -> SessionSubscription:
        """Watch a session's updates: ``async with bridge.subscribe(id, scope=ws.scope)``.

        The subscription is made when the ``async with`` is entered, so enter it *before*
        accepting the WebSocket (the middleware loads the snapshot during accept); then
        iterate to receive each update's JSON text, or call
        :meth:`SessionSubscription.forward`.

        Args:
            session_id: The session; validated here, before any subject is built.
            scope: The WebSocket's ASGI scope, on a connection the middleware serves. The
                subscription then resyncs through the middleware (``get_resync(scope)``,
                unless ``resync`` is given) and learns the snapshot's version
                (``get_snapshot_version(scope)``) so patches chain from it at once.
            resync: Loads the session afresh after broker trouble or a lost patch:
                ``get_resync(websocket.scope)``. Without it (and without ``scope``), such
                trouble is only logged and patches that do not chain are dropped.
            max_queued: Overrides the bridge's ``max_queued`` for this subscription.
            pending_msgs_limit: Overrides the bridge's ``pending_msgs_limit``.
            pending_bytes_limit: Overrides the bridge's ``pending_bytes_limit``.

        Raises:
            ValueError: ``session_id`` is invalid.
        """
        subject = self.subject(session_id)
        if resync is None and scope is not None:
            resync = get_resync(scope)
        return SessionSubscription(
            self,
            session_id,
            subject,
            resync=resync,
            scope=scope,
            max_queued=self.max_queued if max_queued is None else max_queued,
            pending_msgs_limit=(
                self.pending_msgs_limit if pending_msgs_limit is None else pending_msgs_limit
            ),
            pending_bytes_limit=(
                self.pending_bytes_limit if pending_bytes_limit is None else pending_bytes_limit
            ),
        )


def _without_credentials(url: str) -> str:
    """``url`` without a user or password it may carry, for messages and logs."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}:{parts.port}" if parts.port else f"{parts.scheme}://{host}"


class SessionSubscription:
    """The updates of one session, for one WebSocket; made by :meth:`NatsBridge.subscribe`.

    An async context manager and an async iterator of JSON text frames. Entering subscribes
    and waits until the server has the subscription; leaving always unsubscribes (also when
    the body raises or is cancelled, whose exception passes unchanged) and cancels a running
    resync, waiting for it to end. Enter and leave it in the same task, with ``async with``.

    One stream carries live updates, patches and the snapshots ``resync()`` returns, so the app
    sends everything from its own loop. The subscription knows the version of the state its
    socket has (:attr:`version`: the snapshot's, then that of each frame it yielded) and
    judges every frame against it:

    - a full state (``session_update``) is yielded only when newer, and sets the version;
    - a patch (``session_patch``) is yielded only when its ``base_version`` is that version;
      one not newer is dropped; any other (a patch was lost, or the version is unknown) is
      never yielded: the socket is resynced with a fresh snapshot (the same resync as after a
      reconnect), and the patches that chain from that snapshot follow it.

    So the socket never receives a patch for a state it does not have, and never needs to
    reconnect for it. The iteration ends when the bridge closes.

    Attributes:
        session_id: The session watched.
        subject: Its NATS subject.
    """

    def __init__(
        self,
        bridge: NatsBridge,
        session_id: str,
        subject: str,
        *,
        resync: Resync | None,
        scope: Mapping[str, Any] | None = None,
        max_queued: int,
        pending_msgs_limit: int,
        pending_bytes_limit: int,
    ) -> None:
        if max_queued < 1 or pending_msgs_limit < 1 or pending_bytes_limit < 1:
            raise ValueError("max_queued and the pending limits must be positive")
        self.session_id = session_id
        self.subject = subject
        self._bridge = bridge
        self._pending_msgs_limit = pending_msgs_limit
        self._pending_bytes_limit = pending_bytes_limit
        self._feed = SessionFeed(
            session_id, resync=resync, scope=scope, max_queued=max_queued, stats=bridge.stats
        )
        self._sub: Subscription | None = None
        self._entered = False
        self._open = False

    async def __aenter__(self) -> SessionSubscription:
        """Subscribe, and wait until the server acknowledges it."""
        if self._entered:
            raise RuntimeError("a SessionSubscription can be entered once")
        self._entered = True
        client = self._bridge.client
        self._feed.limiter = self._bridge._resync_limiter
        await self._feed.__aenter__()
        self._open = True
        try:
            self._sub = await client.subscribe(
                self.subject,
                cb=self._on_message,
                pending_msgs_limit=self._pending_msgs_limit,
                pending_bytes_limit=self._pending_bytes_limit,
            )
            self._bridge._subscriptions[self._sub] = self
            self._bridge.stats.incr("subscriptions")
            await self._confirm(client)
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Unsubscribe, stop a running resync, and let the body's exception pass unchanged."""
        await self._close()

    async def _confirm(self, client: Client) -> None:
        # One round trip: once the server answers, it has the subscription, so what is
        # published after the snapshot's load reaches us. While disconnected there is no one to
        # ask; nats-py re-subscribes on reconnect and the reconnect triggers a resync.
        if not client.is_connected:
            logger.warning(
                "nats not connected; subscription pending until reconnect session_id=%s",
                self.session_id,
            )
            return
        try:
            await client.flush(timeout=_CONFIRM_TIMEOUT)
        except (NatsError, OSError) as error:
            logger.warning(
                "nats did not confirm the subscription, resyncing session_id=%s: %s",
                self.session_id,
                error,
            )
            self._request_resync("subscription not confirmed")

    async def _close(self) -> None:
        try:
            sub, self._sub = self._sub, None
            if sub is not None:
                self._bridge._subscriptions.pop(sub, None)
                # Shielded and bounded: the server must hear the UNSUB even when the
                # connection's task is being cancelled, or it keeps sending updates here.
                with anyio.move_on_after(_UNSUBSCRIBE_TIMEOUT, shield=True):
                    try:
                        await sub.unsubscribe()
                    except NatsError as error:
                        # A closed or draining connection: the server forgets it by itself.
                        logger.debug("nats unsubscribe skipped subject=%s: %s", self.subject, error)
        finally:
            if self._open:
                self._open = False
                await self._feed.__aexit__(None, None, None)

    def _end(self) -> None:
        """End the iteration once the buffered frames are read (the bridge is closing)."""
        self._feed.end()

    @property
    def version(self) -> Version | None:
        """The version of the state the socket has, as far as this subscription knows.

        Read from :func:`~asgi_session_sync.get_snapshot_version` when ``subscribe`` was given
        the ``scope``, then the version of each frame yielded; ``None`` while unknown. Set it
        after sending a snapshot of your own when the middleware does not send it; a patch
        arriving while it is unknown is never yielded, it causes a resync instead.
        """
        version: Version | None = self._feed.version
        return version

    @version.setter
    def version(self, version: Version | None) -> None:
        self._feed.version = version

    def request_resync(self) -> None:
        """Load the session afresh with ``resync`` and yield the snapshot in this stream.

        The bridge calls this after a reconnect, a slow-consumer drop or a patch that does not
        chain; call it when you know updates may have been missed for another reason. At most
        one resync runs at a time per subscription; a request while one runs schedules one
        more after it.
        """
        self._request_resync("requested by the app")

    def _request_resync(self, reason: str) -> None:
        self._feed.request_resync(reason)

    async def _on_message(self, msg: Msg) -> None:
        # Runs in nats-py's per-subscription task. Waiting here while the app's buffer is full
        # makes nats-py buffer, and past its limits drop and report a slow consumer: a resync.
        try:
            frame = parse_frame(msg.data.decode())
        except UnicodeDecodeError:
            frame = "not UTF-8"
        if isinstance(frame, str):
            self._bridge.stats.incr("invalid_messages")
            logger.warning(
                "dropped an invalid message reason=%s subject=%s bytes=%d",
                frame,
                msg.subject,
                len(msg.data),
            )
            return
        await self._feed.put(frame)

    async def forward(
        self,
        send_text: Callable[[str], Awaitable[object]],
        receive: Callable[[], Awaitable[Mapping[str, Any]]],
        *,
        on_message: Callable[[Mapping[str, Any]], Awaitable[object]] | None = None,
        heartbeat: float | None = None,
    ) -> None:
        """Send every update to the socket until the client disconnects.

        The loop every WebSocket handler needs: one task sends the frames, this one reads the
        socket, since reading is how an app learns that the client left. Client messages go to
        ``on_message`` (or are dropped). Returns on ``websocket.disconnect``, or when the
        bridge closes. An exception from ``send_text`` (the client left mid-send: the
        framework's disconnect error) propagates as it is, as from the app's own send.

        ```python
        async with bridge.subscribe(session_id, scope=websocket.scope) as updates:
            await websocket.accept()
            await updates.forward(websocket.send_text, websocket.receive, heartbeat=15)
        ```

        Args:
            send_text: Sends one text frame: ``websocket.send_text`` in Starlette and FastAPI,
                ``socket.send_text`` in Litestar.
            receive: The raw ASGI receive of the socket: ``websocket.receive`` (Starlette,
                FastAPI), ``socket.receive`` (Litestar).
            on_message: Called with each ``websocket.receive`` message the client sends.
            heartbeat: Seconds of quiet after which a ``{"type": "heartbeat"}`` frame is sent,
                so the client receives something at least this often and can tell a dead
                socket from a quiet session (the browser client reconnects after 2.5 times
                this with nothing received). A socket busy with updates carries no heartbeats.
                ``None`` (the default) sends none.

        Raises:
            ValueError: ``heartbeat`` is not a positive number.
        """
        await self._feed.forward(send_text, receive, on_message=on_message, heartbeat=heartbeat)

    def __aiter__(self) -> SessionSubscription:
        """Iterate over the frames."""
        return self

    async def __anext__(self) -> str:
        """Return the next frame's JSON text: a newer update, a chained patch, or a snapshot."""
        if not self._entered:
            raise RuntimeError("enter the subscription with `async with` before iterating")
        return await self._feed.__anext__()
