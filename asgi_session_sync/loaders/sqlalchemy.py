"""A snapshot loader for sessions stored with SQLAlchemy: the row and its interactions.

```python
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from asgi_session_sync.loaders.sqlalchemy import sqlalchemy_loader

engine = create_async_engine("sqlite+aiosqlite:///app.db")  # or postgresql+asyncpg://...
load_session = sqlalchemy_loader(
    async_sessionmaker(engine),
    ChatSession,
    interactions=ChatSession.interactions,
    owner=ChatSession.owner_id,
    version=ChatSession.version,
)
app.add_middleware(SessionSyncMiddleware, loader=load_session, paths=["/ws/sessions/{session_id}"])
```

The loader reads the session and its interactions with one SQL statement, sends nothing unless
the session's owner is the connecting user, and returns a :class:`~asgi_session_sync.Snapshot`
with the owner and the version: an integer column as is, a timestamp column as microseconds
since the Unix epoch (:func:`timestamp_version`). SQLite (aiosqlite) and PostgreSQL (asyncpg)
are tested.

It runs on asyncio only: SQLAlchemy's asyncio extension and its drivers do not run on trio.
Install it with the ``sqlalchemy`` extra (``postgres`` for asyncpg): see "Install" in
``docs/getting-started.md``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from pydantic import BaseModel

from ..protocol import MAX_VERSION, Version, as_version
from ..snapshot import SessionContext, Snapshot, user_identity

try:
    from sqlalchemy import BigInteger, Integer, SmallInteger, Uuid, bindparam, inspect, select
    from sqlalchemy.exc import NoInspectionAvailable
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import (
        ColumnProperty,
        Mapper,
        QueryableAttribute,
        RelationshipProperty,
        configure_mappers,
        contains_eager,
    )
    from sqlalchemy.orm.base import instance_state
    from sqlalchemy.sql import ColumnElement, Select
    from sqlalchemy.types import TypeEngine
except ImportError as exc:  # pragma: no cover (the extra is installed wherever tests run)
    raise ImportError(
        "install asgi-session-sync[sqlalchemy] to use asgi_session_sync.loaders.sqlalchemy"
    ) from exc

__all__ = [
    "OrderBy",
    "SQLAlchemyLoader",
    "column_values",
    "sqlalchemy_loader",
    "timestamp_version",
]

logger = logging.getLogger("asgi_session_sync")

_Model = TypeVar("_Model")

OrderBy = ColumnElement[Any] | QueryableAttribute[Any]
"""One ``ORDER BY`` term: a column attribute (``Interaction.position``) or an expression
(``Interaction.position.desc()``)."""

_ID_PARAM = "asgi_session_sync_id"
_DECIMAL_INTEGER = re.compile(r"-?[0-9]{1,20}")
_LOG_PATH_CHARS = 64
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
_LAST_TIMESTAMP = _EPOCH + MAX_VERSION * _MICROSECOND  # 2255-06-05T23:47:34.740991Z


def timestamp_version(at: datetime) -> Version:
    """Return the version of a timestamp: whole microseconds since 1970-01-01T00:00:00Z.

    What the loader sends for a ``datetime`` version column; call it too when you publish a
    live update stamped with the same column, so both carry the same version. A naive
    ``datetime`` (SQLite keeps no offset) is taken as UTC, an aware one as the instant it
    names: ``datetime(2026, 1, 1)`` and ``datetime(2026, 1, 1, tzinfo=timezone.utc)`` give
    the same version, ``1767225600000000``. Computed with integers, exactly to the microsecond.

    A version is at most ``2**53 - 1``, the largest integer JavaScript represents exactly, so
    timestamps fit from 1970 to 2255-06-05T23:47:34.740991Z.

    Raises:
        ValueError: ``at`` is before 1970 or after 2255-06-05T23:47:34.740991Z.
    """
    version = as_version(_epoch_microseconds(at))
    if version is None:
        raise ValueError(
            f"a timestamp version is from 1970 to {_LAST_TIMESTAMP.isoformat()}: "
            f"got {at.isoformat()}"
        )
    return version


def _epoch_microseconds(at: datetime) -> int:
    """Whole microseconds from 1970-01-01T00:00:00Z to ``at`` (naive is UTC), exactly.

    timedelta // timedelta is integer arithmetic: no float timestamp rounds a microsecond away.
    """
    if at.utcoffset() is None:
        at = at.replace(tzinfo=timezone.utc)
    return (at - _EPOCH) // _MICROSECOND


def column_values(row: object) -> dict[str, Any]:
    """Return the loaded column attributes of a mapped object, by attribute name.

    What the default ``serialize`` of :func:`sqlalchemy_loader` sends for the session row and
    for each interaction; use it to build your own. Values are left as the driver returned them
    (``datetime``, ``Decimal``, ``UUID``): the middleware serialises them with pydantic.
    Attributes not loaded (deferred or expired columns) are left out rather than loaded, since a
    lazy load cannot run in SQLAlchemy's asyncio extension.

    Raises:
        sqlalchemy.exc.NoInspectionAvailable: ``row`` is not an instance of a mapped class.
    """
    try:
        # instance_state, not inspect(): inspect() first tries the class's own inspector
        # (DeclarativeBase registers one that refuses instances), a quarter of the load's time.
        state = instance_state(row)
    except AttributeError:
        raise NoInspectionAvailable(f"not an instance of a mapped class: {row!r}") from None
    loaded = state.dict
    return {key: loaded[key] for key in _column_keys(state.mapper) if key in loaded}


@functools.cache
def _column_keys(mapper: Mapper[Any]) -> tuple[str, ...]:
    return tuple(prop.key for prop in mapper.column_attrs)


class SQLAlchemyLoader:
    """A snapshot loader reading a session row and its interactions; see :func:`sqlalchemy_loader`.

    It satisfies :class:`~asgi_session_sync.SessionLoader`: pass it as the middleware's
    ``loader``. Build it with :func:`sqlalchemy_loader`, which checks the mapping and prepares
    the statements once.
    """

    __slots__ = (
        "_check_owner",
        "_convert_id",
        "_load_statement",
        "_owner_key",
        "_serialize",
        "_sessionmaker",
        "_user_id",
        "_version_key",
        "_version_name",
        "_version_statement",
    )

    def __init__(
        self,
        *,
        sessionmaker: Callable[[], AsyncSession],
        load_statement: Select[Any],
        version_statement: Select[Any],
        convert_id: Callable[[str], object],
        owner_key: str,
        version_key: str,
        version_name: str,
        user_id: Callable[[Any], str | None],
        check_owner: bool,
        serialize: Callable[[Any], Mapping[str, Any] | BaseModel],
    ) -> None:
        self._sessionmaker = sessionmaker
        self._load_statement = load_statement
        self._version_statement = version_statement
        self._convert_id = convert_id
        self._owner_key = owner_key
        self._version_key = version_key
        self._version_name = version_name
        self._serialize = serialize
        self._user_id = user_id
        self._check_owner = check_owner

    async def __call__(self, ctx: SessionContext, /) -> Snapshot | None:
        """Load ``ctx.session_id`` with its interactions, in one SQL statement.

        Returns ``None`` when there is no such session (or the id cannot be one, such as
        ``"abc"`` for an integer key, in which case nothing is queried) and when the owner check
        fails; the reason is logged.

        Raises:
            RuntimeError: Called outside asyncio (under trio).
        """
        _require_asyncio()
        session_id = self._session_id(ctx, "snapshot")
        if session_id is None:
            return None
        async with self._sessionmaker() as session:
            result = await session.execute(self._load_statement, {_ID_PARAM: session_id})
            row = result.unique().scalar_one_or_none()
            if row is None:
                logger.debug("no snapshot: no such session session_id=%s", ctx.session_id)
                return None
            owner = getattr(row, self._owner_key)
            if self._is_refused(ctx, owner, "snapshot"):
                return None
            # Inside the session on purpose: a custom serialize sees the row as loaded.
            content = self._serialize(row)
            version = self._version(ctx, getattr(row, self._version_key))
        return Snapshot(content, owner=None if owner is None else str(owner), version=version)

    async def version_loader(self, ctx: SessionContext, /) -> Version | None:
        """Return the session's current version: one query of the version (and owner) column.

        For code that only needs to know whether a client is current (resuming a connection):
        no interactions are read. Returns ``None`` when there is no such session, when the owner
        check fails (logged as for a snapshot), or when the version is ``NULL`` or not a
        version (logged as for a snapshot). A timestamp is converted exactly as for a snapshot
        (:func:`timestamp_version`), so the two always agree.

        Raises:
            RuntimeError: Called outside asyncio (under trio).
        """
        _require_asyncio()
        session_id = self._session_id(ctx, "version")
        if session_id is None:
            return None
        async with self._sessionmaker() as session:
            result = await session.execute(self._version_statement, {_ID_PARAM: session_id})
            row = result.one_or_none()
        if row is None:
            logger.debug("no version: no such session session_id=%s", ctx.session_id)
            return None
        if self._check_owner and self._is_refused(ctx, row[1], "version"):
            return None
        return self._version(ctx, row[0])

    def _session_id(self, ctx: SessionContext, what: str) -> object | None:
        try:
            return self._convert_id(ctx.session_id)
        except ValueError:
            logger.debug(
                "no %s: session id cannot be a key of this table session_id=%s",
                what,
                ctx.session_id,
            )
            return None

    def _is_refused(self, ctx: SessionContext, owner: object, what: str) -> bool:
        if not self._check_owner:
            return False
        # Only the session id and the path are logged: the user (a token, an email) is not ours
        # to write to logs.
        user_id = self._user_id(ctx.user)
        if not user_id:
            logger.warning(
                "no %s: no user to check the session owner against session_id=%s path=%r",
                what,
                ctx.session_id,
                _path(ctx),
            )
            return True
        if owner is None or str(owner) != str(user_id):
            logger.warning(
                "no %s: session owner does not match the connecting user session_id=%s path=%r",
                what,
                ctx.session_id,
                _path(ctx),
            )
            return True
        return False

    def _version(self, ctx: SessionContext, value: object) -> Version | None:
        """The version column's value as a version: the one conversion, for both loads."""
        if value is None:
            return None
        version: Version | None = None
        if isinstance(value, datetime):
            version = as_version(_epoch_microseconds(value))
        elif isinstance(value, int) and not isinstance(value, bool):
            version = as_version(int(value))
        if version is None:
            # A refused version is the schema's fault, not the client's: logged as an error,
            # and the client gets its snapshot without a version rather than nothing.
            logger.error(
                "version column holds %s, not a version (an int from 0 to 2**53 - 1 or a "
                "datetime from 1970 to 2255); sent without a version column=%s session_id=%s",
                _describe(value),
                self._version_name,
                ctx.session_id,
            )
        return version


def sqlalchemy_loader(
    sessionmaker: Callable[[], AsyncSession],
    model: type[_Model],
    *,
    interactions: QueryableAttribute[Any],
    owner: QueryableAttribute[Any],
    version: QueryableAttribute[Any],
    id_column: QueryableAttribute[Any] | None = None,
    user_id: Callable[[Any], str | None] = user_identity,
    check_owner: bool = True,
    serialize: Callable[[_Model], Mapping[str, Any] | BaseModel] | None = None,
    order_by: OrderBy | Sequence[OrderBy] | None = None,
) -> SQLAlchemyLoader:
    """Build a loader that reads a session row and its interactions with SQLAlchemy.

    Each load runs one SQL statement: the session row ``LEFT OUTER JOIN`` its interactions,
    ordered, on a new session from ``sessionmaker``. A session whose owner is not the
    connecting user gives no snapshot (logged as a warning with the session id and path), so
    guessing another user's session id reveals nothing.

    Args:
        sessionmaker: An ``async_sessionmaker`` (or any callable returning a new
            ``AsyncSession``).
        model: The mapped class of a session.
        interactions: The one-to-many (or many-to-many) relationship holding the session's
            interactions, such as ``ChatSession.interactions``.
        owner: The column attribute holding the owner's id, such as ``ChatSession.owner_id``;
            sent as the snapshot's ``owner``, as a string.
        version: The column attribute holding the version, an integer or a timestamp, such as
            ``ChatSession.version``. An integer is sent as is; a ``datetime`` as whole
            microseconds since the Unix epoch (see :func:`timestamp_version`; naive is UTC).
            A value that is neither, or is out of range (below 0, above ``2**53 - 1``, before
            1970 or after 2255), is logged as an error and the snapshot has no version.
        id_column: The unique column attribute the session id from the URL is matched
            against; default the primary key. An integer column only ever receives decimal ids
            within the column's range (16, 32 or 64 bits for ``SmallInteger``, ``Integer``,
            ``BigInteger``: on SQLite, declare ``BigInteger().with_variant(Integer, "sqlite")``
            for wider ids) and a ``Uuid`` column only valid UUIDs; any other id gives ``None``
            without a query.
        user_id: ``def user_id(user) -> str | None``: the id of ``ctx.user`` compared with the
            owner column (as strings). Default
            :func:`~asgi_session_sync.snapshot.user_identity`.
        check_owner: Compare the owner with the connecting user. Turn it off only when
            something before the middleware already guarantees it.
        serialize: ``def serialize(row) -> Mapping | BaseModel``: the snapshot's ``session``,
            from the loaded row (its interactions loaded, in order). Default: the row's columns
            (see :func:`column_values`) plus a list of each interaction's columns under the
            relationship's name. It runs while the session is open but must not lazy-load:
            SQLAlchemy's asyncio extension raises on lazy loads.
        order_by: How interactions are ordered: a column attribute, an expression such as
            ``Interaction.position.desc()``, or a sequence of them. Default the relationship's
            own ``order_by``, else the interactions' primary key.

    Returns:
        The loader, with a ``version_loader`` method that reads only the version.

    Raises:
        TypeError: ``model`` is not mapped, or ``sessionmaker``, ``user_id`` or ``serialize``
            is not callable.
        ValueError: An attribute is not one of ``model`` of the expected kind, or the model has
            a composite primary key and no ``id_column``.
    """
    for name, value in (("sessionmaker", sessionmaker), ("user_id", user_id)):
        if not callable(value):
            raise TypeError(f"{name} must be callable: got {value!r}")
    if serialize is not None and not callable(serialize):
        raise TypeError(f"serialize must be callable or None: got {serialize!r}")
    mapper = inspect(model, raiseerr=False)
    if not isinstance(mapper, Mapper):
        raise TypeError(f"model must be a mapped class, such as a DeclarativeBase: got {model!r}")
    # Resolves relationships given by name ("Interaction.position") before they are inspected.
    configure_mappers()
    name = model.__name__
    relationship = _relationship(interactions, mapper, name)
    owner_key = _column_property(owner, mapper, "owner", name).key
    version_key = _column_property(version, mapper, "version", name).key
    if id_column is None:
        if len(mapper.primary_key) != 1:
            raise ValueError(
                f"{name} has a composite primary key: pass id_column=, the column the session "
                "id is matched against"
            )
        id_column = mapper.get_property_by_column(mapper.primary_key[0]).class_attribute
    id_type = _column_property(id_column, mapper, "id_column", name).columns[0].type

    ordering: tuple[OrderBy, ...]
    if order_by is None:
        ordering = relationship.order_by or tuple(relationship.mapper.primary_key)
    elif isinstance(order_by, ColumnElement | QueryableAttribute):
        ordering = (order_by,)
    else:
        ordering = tuple(order_by)

    matches_id = id_column == bindparam(_ID_PARAM)
    # contains_eager over an explicit outer join, rather than joinedload: one statement all the
    # same, and the ORDER BY names the joined table itself, so order_by can be any expression.
    load_statement = (
        select(model)
        .outerjoin(interactions)
        .options(contains_eager(interactions))
        .where(matches_id)
        .order_by(*ordering)
    )
    version_columns = (version, owner) if check_owner else (version,)
    version_statement = select(*version_columns).where(matches_id)

    return SQLAlchemyLoader(
        sessionmaker=sessionmaker,
        load_statement=load_statement,
        version_statement=version_statement,
        convert_id=_id_converter(id_type),
        owner_key=owner_key,
        version_key=version_key,
        version_name=f"{name}.{version_key}",
        user_id=user_id,
        check_owner=check_owner,
        serialize=serialize or _default_serializer(interactions.key),
    )


def _relationship(
    attribute: object, mapper: Mapper[Any], model_name: str
) -> RelationshipProperty[Any]:
    prop = attribute.property if isinstance(attribute, QueryableAttribute) else None
    if not isinstance(prop, RelationshipProperty) or not mapper.isa(prop.parent):
        raise ValueError(
            f"interactions must be a relationship of {model_name}, such as "
            f"{model_name}.interactions: got {attribute!r}"
        )
    if not prop.uselist:
        raise ValueError(
            f"interactions must be a one-to-many or many-to-many relationship: "
            f"{attribute!r} holds a single object"
        )
    if prop.lazy in ("dynamic", "write_only"):
        raise ValueError(
            f"interactions must be a loadable collection: {attribute!r} is lazy={prop.lazy!r}"
        )
    return prop


def _column_property(
    attribute: object, mapper: Mapper[Any], name: str, model_name: str
) -> ColumnProperty[Any]:
    prop = attribute.property if isinstance(attribute, QueryableAttribute) else None
    if not isinstance(prop, ColumnProperty) or not mapper.isa(prop.parent):
        raise ValueError(
            f"{name} must be a column attribute of {model_name}, such as "
            f"{model_name}.{name}: got {attribute!r}"
        )
    return prop


def _id_converter(id_type: TypeEngine[Any]) -> Callable[[str], object]:
    """How a session id from the URL becomes a value of the id column; ValueError if it can't."""
    if isinstance(id_type, Integer):
        bits = (
            16
            if isinstance(id_type, SmallInteger)
            else 64
            if isinstance(id_type, BigInteger)
            else 32
        )
        limit = 1 << (bits - 1)

        # Refused here rather than by the database: PostgreSQL raises on an out-of-range
        # parameter, and a client must not be able to turn a bad id into a logged traceback.
        def to_integer(session_id: str) -> int:
            if not _DECIMAL_INTEGER.fullmatch(session_id):
                raise ValueError("not a decimal integer")
            number = int(session_id)
            if not -limit <= number < limit:
                raise ValueError(f"out of the {bits}-bit range of the id column")
            return number

        return to_integer
    if isinstance(id_type, Uuid):
        as_uuid = id_type.as_uuid

        def to_uuid(session_id: str) -> object:
            parsed = uuid.UUID(session_id)
            return parsed if as_uuid else str(parsed)

        return to_uuid
    return str


def _default_serializer(key: str) -> Callable[[Any], Mapping[str, Any]]:
    def serialize(row: Any) -> Mapping[str, Any]:
        return {**column_values(row), key: [column_values(item) for item in getattr(row, key)]}

    return serialize


def _require_asyncio() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            "asgi_session_sync.loaders.sqlalchemy runs on asyncio only: SQLAlchemy's asyncio "
            "extension and its drivers do not run on trio"
        ) from None


def _describe(value: object) -> str:
    """A refused version for a log line: its value when short and safe, else its type."""
    if isinstance(value, datetime):
        return value.isoformat()
    if type(value) is int:
        return str(value) if value.bit_length() <= 64 else f"an int of {value.bit_length()} bits"
    return f"a {type(value).__name__}"


def _path(ctx: SessionContext) -> str:
    path = str(ctx.scope.get("path", ""))
    return path if len(path) <= _LOG_PATH_CHARS else path[:_LOG_PATH_CHARS] + "..."
