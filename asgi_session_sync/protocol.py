"""The wire protocol: the events a client receives, their versions, and how a frame is read.

Every reader and writer of frames uses this module: the middleware's snapshot, the ordering
cursor (:mod:`asgi_session_sync.cursor`), the hub that fans out live updates, and, mirrored
from the shared test vectors in ``tests/vectors/``, the browser client. The rules that order
frames are stated once, in ``docs/concepts.md``.

**Events.** Text frames holding one JSON object (RFC 8259) with a ``type``::

    {"type": "session_update", "session_id": "a1", "owner": "alice", "session": {...},
     "version": 7, "reset": true}
    {"type": "session_patch", "session_id": "a1", "base_version": 7, "version": 8,
     "patch": [{"op": "replace", "path": "/title", "value": "Hi"}]}
    {"type": "session_synced", "session_id": "a1", "version": 8}
    {"type": "heartbeat"}

**Operations.** A patch holds RFC 6902 operations (``add``, ``remove``, ``replace``, ``move``,
``copy``, ``test``), and one extension for text that grows, such as an answer streamed token
by token, so that each piece costs its own bytes at any length of the text::

    {"op": "append", "path": "/interactions/3/response", "offset": 120, "value": " world"}

``append`` adds ``value`` (a string) to the end of the string at ``path`` (an RFC 6901 JSON
Pointer). ``offset`` is that string's length *before* the append, counted in UTF-16 code units
as JavaScript's ``string.length`` counts (:func:`utf16_length`; Python's ``len`` counts code
points: ``"😀"`` is 1 to Python and 2 here). Like a built-in ``test``, the operation fails when
the value at ``path`` is not a string of exactly ``offset`` units, and then the whole patch fails
and the state before it is kept (RFC 6902 section 5). :func:`apply_patch` applies both kinds.

A connection's first ``session_update`` is the database's truth: the client replaces what
it had with it. ``reset`` marks the same truth later on a live socket (a resync): it replaces
whatever the client had, even at a lower version. Only the server sends it; a live frame that
carries it is refused.

**Versions.** A version is a JSON number whose value is a whole number from 0 to
:data:`MAX_VERSION` (``2**53 - 1``, the largest integer JavaScript represents exactly), such
as a per-session counter or a row version. ``7``, ``7.0`` and ``7e0`` are the same version,
as they are to ``JSON.parse``. Anything else is not a version: strings (even of digits),
booleans, negative numbers, fractions, numbers beyond :data:`MAX_VERSION`. Timestamps are the
loader's business: the SQLAlchemy loader turns a timestamp column into microseconds since the
Unix epoch, which fit until the year 2255.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Literal

import jsonpatch
import jsonpointer
from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from pydantic_core import from_json, to_json, to_jsonable_python

__all__ = [
    "HEARTBEAT",
    "MAX_VERSION",
    "SSE_HEARTBEAT",
    "AnswerStatus",
    "Append",
    "Frame",
    "Kind",
    "SessionPatch",
    "SessionSynced",
    "SessionUpdate",
    "Version",
    "apply_patch",
    "as_version",
    "make_patch",
    "parse_frame",
    "patch_problem",
    "session_update_json",
    "sse_event",
    "utf16_length",
    "version_from_text",
]

Version = int
"""A session version: a whole number from 0 to :data:`MAX_VERSION`."""

MAX_VERSION = 2**53 - 1
"""The largest version, ``2**53 - 1``: the largest integer a JSON number carries exactly to
JavaScript (``Number.MAX_SAFE_INTEGER``)."""

HEARTBEAT = '{"type":"heartbeat"}'
"""The heartbeat frame, for clients that tell a dead socket from a quiet session."""


class AnswerStatus(str, enum.Enum):
    """Where a streamed answer is, as its snapshot and its patches carry it.

    :class:`~asgi_session_sync.streaming.AnswerStream` writes it at the JSON Pointer the app
    chooses (``status_path``); the values are the JSON strings below.
    """

    STREAMING = "streaming"
    """Its producer is appending text."""
    COMPLETE = "complete"
    """It ended normally: the text is whole."""
    CANCELLED = "cancelled"
    """A user stopped it (``NatsBridge.stop_answer``): the text is what came before."""
    INTERRUPTED = "interrupted"
    """Its producer failed or died (the app's lease ran out): the text is what was saved."""


def utf16_length(text: str) -> int:
    """The length of ``text`` in UTF-16 code units: JavaScript's ``string.length``.

    What an ``append`` operation's ``offset`` counts. Each character outside the Basic
    Multilingual Plane (most emoji) counts 2, every other character 1.
    """
    if text.isascii():
        return len(text)
    # surrogatepass: a lone surrogate (JSON can carry one, "\ud800") is one unit, as in JS.
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def as_version(value: object) -> Version | None:
    """Return ``value`` as a version, or ``None`` when it is not one.

    ``value`` is a decoded JSON value: an ``int``, or a ``float`` with a whole value (``7.0``
    is ``7``), from 0 to :data:`MAX_VERSION`. ``bool`` and ``str`` are never versions.
    """
    if type(value) is int:
        return value if 0 <= value <= MAX_VERSION else None
    if type(value) is float and value.is_integer() and 0 <= value <= MAX_VERSION:
        return int(value)
    return None


def _check_version(value: object) -> Version:
    version = as_version(value)
    if version is None:
        raise ValueError(
            f"a version is a whole number from 0 to {MAX_VERSION} (2**53 - 1): got {value!r}"
        )
    return version


# --------------------------------------------------------------------------------------------
# Writing: the events as pydantic models
# --------------------------------------------------------------------------------------------


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str
    session_id: str
    version: Version | None = None

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: object) -> Version | None:
        return None if value is None else _check_version(value)

    _optional: ClassVar[tuple[str, ...]] = ("version", "reset")

    def to_json(self) -> bytes:
        """Serialise to UTF-8 JSON bytes, leaving out the optional members that are unset.

        ``version`` and ``reset`` when ``None``, and a patch's ``owner``; a full state always
        carries ``owner`` (``null`` when the loader did not say).
        """
        exclude = {name for name in self._optional if getattr(self, name, None) is None}
        return self.model_dump_json(exclude=exclude).encode()


class SessionUpdate(_Event):
    """The full current state of one session.

    Sent by the middleware as a connection's first frame, again with ``reset=True`` to
    resync a live socket, and by publishers for live updates. ``session`` is whatever the
    loader returned (a mapping or a pydantic model), serialised as JSON; ``owner`` is ``None``
    when the loader did not say.

    Raises:
        pydantic.ValidationError: ``version`` is not a version (see :func:`as_version`).
    """

    type: Literal["session_update"] = "session_update"
    owner: str | None = None
    session: Any
    reset: Literal[True] | None = None
    """``True`` on a snapshot loaded from the database: the client replaces its state."""


def session_update_json(
    session_id: str, session: Any, *, owner: str | None = None, version: Version | None = None
) -> bytes:
    """The bytes of ``SessionUpdate(...).to_json()``, without building the model.

    For the snapshot on every connection, where the model's construction is most of the
    encoding's cost. ``session`` is serialised as pydantic serialises an ``Any`` field (models,
    datetimes; NaN and infinities as ``null``).

    Raises:
        ValueError: ``version`` is not a version.
        pydantic_core.PydanticSerializationError: ``session`` holds a value JSON cannot carry.
    """
    event: dict[str, Any] = {"type": "session_update", "session_id": session_id}
    if version is not None:
        event["version"] = _check_version(version)
    event["owner"] = owner
    event["session"] = session
    return to_json(event, inf_nan_mode="null")


class SessionSynced(_Event):
    """Tells a resuming client that the version it already has is current.

    Sent instead of a :class:`SessionUpdate` when the client's ``since`` equals the current
    version and the middleware is configured to say so, so a client can tell "up to date"
    from "nothing sent".
    """

    type: Literal["session_synced"] = "session_synced"


class SessionPatch(_Event):
    """A change to one session: an RFC 6902 JSON Patch from ``base_version`` to ``version``.

    ```json
    {"type": "session_patch", "session_id": "s1", "base_version": 7, "version": 8,
     "patch": [{"op": "replace", "path": "/interactions/3/response", "value": "Hel"}]}
    ```

    Applying ``patch`` (RFC 6902 operations, whose paths are RFC 6901 JSON Pointers) to the
    session's JSON state at ``base_version`` gives its state at ``version``. A client applies
    a patch only when ``base_version`` is the version it has (``docs/concepts.md`` has the
    whole table). Build ``patch`` with :func:`make_patch` when you have both states.

    Raises:
        pydantic.ValidationError: ``patch`` is not a list of RFC 6902 operations (each an
            object with a known ``op``, a JSON Pointer ``path`` and the member its ``op``
            needs), a version is missing or not a version, or ``version`` is not greater
            than ``base_version``.
    """

    type: Literal["session_patch"] = "session_patch"
    owner: str | None = None
    base_version: Version
    version: Version
    patch: list[dict[str, Any]]
    covers_from: Version | None = None
    """On a producer's catch-up only: the first of its own versions the patch stands for (its
    deltas from ``covers_from`` to ``version``), so the hub drops those as already covered."""

    @field_validator("base_version", mode="before")
    @classmethod
    def _base_version(cls, value: object) -> Version:
        return _check_version(value)

    _optional: ClassVar[tuple[str, ...]] = ("version", "reset", "owner", "covers_from")

    @field_validator("covers_from", mode="before")
    @classmethod
    def _covers_from(cls, value: object) -> Version | None:
        return None if value is None else _check_version(value)

    @field_validator("version", mode="before")
    @classmethod
    def _patch_version(cls, value: object) -> Version:
        return _check_version(value)

    @model_validator(mode="after")
    def _forward(self) -> SessionPatch:
        # After both are read: the base class declares version before base_version.
        assert self.version is not None
        if self.version <= self.base_version:
            raise ValueError(
                f"version must be greater than base_version={self.base_version}: got {self.version}"
            )
        return self

    @field_validator("patch")
    @classmethod
    def _check_patch(cls, patch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        problem = patch_problem(patch)
        if problem is not None:
            raise ValueError(problem)
        return patch


_OPERAND = {
    "add": "value",
    "replace": "value",
    "test": "value",
    "move": "from",
    "copy": "from",
    "append": "value",
}


class _AppendOperation(jsonpatch.PatchOperation):
    """``append``: the one operation beyond RFC 6902 (see the module's docstring)."""

    def _apply(self, obj: Any, journal: Any) -> Any:
        problem = _append_problem(self.operation)
        if problem is not None:
            raise jsonpatch.InvalidJsonPatch(problem, op=self)
        value, offset = self.operation["value"], as_version(self.operation["offset"])
        parent, part = self.pointer.to_last(obj)
        if part is None:
            current = obj
        else:
            try:
                current = parent[part]
            except (KeyError, IndexError, TypeError):
                raise jsonpatch.JsonPatchConflict(
                    f"no string at {self.location!r} to append to", op=self
                ) from None
        if not isinstance(current, str):
            raise jsonpatch.JsonPatchConflict(
                f"the value at {self.location!r} is not a string", op=self
            )
        length = utf16_length(current)
        if length != offset:
            raise jsonpatch.JsonPatchTestFailed(
                f"the string at {self.location!r} is {length} UTF-16 units long, not {offset}",
                op=self,
            )
        if part is None:
            return current + value
        journal.setitem(parent, part, current + value)
        return obj


class _Patch(jsonpatch.JsonPatch):
    operations = MappingProxyType({**jsonpatch.JsonPatch.operations, "append": _AppendOperation})


def _append_problem(operation: dict[str, Any]) -> str | None:
    """Why an ``append`` operation is malformed (its members), or ``None``."""
    if not isinstance(operation.get("value"), str):
        return "an append's 'value' is not a string"
    if as_version(operation.get("offset")) is None:
        return "an append's 'offset' is not a whole number of UTF-16 units"
    return None


def apply_patch(document: Any, patch: list[dict[str, Any]]) -> Any:
    """Apply ``patch`` (RFC 6902 operations and ``append``) to ``document``; return the result.

    ``document`` is a decoded JSON value and is never changed: the patch applies to a copy,
    whole or not at all. For tests and Python consumers of the frames; the browser client has
    its own.

    Raises:
        ValueError: The patch is malformed, or an operation fails (a missing member, a failed
            ``test``, an ``append`` whose ``offset`` is not the string's length).
    """
    try:
        return _Patch(patch).apply(document)
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, TypeError) as exc:
        raise ValueError(f"the patch does not apply: {exc}") from exc


def patch_problem(patch: object) -> str | None:
    """Why ``patch`` is not a list of operations every client can apply, or ``None``.

    The operations are RFC 6902's and ``append`` (see the module's docstring).
    """
    if not isinstance(patch, list):
        return "the patch is not a list of operations"
    try:
        _Patch(patch)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError) as exc:
        return f"not an RFC 6902 patch: {exc}"
    # jsonpatch checks op and path here, the rest only when applying: check what every client
    # needs (RFC 6902 section 4) before the patch is sent to them all.
    for index, operation in enumerate(patch):
        member = _OPERAND.get(operation["op"])
        if member == "value" and "value" not in operation:
            return f"operation {index} ({operation['op']}) has no 'value'"
        if member == "from" and not _is_pointer(operation.get("from")):
            return f"operation {index} ({operation['op']}) has no JSON Pointer 'from'"
        if operation["op"] == "append":
            problem = _append_problem(operation)
            if problem is not None:
                return f"operation {index}: {problem}"
    try:
        json.dumps(patch, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return f"the patch is not JSON (RFC 8259): {exc}"
    return None


def _is_pointer(value: object) -> bool:
    """Whether ``value`` is an RFC 6901 JSON Pointer: ``""`` or a string starting with ``/``."""
    return isinstance(value, str) and (value == "" or value.startswith("/"))


def make_patch(old: Any, new: Any) -> list[dict[str, Any]]:
    """Return the RFC 6902 operations that turn the state ``old`` into ``new``.

    For publishers that hold both states. Both are first turned into the JSON a client
    receives (pydantic models, datetimes and the like as pydantic serialises them), so the
    patch applies to exactly what the client has. Computed by ``jsonpatch.make_patch``
    (python-json-patch): an empty list when nothing changed.

    ```python
    patch = make_patch(before, after)
    await bridge.publish_patch("s1", patch, base_version=7, version=8)
    ```

    Raises:
        pydantic_core.PydanticSerializationError: A state holds a value JSON cannot carry.
    """
    operations: list[dict[str, Any]] = jsonpatch.make_patch(
        to_jsonable_python(old), to_jsonable_python(new)
    ).patch
    return operations


# --------------------------------------------------------------------------------------------
# Reading: a frame parsed once
# --------------------------------------------------------------------------------------------


class Kind(enum.Enum):
    """What a frame is, for ordering."""

    UPDATE = "session_update"
    """A full state: applies when newer than what the client has (or always, with reset)."""
    PATCH = "session_patch"
    """A delta from ``base_version`` to ``version``: applies only at ``base_version``."""
    SYNCED = "session_synced"
    """The client's version is current."""
    OTHER = "other"
    """Anything else (heartbeats, the app's own events): never ordered, always passes."""


_KINDS = {kind.value: kind for kind in Kind}


@dataclass(frozen=True, slots=True)
class Append:
    """One ``append`` operation of a patch, as the hub checks it.

    Attributes:
        path: The JSON Pointer of the string.
        offset: The string's length before, in UTF-16 code units.
        length: The appended text's length, in UTF-16 code units.
    """

    path: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Frame:
    """One text frame, parsed once: what ordering and routing need, and the text to send.

    Attributes:
        text: The JSON text sent to clients, unchanged.
        kind: What the frame is.
        session_id: Its ``session_id`` member, if a string.
        owner: Its ``owner`` member, if a string.
        version: Its version; ``None`` when it has none.
        base_version: A patch's base version; ``None`` for other kinds.
        reset: Whether it is a snapshot that replaces the client's state.
        size: Bytes of its UTF-8 JSON: what byte bounds on queues count.
        appends: A patch's ``append`` operations, in order.
        touched: The paths (and ``from`` pointers) of a patch's other operations.
        covers_from: A producer's catch-up: the first of the versions it stands for.
    """

    text: str
    kind: Kind
    session_id: str | None = None
    owner: str | None = None
    version: Version | None = None
    base_version: Version | None = None
    reset: bool = False
    size: int = 0
    appends: tuple[Append, ...] = ()
    touched: tuple[str, ...] = ()
    covers_from: Version | None = None


def parse_frame(text: str, *, size: int | None = None) -> Frame | str:
    """Parse ``text`` into a :class:`Frame`, or return why it is not a valid frame.

    A frame is a JSON object. A ``session_update`` or ``session_synced`` must have a version
    or none (``session_synced`` must have one); a ``session_patch`` must have a
    ``base_version``, a greater ``version`` and a list of operations. Other types pass as
    :attr:`Kind.OTHER`. ``size`` is the frame's size in bytes of UTF-8, when the caller has
    it (a broker message's length); otherwise it is computed.
    """
    try:
        # RFC 8259 JSON only: NaN and Infinity would make JSON.parse throw in the browser.
        event = from_json(text, cache_strings=False, allow_inf_nan=False)
    except ValueError:
        return "not JSON"
    if not isinstance(event, dict):
        return "not a JSON object"
    if size is None:
        size = len(text) if text.isascii() else len(text.encode())
    event_type = event.get("type")
    kind = _KINDS.get(event_type, Kind.OTHER) if isinstance(event_type, str) else Kind.OTHER
    session_id, owner = event.get("session_id"), event.get("owner")
    if kind is Kind.OTHER:
        return Frame(
            text,
            kind,
            session_id if isinstance(session_id, str) else None,
            owner if isinstance(owner, str) else None,
            size=size,
        )
    raw_version = event.get("version")
    version = as_version(raw_version)
    if raw_version is not None and version is None:
        return "its version is not a whole number from 0 to 2**53 - 1"
    base_version = None
    appends: tuple[Append, ...] = ()
    touched: tuple[str, ...] = ()
    if kind is Kind.PATCH:
        base_version = as_version(event.get("base_version"))
        if base_version is None or version is None:
            return "a patch without a base_version and a version"
        if version <= base_version:
            return "a patch whose version is not greater than its base_version"
        operations = event.get("patch")
        if not isinstance(operations, list):
            return "a patch whose operations are not a list"
        read = _read_operations(operations)
        if isinstance(read, str):
            return read
        appends, touched = read
    elif kind is Kind.SYNCED and version is None:
        return "a session_synced without a version"
    return Frame(
        text,
        kind,
        session_id if isinstance(session_id, str) else None,
        owner if isinstance(owner, str) else None,
        version,
        base_version,
        event.get("reset") is True,
        size,
        appends,
        touched,
        as_version(event.get("covers_from")) if kind is Kind.PATCH else None,
    )


def _read_operations(operations: list[Any]) -> tuple[tuple[Append, ...], tuple[str, ...]] | str:
    """A patch's appends and the paths its other operations touch, or why it is malformed.

    Only the members routing needs: each client checks the rest when it applies the patch.
    """
    appends: list[Append] = []
    touched: list[str] = []
    for operation in operations:
        if not isinstance(operation, dict) or not isinstance(operation.get("path"), str):
            return "a patch with an operation that is not an object with a path"
        if operation.get("op") == "append":
            problem = _append_problem(operation)
            if problem is not None:
                return problem
            appends.append(
                Append(
                    operation["path"],
                    int(operation["offset"]),
                    utf16_length(operation["value"]),
                )
            )
        else:
            touched.append(operation["path"])
            origin = operation.get("from")
            if isinstance(origin, str):
                touched.append(origin)
    return tuple(appends), tuple(touched)


# --------------------------------------------------------------------------------------------
# Server-Sent Events
# --------------------------------------------------------------------------------------------

SSE_HEARTBEAT = b": heartbeat\n\n"
"""A comment line of an event stream: keeps proxies from closing a quiet stream, and is no event
to the browser's ``EventSource``."""

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def sse_event(frame: Frame) -> bytes:
    """``frame`` as one Server-Sent Event (HTML Living Standard, "Server-sent events" 9.2.6).

    ``event:`` the frame's type (a session event's ``type``; the default ``message`` for other
    frames), ``id:`` its version when it has one, so the browser's ``EventSource`` sends it back
    as ``Last-Event-ID`` when it reconnects, and ``data:`` its JSON, a line per line of it::

        event: session_patch
        id: 8
        data: {"type":"session_patch","session_id":"a1","base_version":7,"version":8,...}

    A heartbeat frame becomes the comment :data:`SSE_HEARTBEAT`.
    """
    if frame.text == HEARTBEAT:
        return SSE_HEARTBEAT
    lines = []
    if frame.kind is not Kind.OTHER:
        lines.append(f"event: {frame.kind.value}")
    if frame.version is not None:
        lines.append(f"id: {frame.version}")
    text = frame.text
    if "\n" in text or "\r" in text:
        lines.extend(f"data: {line}" for line in _LINE_BREAK.split(text))
    else:  # JSON as encoders write it: one line, found in C (the split scans in Python's re)
        lines.append(f"data: {text}")
    return ("\n".join(lines) + "\n\n").encode()


_DIGITS = frozenset("0123456789")


def version_from_text(text: str) -> Version | None:
    """Parse a version written in decimal digits (a ``since`` query parameter), or ``None``.

    At most 16 digits, no sign, no spaces: ``"7"`` is 7, ``"007"`` is 7; anything else, and
    numbers beyond :data:`MAX_VERSION`, are not versions.
    """
    if not 0 < len(text) <= 16 or not _DIGITS.issuperset(text):
        return None
    return as_version(int(text))
