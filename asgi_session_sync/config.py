"""How a :class:`~asgi_session_sync.SessionSync` loads, shares and sends snapshots.

One frozen dataclass, validated once when it is made: the service, its fetcher and the
middleware read it and forward nothing.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import TypedDict

from ._session_ids import DEFAULT_SESSION_ID_PATTERN
from .snapshot import (
    Authenticate,
    ErrorHook,
    FlightKey,
    SessionContext,
    SessionLoader,
    VersionLoader,
    user_identity,
)

__all__ = ["SyncConfig", "SyncOptions", "check_options", "default_flight_key"]


def default_flight_key(ctx: SessionContext) -> Hashable | None:
    """Share loads between connections of the same session AND the same user.

    A loader may check ownership, so one user's result is never handed to another. Anonymous
    connections (``user`` is ``None``) share with each other; users the middleware cannot name
    (see :func:`~asgi_session_sync.snapshot.user_identity`) share nothing: the key is ``None``.
    """
    if ctx.user is None:
        return (ctx.session_id, None)
    identity = user_identity(ctx.user)
    return None if identity is None else (ctx.session_id, identity)


def _unshared(ctx: SessionContext) -> None:
    return None


def _is_async(value: object) -> bool:
    """Whether calling ``value`` gives a coroutine: an ``async def`` function, or an object
    whose ``__call__`` is one (``functools.partial`` of either too)."""
    return inspect.iscoroutinefunction(value) or (
        callable(value) and inspect.iscoroutinefunction(type(value).__call__)
    )


def _check_number(name: str, value: object, *, optional: bool, whole: bool) -> None:
    """Refuse ``value`` unless it is a positive number (an int when ``whole``), or ``None``
    when ``optional``; the message names the option and the fix. A value of the wrong type
    (a bool, a str, a float where an int is needed) is a ``TypeError``; a number out of range
    (zero, negative, NaN) a ``ValueError``."""
    if value is None and optional:
        return
    kind = int if whole else (int, float)
    right_type = isinstance(value, kind) and not isinstance(value, bool)
    if not right_type or not value > 0:  # type: ignore[operator]
        what = "a positive int" if whole else "a positive number of seconds"
        raise (ValueError if right_type else TypeError)(
            f"{name} must be {what}{' or None' if optional else ''}: got {value!r}"
        )


@dataclass(frozen=True)
class SyncConfig:
    """How snapshots are loaded, shared and sent; see :class:`~asgi_session_sync.SessionSync`.

    Attributes:
        loader: ``async def load_session(ctx: SessionContext)`` returning a mapping, a
            pydantic model, a :class:`~asgi_session_sync.Snapshot`, or ``None`` for "nothing
            to send".
        version_loader: Optional ``async def version(ctx) -> int | None``, a cheap query asked
            before the full load when the client resumes with ``since``.
        authenticate: Optional ``async def authenticate(scope)`` returning the connecting user,
            for connections whose user the app does not give and ``scope["user"]`` lacks.
        on_error: Optional ``def on_error(ctx, exc)`` called with the exception whenever a
            connection gets no snapshot because something failed: the loader,
            ``version_loader``, ``authenticate`` or ``flight_key`` raised, a call or its wait for a
            slot timed out (a ``TimeoutError``; once per load, however many connections
            shared it), or the server's ``send`` refused the snapshot frame.
        timeout: Seconds each call of the loader, ``version_loader`` and ``authenticate`` may
            take. A call past it is cancelled and fails every connection sharing it: they get
            no snapshot. A loader that cannot be cancelled (a thread not abandoned on cancel)
            holds its connections until it returns.
        queue_timeout: Seconds a load may wait for one of ``max_concurrent_loads`` slots before
            it gives up (no snapshot), or ``None`` to wait its turn however long (each call
            ahead is still bounded by ``timeout``). A connection's snapshot thus takes at most
            ``queue_timeout + timeout``; a resuming one waits for a version load first, with
            the same two bounds, and one with ``authenticate`` for it too (``timeout``), and
            the middleware holds the handshake as long.
        max_bytes: Largest snapshot frame sent, in bytes of JSON; larger ones are logged and
            dropped. ``None`` for no limit.
        send_synced: Send a ``session_synced`` event when resume skips the snapshot.
        single_flight: Share concurrent loads with equal ``flight_key``.
        flight_key: Which connections may share a load: a hashable key, or ``None`` for a load
            never shared; :func:`default_flight_key` by default.
        max_concurrent_loads: Loader calls running at once, at most.
        cache_ttl: Opt-in: seconds a successful load is reused for new connections (failed
            and empty loads are not). ``None`` caches nothing. A cached snapshot can miss an
            update published before the new connection subscribed: keep it short.
        since_param: Query parameter in which a resuming client passes its last version.
        session_id_pattern: Regular expression a session id must fully match. Whatever it
            allows, ids with ``.``, ``*``, ``>``, whitespace, control, format or invisible
            characters, and ids over 256 characters, are always refused.

    Raises:
        TypeError: ``loader``, ``version_loader`` or ``authenticate`` is not an ``async``
            function, a hook is not callable, or an option has the wrong type (the message
            names it and the fix).
        ValueError: A limit is not positive (the message names it).
    """

    loader: SessionLoader
    version_loader: VersionLoader | None = None
    authenticate: Authenticate | None = None
    on_error: ErrorHook | None = None
    timeout: float = 5.0
    queue_timeout: float | None = 30.0
    max_bytes: int | None = 4 * 1024 * 1024
    send_synced: bool = False
    single_flight: bool = True
    flight_key: FlightKey = default_flight_key
    max_concurrent_loads: int = 64
    cache_ttl: float | None = None
    since_param: str = "since"
    session_id_pattern: str | re.Pattern[str] = DEFAULT_SESSION_ID_PATTERN

    def __post_init__(self) -> None:
        for name in ("loader", "version_loader", "authenticate"):
            value = getattr(self, name)
            if (value is not None or name == "loader") and not _is_async(value):
                raise TypeError(
                    f"{name} must be an async function (async def {name}(...)) or an object "
                    f"with an async __call__: got {value!r}"
                )
        for name in ("on_error", "flight_key"):
            value = getattr(self, name)
            if (value is not None or name == "flight_key") and not callable(value):
                raise TypeError(f"{name} must be a function (def {name}(...)): got {value!r}")
        for name in ("send_synced", "single_flight"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False: got {getattr(self, name)!r}")
        _check_number("timeout", self.timeout, optional=False, whole=False)
        _check_number("queue_timeout", self.queue_timeout, optional=True, whole=False)
        _check_number("max_bytes", self.max_bytes, optional=True, whole=True)
        _check_number("max_concurrent_loads", self.max_concurrent_loads, optional=False, whole=True)
        _check_number("cache_ttl", self.cache_ttl, optional=True, whole=False)
        if not isinstance(self.since_param, str) or not self.since_param:
            raise TypeError(
                f"since_param must be a non-empty query parameter name: got {self.since_param!r}"
            )
        if not isinstance(self.session_id_pattern, (str, re.Pattern)):
            raise TypeError(
                "session_id_pattern must be a regular expression (a str or re.Pattern): "
                f"got {self.session_id_pattern!r}"
            )

    @property
    def shared_key(self) -> FlightKey:
        """The key loads are shared by: ``flight_key``, or none at all without single-flight."""
        return self.flight_key if self.single_flight else _unshared


def check_options(caller: str, options: Mapping[str, object], *, also: Iterable[str] = ()) -> None:
    """Refuse an option :class:`SyncConfig` does not have, naming ``caller`` and the nearest
    name (``also``: the caller's own keywords, offered as suggestions too).

    Raises:
        TypeError: An unknown option, as Python says it for a misspelt keyword.
    """
    known = [field.name for field in fields(SyncConfig) if field.name != "loader"]
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, [*known, *also], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}{hint}")


class SyncOptions(TypedDict, total=False):
    """The keyword arguments of :class:`~asgi_session_sync.SessionSync` and of the middleware
    that make its :class:`SyncConfig` (every field but ``loader``; see there)."""

    version_loader: VersionLoader | None
    authenticate: Authenticate | None
    on_error: ErrorHook | None
    timeout: float
    queue_timeout: float | None
    max_bytes: int | None
    send_synced: bool
    single_flight: bool
    flight_key: FlightKey
    max_concurrent_loads: int
    cache_ttl: float | None
    since_param: str
    session_id_pattern: str | re.Pattern[str]
