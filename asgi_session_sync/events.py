"""The events sent to clients, as pydantic models.

The wire format is the one of the design this library comes from::

    {"type": "session_update", "session_id": "a1", "owner": "alice", "session": {...}, "version": 7}

``version`` is left out when it is not known. Publishers (the NATS bridge, your own code) build
the same models, so a snapshot and a live update are the same event and a client applies both
with one code path. After a full state, a publisher may send deltas instead
(:class:`SessionPatch`, an RFC 6902 JSON Patch from one version to the next).

**Versions on the wire.** An int version within JavaScript's exact range, ±(2**53 - 1), is a
JSON number; a larger one is a JSON string of its decimal digits (``"18446744073709551616"``),
so a browser reads it without rounding. Any string of decimal digits (``-?[0-9]+``) is an int
version and orders as one (:mod:`asgi_session_sync.versions`); a timestamp is an ISO-8601
string. The models below write versions that way and read a digit string back as an ``int``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import jsonpatch
from pydantic import (
    BaseModel,
    ConfigDict,
    SerializerFunctionWrapHandler,
    field_serializer,
    field_validator,
)
from pydantic_core import to_jsonable_python

from .versions import Version, parse_version

__all__ = [
    "MAX_SAFE_INTEGER",
    "SessionPatch",
    "SessionSynced",
    "SessionUpdate",
    "Version",
    "make_patch",
]

MAX_SAFE_INTEGER = 2**53 - 1
"""The largest int a JSON number carries exactly to JavaScript; beyond it versions are strings."""

_WITHOUT_VERSION = {"version"}


def _int_from_digits(version: Any) -> Any:
    """A decimal-digit string as the int it is; anything else unchanged."""
    if isinstance(version, str):
        parsed = parse_version(version)
        if isinstance(parsed, int):
            return parsed
    return version


def _wire_version(version: Any, handler: SerializerFunctionWrapHandler) -> Any:
    """An int beyond JavaScript's exact range as its decimal digits; the rest as pydantic does."""
    big = isinstance(version, int) and not isinstance(version, bool)
    if big and abs(version) > MAX_SAFE_INTEGER:
        return str(version)
    return handler(version)


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    type: str
    session_id: str
    version: Version | None = None

    _read_version = field_validator("version")(_int_from_digits)
    _write_version = field_serializer("version", mode="wrap", when_used="json")(_wire_version)

    def to_json(self) -> bytes:
        """Serialise to UTF-8 JSON bytes, leaving ``version`` out when it is not known."""
        exclude = _WITHOUT_VERSION if self.version is None else None
        return self.model_dump_json(exclude=exclude).encode()


class SessionUpdate(_Event):
    """The full current state of one session.

    Sent by the middleware as the first frame of a WebSocket, and by publishers for live
    updates. ``session`` is whatever the loader returned (a mapping or a pydantic model),
    serialised as JSON; ``owner`` is ``None`` when the loader did not say.
    """

    type: str = "session_update"
    owner: str | None = None
    session: Any


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
    a patch only when ``base_version`` is the version it has; see
    :func:`~asgi_session_sync.versions.classify_patch` for the other cases. Build ``patch``
    with :func:`make_patch` when you have both states.

    Raises:
        pydantic.ValidationError: ``patch`` is not a list of RFC 6902 operations (each an
            object with a known ``op`` and a JSON Pointer ``path``), or a version is missing.
    """

    type: Literal["session_patch"] = "session_patch"
    base_version: Version
    version: Version
    patch: list[dict[str, Any]]

    _read_base_version = field_validator("base_version")(_int_from_digits)
    _write_base_version = field_serializer("base_version", mode="wrap", when_used="json")(
        _wire_version
    )

    @field_validator("patch")
    @classmethod
    def _check_patch(cls, patch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            jsonpatch.JsonPatch(patch)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            raise ValueError(f"not an RFC 6902 patch: {exc}") from None
        # jsonpatch checks op and path here, the rest only when applying: check what every
        # client needs (RFC 6902 section 4) before the patch is sent to them all.
        for index, operation in enumerate(patch):
            member = _OPERAND.get(operation["op"])
            if member == "value" and "value" not in operation:
                raise ValueError(f"operation {index} ({operation['op']}) has no 'value'")
            if member == "from" and not _is_pointer(operation.get("from")):
                raise ValueError(
                    f"operation {index} ({operation['op']}) has no JSON Pointer 'from'"
                )
        try:
            json.dumps(patch, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the patch is not JSON (RFC 8259): {exc}") from None
        return patch


_OPERAND = {"add": "value", "replace": "value", "test": "value", "move": "from", "copy": "from"}


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
