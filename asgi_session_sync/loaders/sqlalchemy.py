"""A snapshot loader for sessions stored with SQLAlchemy: the row and its interactions.

```python
from sqlalchemy.ext.asyncio import create_async_engine
from asgi_session_sync.loaders.sqlalchemy import sqlalchemy_loader

engine = create_async_engine("sqlite+aiosqlite:///app.db")  # or postgresql+asyncpg://...
load_session = sqlalchemy_loader(
    engine,  # or an async_sessionmaker
    ChatSession,
    interactions=ChatSession.interactions,
    owner=ChatSession.owner_id,
    version=ChatSession.version,
)
app.add_middleware(SessionSyncMiddleware, loader=load_session, paths=["/ws/sessions/{session_id}"])
```

The loader reads the session and its interactions with one SQL statement, and returns a
:class:`~asgi_session_sync.Snapshot` with the owner and the version: an integer column as is, a
timestamp column as microseconds since the Unix epoch (:func:`timestamp_version`). The owner
check is in the statement too: for another user's session no interaction is read, so it costs
what a missing session costs. By default it selects plain columns and builds the snapshot's
dicts straight from the rows, without building mapped objects; with a ``serialize`` of your own
it loads mapped objects for it. SQLite (aiosqlite) and PostgreSQL (asyncpg) are tested.

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
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar, cast

from pydantic import BaseModel

from ..protocol import MAX_VERSION, Version, as_version
from ..snapshot import SessionContext, Snapshot, user_identity

try:
    from sqlalchemy import (
        CHAR,
        NCHAR,
        BigInteger,
        Column,
        Enum,
        Integer,
        SmallInteger,
        String,
        Table,
        Uuid,
        and_,
        bindparam,
        case,
        inspect,
        select,
    )
    from sqlalchemy.exc import NoInspectionAvailable
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
    from sqlalchemy.orm import (
        ColumnProperty,
        Mapper,
        QueryableAttribute,
        RelationshipProperty,
        configure_mappers,
        contains_eager,
    )
    from sqlalchemy.orm.base import instance_state
    from sqlalchemy.sql import ColumnElement, FromClause, Select
    from sqlalchemy.sql.visitors import replacement_traverse
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
_OWNER_PARAM = "asgi_session_sync_owner"
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

    The same dicts :func:`sqlalchemy_loader` sends by default for the session row and for each
    interaction (which it builds from the rows, without mapped objects); use it to build your
    own ``serialize``. Values are left as the driver returned them
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


@dataclass(frozen=True, slots=True)
class _Read:
    """A load's statement, and where its rows hold what the loader checks and sends.

    ``content`` turns the rows of plain columns into the snapshot's ``session``; it is ``None``
    when each row starts with a mapped object, for ``serialize``.
    """

    statement: Select[Any]
    owner: int
    version: int
    content: Callable[[Sequence[Any]], dict[str, Any]] | None = None


class SQLAlchemyLoader:
    """A snapshot loader reading a session row and its interactions; see :func:`sqlalchemy_loader`.

    It satisfies :class:`~asgi_session_sync.SessionLoader`: pass it as the middleware's
    ``loader``. Build it with :func:`sqlalchemy_loader`, which checks the mapping and prepares
    the statements once.
    """

    __slots__ = (
        "_bind_arguments",
        "_check_owner",
        "_convert_id",
        "_convert_owner",
        "_engine",
        "_read",
        "_serialize",
        "_sessionmaker",
        "_user_id",
        "_version_name",
        "_version_read",
    )

    def __init__(
        self,
        *,
        bind: AsyncEngine | Callable[[], AsyncSession],
        mapper: Mapper[Any],
        read: _Read,
        version_read: _Read,
        convert_id: Callable[[str], object],
        convert_owner: Callable[[str], object] | None,
        version_name: str,
        user_id: Callable[[Any], str | None],
        check_owner: bool,
        serialize: Callable[[Any], Mapping[str, Any] | BaseModel],
    ) -> None:
        self._engine = bind if isinstance(bind, AsyncEngine) else None
        self._sessionmaker = None if isinstance(bind, AsyncEngine) else bind
        # The session's binds choose the connection, as they would for a query of the model.
        self._bind_arguments: dict[str, Any] = {"mapper": mapper}
        self._read = read
        self._version_read = version_read
        self._convert_id = convert_id
        self._convert_owner = convert_owner
        self._version_name = version_name
        self._serialize = serialize
        self._user_id = user_id
        self._check_owner = check_owner

    async def __call__(self, ctx: SessionContext, /) -> Snapshot | None:
        """Load ``ctx.session_id`` with its interactions, in one SQL statement.

        Returns ``None`` when there is no such session (or the id cannot be one, such as
        ``"abc"`` for an integer key, in which case nothing is queried), when there is no
        connecting user to check the owner against (nothing is queried either), and when the
        owner check fails; the reason is logged.

        Raises:
            RuntimeError: Called outside asyncio (under trio).
        """
        _require_asyncio()
        query = self._query(ctx, "snapshot")
        if query is None:
            return None
        parameters, user_id = query
        read = self._read
        if read.content is not None:
            async with self._connect() as connection:
                rows = (await connection.execute(read.statement, parameters)).all()
            if not rows:
                logger.debug("no snapshot: no such session session_id=%s", ctx.session_id)
                return None
            first = rows[0]
            if self._is_refused(ctx, user_id, first[read.owner], "snapshot"):
                return None
            content: Mapping[str, Any] | BaseModel = read.content(rows)
        else:
            async with self._session() as session:
                result = await session.execute(read.statement, parameters)
                found = result.unique().one_or_none()
                if found is None:
                    logger.debug("no snapshot: no such session session_id=%s", ctx.session_id)
                    return None
                first = found
                if self._is_refused(ctx, user_id, first[read.owner], "snapshot"):
                    return None
                # Inside the session on purpose: a custom serialize sees the row as loaded.
                content = self._serialize(found[0])
        owner = first[read.owner]
        return Snapshot(
            content,
            owner=None if owner is None else str(owner),
            version=self._version(ctx, first[read.version]),
        )

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
        query = self._query(ctx, "version")
        if query is None:
            return None
        parameters, user_id = query
        read = self._version_read
        async with self._connect() as connection:
            row = (await connection.execute(read.statement, parameters)).one_or_none()
        if row is None:
            logger.debug("no version: no such session session_id=%s", ctx.session_id)
            return None
        if self._is_refused(ctx, user_id, row[read.owner], "version"):
            return None
        return self._version(ctx, row[read.version])

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[AsyncConnection]:
        """A connection for one Core statement: the engine's, or the new session's."""
        if self._engine is not None:
            async with self._engine.connect() as connection:
                yield connection
            return
        assert self._sessionmaker is not None
        async with self._sessionmaker() as session:
            yield await session.connection(bind_arguments=self._bind_arguments)

    def _session(self) -> AsyncSession:
        """A new session, for loading mapped objects."""
        if self._engine is not None:
            return AsyncSession(self._engine)
        assert self._sessionmaker is not None
        return self._sessionmaker()

    def _query(self, ctx: SessionContext, what: str) -> tuple[dict[str, object], str | None] | None:
        """The statement's parameters and the user id to check, or ``None``: nothing to query.

        Neither an id that cannot be a key nor a missing user depends on what is stored, so
        refusing them without a query tells a client nothing.
        """
        try:
            parameters: dict[str, object] = {_ID_PARAM: self._convert_id(ctx.session_id)}
        except ValueError:
            logger.debug(
                "no %s: session id cannot be a key of this table session_id=%s",
                what,
                ctx.session_id,
            )
            return None
        if not self._check_owner:
            return parameters, None
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
            return None
        user_id = str(user_id)
        if self._convert_owner is not None:
            try:
                parameters[_OWNER_PARAM] = self._convert_owner(user_id)
            except ValueError:
                # Not a value of the owner column ("bob" for an integer one): this user owns no
                # session, whatever the id, so refusing without a query tells nothing.
                logger.warning(
                    "no %s: the connecting user's id cannot be a value of the owner column "
                    "session_id=%s path=%r",
                    what,
                    ctx.session_id,
                    _path(ctx),
                )
                return None
        return parameters, user_id

    def _is_refused(
        self, ctx: SessionContext, user_id: str | None, owner: object, what: str
    ) -> bool:
        """Whether the owner check refuses the session: ``user_id`` is ``None`` when unchecked.

        The comparison as strings decides. When it accepts, the statement's own comparison
        (``owner = :user``, which joined the interactions) accepted too: the user id was
        converted to the owner column's type, and for such types equal strings are equal
        values (see :func:`_owner_converter`).
        """
        if user_id is None or (owner is not None and str(owner) == user_id):
            return False
        logger.warning(
            "no %s: session owner does not match the connecting user session_id=%s path=%r",
            what,
            ctx.session_id,
            _path(ctx),
        )
        return True

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
    sessionmaker: AsyncEngine | Callable[[], AsyncSession],
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
    ordered. A session whose owner is not the connecting user gives no snapshot (logged as a
    warning with the session id and path), so guessing another user's session id reveals
    nothing. The owner is compared in the statement's join, so no interaction of another
    user's session is read: such a load costs what a missing session's does.

    Without ``serialize``, the statement selects plain columns and the snapshot's dicts are
    built straight from the rows, without mapped objects (session events and loader criteria
    such as ``with_loader_criteria`` do not apply to it). A mapping that cannot be read column
    by column (inheritance, a ``column_property`` expression, a self-referential relationship)
    is loaded as mapped objects instead, with the same output.

    Args:
        sessionmaker: Where to read: an ``AsyncEngine`` (a pooled connection per load, the
            fastest), or an ``async_sessionmaker`` or any callable returning a new
            ``AsyncSession`` (a session per load, whose binds choose the connection).
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
            from the loaded mapped object (its interactions loaded, in order); only the owner's
            sessions reach it. Default: the row's columns (as :func:`column_values` gives them)
            plus a list of each interaction's columns under the relationship's name, built from
            the rows without mapped objects. It runs while the session is open but must not
            lazy-load: SQLAlchemy's asyncio extension raises on lazy loads.
        order_by: How interactions are ordered: a column attribute, an expression such as
            ``Interaction.position.desc()``, or a sequence of them. Default the relationship's
            own ``order_by``, else the interactions' primary key.

    Returns:
        The loader, with a ``version_loader`` method that reads only the version.

    Raises:
        TypeError: ``model`` is not mapped, ``sessionmaker`` is neither an ``AsyncEngine`` nor
            callable, or ``user_id`` or ``serialize`` is not callable.
        ValueError: An attribute is not one of ``model`` of the expected kind, or the model has
            a composite primary key and no ``id_column``.
    """
    if not isinstance(sessionmaker, AsyncEngine) and not callable(sessionmaker):
        raise TypeError(
            f"sessionmaker must be an AsyncEngine or an async_sessionmaker: got {sessionmaker!r}"
        )
    if not callable(user_id):
        raise TypeError(f"user_id must be callable: got {user_id!r}")
    if serialize is not None and not callable(serialize):
        raise TypeError(f"serialize must be callable or None: got {serialize!r}")
    mapper = inspect(model, raiseerr=False)
    if not isinstance(mapper, Mapper):
        raise TypeError(f"model must be a mapped class, such as a DeclarativeBase: got {model!r}")
    # Resolves relationships given by name ("Interaction.position") before they are inspected.
    configure_mappers()
    name = model.__name__
    relationship = _relationship(interactions, mapper, name)
    owner_column = _column_property(owner, mapper, "owner", name).columns[0]
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

    convert_owner = _owner_converter(owner_column.type) if check_owner else None
    query = _Query(
        mapper=mapper,
        relationship=relationship,
        interactions=interactions,
        owner=owner,
        version=version,
        id_column=id_column,
        ordering=ordering,
        owner_in_sql=convert_owner is not None,
    )
    read = None if serialize is not None else query.columns()
    return SQLAlchemyLoader(
        bind=sessionmaker,
        mapper=mapper,
        read=read or query.objects(),
        version_read=_Read(
            select(version, owner).where(id_column == bindparam(_ID_PARAM)), owner=1, version=0
        ),
        convert_id=_id_converter(id_type),
        convert_owner=convert_owner,
        version_name=f"{name}.{version_key}",
        user_id=user_id,
        check_owner=check_owner,
        serialize=serialize or _default_serializer(interactions.key),
    )


@dataclass(frozen=True)
class _Query:
    """What every snapshot statement of one loader shares, and the two ways to read a session."""

    mapper: Mapper[Any]
    relationship: RelationshipProperty[Any]
    interactions: QueryableAttribute[Any]
    owner: QueryableAttribute[Any]
    version: QueryableAttribute[Any]
    id_column: QueryableAttribute[Any]
    ordering: tuple[OrderBy, ...]
    owner_in_sql: bool
    """Whether the owner is compared in the statement: see :func:`_owner_converter`."""

    def objects(self) -> _Read:
        """Mapped objects, for ``serialize``: the model, then its owner and version columns."""
        statement = select(self.mapper, self.owner, self.version)
        tables = self._tables()
        if tables is not None:
            statement = statement.select_from(tables)
        else:
            # A mapping only the ORM can join (inheritance, a self-referential relationship):
            # the owner check in its join all the same, though the database may then read
            # another user's interactions before it drops them.
            owns = self._owns(self.owner)
            statement = statement.outerjoin(
                self.interactions if owns is None else self.interactions.and_(owns)
            )
        # contains_eager over an explicit outer join, rather than joinedload: one statement all
        # the same, and the ORDER BY names the joined table itself, so order_by can be any
        # expression.
        statement = (
            statement.options(contains_eager(self.interactions))
            .where(self.id_column == bindparam(_ID_PARAM))
            .order_by(*self.ordering)
        )
        return _Read(statement, owner=1, version=2)

    def columns(self) -> _Read | None:
        """Plain columns, rows straight into dicts; ``None`` when the mapping needs the ORM.

        A Core statement over the tables: an ORM join costs more per execution, even for plain
        columns. A row holds the interaction's columns first, then the session's, then the
        owner and version columns when they are not among the session's (deferred).
        """
        target = self.relationship.mapper
        tables = self._tables()
        session_columns = _plain_columns(self.mapper)
        interaction_columns = _plain_columns(target)
        if tables is None or session_columns is None or interaction_columns is None:
            return None
        selected: list[ColumnElement[Any]] = [c for _, c in interaction_columns]
        joined = _position(selected, target.primary_key[0])
        if joined is None:
            return None
        selected += [c for _, c in session_columns]
        positions = []
        for attribute in (self.owner, self.version):
            column = attribute.property.columns[0]
            position = _position(selected, column)
            if position is None:
                position = len(selected)
                selected.append(column)
            positions.append(position)
        id_column = self.id_column.property.columns[0]
        statement = (
            select(*selected)
            .select_from(tables)
            .where(id_column == bindparam(_ID_PARAM))
            .order_by(*self.ordering)
        )
        return _Read(
            statement,
            owner=positions[0],
            version=positions[1],
            content=_content(
                [key for key, _ in session_columns],
                len(interaction_columns),
                [key for key, _ in interaction_columns],
                self.relationship.key,
                joined,
            ),
        )

    def _tables(self) -> FromClause | None:
        """The session's table outer-joined with the interactions', gated by the owner check.

        ``None`` unless both are plain tables (no inheritance, no self-referential or aliased
        relationship). The session's columns in the join condition become ``CASE WHEN owner =
        :user THEN column END``: for another user the interactions are looked up by ``NULL``,
        which finds none in the index, so the database reads no interaction at all (a plain
        ``AND owner = :user`` in the join is checked per interaction row read). The plain
        condition stays too, so the join means what the relationship says whatever its
        condition holds.
        """
        relationship, parent = self.relationship, self.mapper.local_table
        target = relationship.mapper
        if (
            _plain_columns(self.mapper) is None
            or _plain_columns(target) is None
            or relationship.entity.is_aliased_class
            or target.local_table is parent
            or not isinstance(parent, Table)
        ):
            return None
        on = relationship.primaryjoin
        owns = self._owns(self.owner.property.columns[0])
        if owns is not None:

            def gate(element: Any, **kw: Any) -> Any:
                if isinstance(element, Column) and element.table is parent:
                    return case((owns, element))
                return None

            on = and_(replacement_traverse(on, {}, gate), owns)
        if relationship.secondary is None:
            return parent.outerjoin(target.local_table, on)
        return parent.outerjoin(relationship.secondary, on).outerjoin(
            target.local_table, relationship.secondaryjoin
        )

    def _owns(
        self, owner: ColumnElement[Any] | QueryableAttribute[Any]
    ) -> ColumnElement[bool] | None:
        if not self.owner_in_sql:
            return None
        # An integer user id is bound as 64 bits whatever the column's width: see
        # _owner_converter.
        integer = isinstance(self.owner.property.columns[0].type, Integer)
        return owner == bindparam(_OWNER_PARAM, type_=BigInteger() if integer else None)


def _plain_columns(mapper: Mapper[Any]) -> list[tuple[str, Column[Any]]] | None:
    """The columns a load of ``mapper`` reads, by attribute key, when each is one table column.

    ``None`` when only the ORM can read the mapping: inheritance, a class mapped to something
    other than a table, a ``column_property`` of an expression or of several columns. Deferred
    columns are left out, as a load leaves them unloaded.
    """
    table = mapper.local_table
    if mapper.inherits is not None or mapper.polymorphic_on is not None:
        return None
    if not isinstance(table, Table):
        return None
    columns: list[tuple[str, Column[Any]]] = []
    for prop in mapper.column_attrs:
        if prop.deferred:
            continue
        column = prop.columns[0]
        if len(prop.columns) != 1 or not isinstance(column, Column) or column.table is not table:
            return None
        columns.append((prop.key, column))
    return columns


def _position(columns: Sequence[ColumnElement[Any]], column: ColumnElement[Any]) -> int | None:
    # By identity: == on columns builds an SQL expression.
    return next((i for i, c in enumerate(columns) if c is column), None)


def _content(
    session_keys: Sequence[str],
    session_start: int,
    interaction_keys: Sequence[str],
    key: str,
    joined: int,
) -> Callable[[Sequence[Any]], dict[str, Any]]:
    """``rows -> session``: the first row's session columns, and a dict per interaction.

    The dicts are built by a dict display compiled here for these keys
    (``{'id': row[0], 'role': row[1], ...}``): twice as fast per row as
    ``dict(zip(keys, row))``, and the rows are most of a large session's load. The source holds
    only the keys' ``repr`` (string literals) and integer positions.
    """
    session_row = _compiled(f"lambda row: {_dict_display(session_keys, session_start)}")
    interaction_rows = _compiled(
        f"lambda rows: [{_dict_display(interaction_keys, 0)} for row in rows]"
    )

    def content(rows: Sequence[Any]) -> dict[str, Any]:
        first = rows[0]
        session: dict[str, Any] = session_row(first)
        # An outer join that matched nothing leaves the interaction's primary key NULL.
        session[key] = [] if first[joined] is None else interaction_rows(rows)
        return session

    return content


def _dict_display(keys: Sequence[str], start: int) -> str:
    return "{" + ", ".join(f"{key!r}: row[{start + i}]" for i, key in enumerate(keys)) + "}"


def _compiled(source: str) -> Callable[[Any], Any]:
    return cast(Callable[[Any], Any], eval(source, {"__builtins__": {}}))


def _owner_converter(owner_type: TypeEngine[Any]) -> Callable[[str], object] | None:
    """How a user id becomes a value of the owner column, to compare in SQL; ValueError if none.

    Only for types where a user id equal to the loaded owner as a string is an equal value to
    the database too, so the statement never leaves out the interactions of a session the
    loader then accepts: a string (not ``CHAR``, whose padding PostgreSQL ignores when it
    compares, nor ``Enum``), an integer (any in 64 bits, as SQLite stores them whatever the
    declared width; bound as ``BIGINT``), a UUID. ``None`` for any other type: the owner is then
    compared only once the session is loaded.
    """
    if isinstance(owner_type, Integer):
        return _integer_converter(64, "owner")
    if isinstance(owner_type, Uuid):
        return _id_converter(owner_type)
    if isinstance(owner_type, String) and not isinstance(owner_type, CHAR | NCHAR | Enum):
        return str
    return None


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
        return _integer_converter(bits, "id")
    if isinstance(id_type, Uuid):
        as_uuid = id_type.as_uuid

        def to_uuid(session_id: str) -> object:
            parsed = uuid.UUID(session_id)
            return parsed if as_uuid else str(parsed)

        return to_uuid
    return str


def _integer_converter(bits: int, column: str) -> Callable[[str], int]:
    limit = 1 << (bits - 1)

    # Refused here rather than by the database: PostgreSQL raises on an out-of-range
    # parameter, and a client must not be able to turn a bad id into a logged traceback.
    def to_integer(text: str) -> int:
        if not _DECIMAL_INTEGER.fullmatch(text):
            raise ValueError("not a decimal integer")
        number = int(text)
        if not -limit <= number < limit:
            raise ValueError(f"out of the {bits}-bit range of the {column} column")
        return number

    return to_integer


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
