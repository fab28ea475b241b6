"""Streaming one answer (an LLM's, token by token) into a session, at the cost of its new text.

An :class:`AnswerStream` is the producer's side of one answer: the app appends each token, and
the stream

* **publishes deltas, not the text so far**: appends made within ``publish_interval`` go out as
  one ``session_patch`` holding one ``append`` operation (see :mod:`asgi_session_sync.protocol`),
  so a token costs its own bytes plus a small constant, at any length of the answer;
* **checkpoints to the app's database** through the app's ``checkpoint`` callback, at most once
  per ``checkpoint_interval`` and once at the end (committed before the final publish), so the
  database sees a few writes a second per answer, not one per token;
* **carries the answer's status** (:class:`~asgi_session_sync.protocol.AnswerStatus`) at the
  app's ``status_path``: complete when the block ends, cancelled when a user stopped it
  (:meth:`~asgi_session_sync.nats.NatsBridge.stop_answer`), interrupted when the block raised
  or was cancelled. A producer that dies says nothing: the app's lease marks the answer
  interrupted, as it would without this module;
* **fills the gap of a socket that is behind**: a snapshot from the database can be up to one
  checkpoint behind the stream. The hub of the API process that serves the socket asks the
  producer (a NATS request) for a patch from the snapshot's version, and chains the live
  deltas after it: the socket is current within one round trip, with no second database load.

```python
async def save(checkpoint: Checkpoint) -> int:
    async with engine.begin() as db:  # compare-and-set on the session's version
        moved = await db.scalar(
            update(sessions).where(sessions.c.id == checkpoint.session_id,
                                   sessions.c.version == checkpoint.base_version)
            .values(version=checkpoint.version).returning(sessions.c.version))
        if moved is None:  # someone else committed: write nothing, say where the session is
            return await db.scalar(select(sessions.c.version).where(...))
        await db.execute(update(answers).where(...).values(
            text=checkpoint.text, status=checkpoint.status.value))
        return moved

async with AnswerStream(bridge, session_id, text_path="/answers/3/text",
                        status_path="/answers/3/status", version=version,
                        checkpoint=save) as answer:
    async for token in llm.stream(prompt):
        answer.append(token)
```

**Versions.** The stream gives each delta a version, chained from the last one, and each
checkpoint commits the version of the deltas it contains, so a snapshot and the deltas after it
chain without a gap. After each commit, the stream's next delta skips :data:`VERSION_SKIP`
versions: the app's other writers of the session (a new prompt, a lease sweeper) keep committing
``version + 1`` and never take a version a delta has used. When one of them commits meanwhile,
the stream's next checkpoint finds the session moved (the compare-and-set fails), commits its
text on top of that version, and publishes the text since its last checkpoint as one patch, so
every socket converges. One answer streams into a session at a time.
"""

from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol

import anyio

from .protocol import AnswerStatus, SessionPatch, Version, as_version, utf16_length

__all__ = ["VERSION_SKIP", "AnswerStream", "AnswerTransport", "Checkpoint", "CheckpointWriter"]

logger = logging.getLogger("asgi_session_sync")

VERSION_SKIP = 1000
"""Versions a stream leaves free after each commit, for the app's other writers of the session:
the first delta after a commit at version ``v`` is ``v + 1000``."""

_FINISH_TIMEOUT = 10.0
"""Seconds the final checkpoint and publish may take once the block has ended."""
_STEP_TIMEOUT = 1.0
"""Seconds one publish or one checkpoint may take while the answer streams, at least (four
checkpoint intervals when longer): a commit that hangs (a row lock, an exhausted pool) is
abandoned and tried again later, so a stop or a cancellation always ends the block."""
_REBASE_ATTEMPTS = 3
"""Compare-and-set attempts in one checkpoint before it waits for the next interval."""
_FINAL_RETRY_DELAYS = (0.25, 1.0, 2.0, 0.0)
"""Seconds before each retry of a failed final checkpoint (the last entry ends the list)."""
_MAX_DELTA_CHARS = 64 * 1024
"""Characters of text in one delta, at most (at most 256 KiB of UTF-8): a larger burst of
appends goes out as several deltas, each under NATS's default ``max_payload`` of 1 MiB."""
_MAX_CATCH_UP_BYTES = 900 * 1024
"""Bytes of JSON a catch-up reply may hold, at most (under NATS's default ``max_payload`` of
1 MiB); a socket further behind loads a snapshot."""
_SURROGATE = re.compile("[\ud800-\udfff]")
_KEPT_VERSIONS = 512
"""Versions of the current line a stream can answer catch-ups from, at most."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What a checkpoint asks the app to commit.

    Attributes:
        session_id: The session.
        text: The whole answer so far.
        status: The answer's status.
        version: The version to commit the session at.
        base_version: Commit only if the session's version is still this one (a
            compare-and-set on the session's version).
    """

    session_id: str
    text: str
    status: AnswerStatus
    version: Version
    base_version: Version


CheckpointWriter = Callable[[Checkpoint], Awaitable[Version]]
"""``async def save(checkpoint) -> int``: in one transaction, if the session's version is still
``checkpoint.base_version``, write ``checkpoint.text`` and ``checkpoint.status`` and set the
version to ``checkpoint.version``; return the session's version afterwards (``checkpoint.version``
when written, else the version it has, having written nothing)."""


class AnswerTransport(Protocol):
    """What a stream needs of the broker; :class:`~asgi_session_sync.nats.NatsBridge` is one."""

    async def publish_patch(
        self,
        session_id: str,
        patch: Sequence[Mapping[str, Any]],
        *,
        base_version: Version,
        version: Version,
        owner: str | None = None,
    ) -> None:
        """Publish a ``session_patch`` to the session's sockets."""
        ...

    def serve_answer(
        self,
        session_id: str,
        text_path: str,
        *,
        catch_up: Callable[[Version], bytes | None],
        stop: Callable[[], bool],
    ) -> AbstractAsyncContextManager[None]:
        """Answer catch-up and stop requests for the answer while the block runs."""
        ...


@dataclass(slots=True)
class _Point:
    """Where the answer was at one version of the stream's line."""

    pieces: int
    """How many published pieces make its text."""
    units: int
    """Its text's length in UTF-16 code units."""
    status: AnswerStatus


class AnswerStream:
    """Streams one answer into a session: coalesced deltas, periodic checkpoints, a status.

    Use it as an async context manager around the loop that produces the text. Leaving the
    block normally ends the answer ``complete``; a stop request (``NatsBridge.stop_answer``)
    cancels the block, which then exits normally with the answer ``cancelled``; an exception or
    an outside cancellation ends it ``interrupted`` and propagates. In every case the final
    text and status are committed through ``checkpoint`` first, then published.

    Args:
        bridge: An open broker (:class:`~asgi_session_sync.nats.NatsBridge`).
        session_id: The session the answer belongs to.
        text_path: The JSON Pointer (RFC 6901) of the answer's text in the session's JSON, a
            string (``""`` or ``text``) in the state at ``version``.
        status_path: The JSON Pointer of the answer's status, a member that exists in the
            state at ``version``; ``None`` when the app shows no status.
        version: The session's committed version the answer starts from: a whole number
            from 0 to ``2**53 - 1``.
        checkpoint: Commits the answer (see :data:`CheckpointWriter`).
        owner: The session's owner, sent with every patch so sockets can check it.
        text: The answer's text at ``version``, when it does not start empty.
        publish_interval: Seconds between two publishes, at least: appends made meanwhile go
            out together.
        checkpoint_interval: Seconds between two checkpoints, at least; one more comes at the
            end.

    Raises:
        ValueError: A path is not a JSON Pointer, ``version`` is not a version, or an
            interval is not a positive number of seconds.
    """

    def __init__(
        self,
        bridge: AnswerTransport,
        session_id: str,
        *,
        text_path: str,
        status_path: str | None = None,
        version: Version,
        checkpoint: CheckpointWriter,
        owner: str | None = None,
        text: str = "",
        publish_interval: float = 0.05,
        checkpoint_interval: float = 0.25,
    ) -> None:
        for name, path in (("text_path", text_path), ("status_path", status_path)):
            if path is not None and not (
                isinstance(path, str) and (path == "" or path.startswith("/"))
            ):
                raise ValueError(f"{name} must be a JSON Pointer such as '/answer': got {path!r}")
        if as_version(version) is None or isinstance(version, bool):
            raise ValueError(f"version must be a whole number from 0 to 2**53 - 1: got {version!r}")
        for name, seconds in (
            ("publish_interval", publish_interval),
            ("checkpoint_interval", checkpoint_interval),
        ):
            if not isinstance(seconds, int | float) or not seconds > 0 or math.isinf(seconds):
                raise ValueError(f"{name} must be a positive number of seconds: got {seconds!r}")
        if not callable(checkpoint):
            raise TypeError("checkpoint must be an async function (see CheckpointWriter)")
        self.session_id = session_id
        self.text_path = text_path
        self.status_path = status_path
        self.owner = owner
        self.publish_interval = float(publish_interval)
        self.checkpoint_interval = float(checkpoint_interval)
        self._step_timeout = max(_STEP_TIMEOUT, 4 * self.checkpoint_interval)
        self._bridge = bridge
        self._save = checkpoint
        self._pieces: list[str] = [text] if text else []
        self._pending: list[str] = []
        self._units = utf16_length(text)
        """UTF-16 length of the published text."""
        self.status = AnswerStatus.STREAMING
        """The answer's status, as last published."""
        self.version: Version = int(version)
        """The version of the last delta published (or committed)."""
        self._committed: Version = int(version)
        self._committed_point = _Point(len(self._pieces), self._units, self.status)
        self._line: OrderedDict[Version, _Point] = OrderedDict()
        self._line[self.version] = self._committed_point
        self._appended = anyio.Event()
        self._body = anyio.CancelScope()
        self._stack: AsyncExitStack | None = None
        self.stopped = False
        """Whether a stop request ended the answer."""
        self._ending = False
        self._carry = ""  # a high surrogate waiting for its pair (see append)
        self._line_start: Version | None = None  # the first delta after the last commit
        self.checkpoints = 0
        """Checkpoints committed (the final one included)."""
        self.publishes = 0
        """Patches published."""

    # The producer's side.

    def append(self, text: str) -> None:
        """Add ``text`` to the answer; it is published within ``publish_interval``.

        Raises:
            TypeError: ``text`` is not a ``str``.
        """
        if not isinstance(text, str):
            raise TypeError(f"append takes a str: got {type(text).__name__}")
        if self._carry:
            text, self._carry = self._carry + text, ""
        if text and not text.isascii() and _SURROGATE.search(text) is not None:
            # An LLM API may split an escaped emoji ("\ud83d" then "\ude00") across two
            # chunks: a high surrogate at the end waits for its pair, and pairs are joined;
            # one that can never pair becomes U+FFFD, as JSON encoders require.
            if "\ud800" <= text[-1] <= "\udbff":
                text, self._carry = text[:-1], text[-1]
            text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        if text:
            self._pending.append(text)
            self._appended.set()

    @property
    def text(self) -> str:
        """The whole answer so far, appends not yet published included."""
        return "".join(self._pieces) + "".join(self._pending)

    # Lifetime.

    async def __aenter__(self) -> AnswerStream:
        """Start answering catch-ups and stops, and start publishing."""
        if self._stack is not None:
            raise RuntimeError("an AnswerStream can be entered once")
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self._running())
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """End the answer: commit its final text and status, then publish them."""
        stack, self._stack = self._stack, None
        assert stack is not None
        return await stack.__aexit__(exc_type, exc, tb)

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        failure: BaseException | None = None
        async with self._bridge.serve_answer(
            self.session_id, self.text_path, catch_up=self._catch_up, stop=self._stop
        ):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._pump, name=f"answer {self.session_id}")
                try:
                    with self._body:
                        yield
                except BaseException as exc:  # re-raised below, outside the task group
                    failure = exc
                finally:
                    self._ending = True
                    tasks.cancel_scope.cancel()
            if self._carry:
                self._pending.append("\ufffd")  # its pair never came
                self._carry = ""
            if failure is not None:
                status = AnswerStatus.INTERRUPTED
            elif self.stopped:
                status = AnswerStatus.CANCELLED
            else:
                status = AnswerStatus.COMPLETE
            # Shielded and bounded: a cancelled producer still says how its answer ended.
            with anyio.CancelScope(shield=True), anyio.move_on_after(_FINISH_TIMEOUT):
                await self._finish(status)
        if failure is not None:
            raise failure

    def _stop(self) -> bool:
        if self._ending:
            return False  # too late: the answer is already ending as it will end
        if not self.stopped:
            logger.info("answer stopped on request session_id=%s", self.session_id)
        self.stopped = True
        self._body.cancel()
        return True

    # Publishing and checkpoints (one task: deltas and commits never interleave).

    async def _pump(self) -> None:
        last_publish = -math.inf
        last_checkpoint = anyio.current_time()
        while True:
            unsaved = self.version != self._committed
            wait = None
            if unsaved:
                wait = max(0.0, last_checkpoint + self.checkpoint_interval - anyio.current_time())
            with anyio.move_on_after(wait):
                await self._appended.wait()
            self._appended = anyio.Event()
            if self._pending:
                await anyio.sleep(
                    max(0.0, last_publish + self.publish_interval - anyio.current_time())
                )
                last_publish = anyio.current_time()
                with anyio.move_on_after(self._step_timeout, shield=True) as step:
                    await self._publish_pending()
                self._timed_out(step, "publish")
            now = anyio.current_time()
            if (
                self.version != self._committed
                and now >= last_checkpoint + self.checkpoint_interval
            ):
                last_checkpoint = now
                with anyio.move_on_after(self._step_timeout, shield=True) as step:
                    await self._checkpoint(self.status)
                self._timed_out(step, "checkpoint")

    def _timed_out(self, step: anyio.CancelScope, what: str) -> None:
        if step.cancelled_caught:
            logger.warning(
                "answer %s abandoned after %ss session_id=%s",
                what,
                self._step_timeout,
                self.session_id,
            )

    def _next_version(self) -> Version:
        # The first delta after a commit leaves room for the app's other writers.
        if self.version == self._committed:
            self._line_start = self.version + VERSION_SKIP
            return self._line_start
        return self.version + 1

    def _take_pending(self) -> list[dict[str, Any]]:
        """Move the pending appends into the text, up to :data:`_MAX_DELTA_CHARS` of them;
        return the operation that appends them."""
        if not self._pending:
            return []
        piece = "".join(self._pending)
        self._pending.clear()
        if len(piece) > _MAX_DELTA_CHARS:
            # A burst (a cached answer replayed, a tool's output) goes out over several deltas,
            # each well under the broker's largest message (NATS: 1 MiB by default).
            piece, rest = piece[:_MAX_DELTA_CHARS], piece[_MAX_DELTA_CHARS:]
            self._pending.append(rest)
        operation = {"op": "append", "path": self.text_path, "offset": self._units, "value": piece}
        self._pieces.append(piece)
        self._units += utf16_length(piece)
        return [operation]

    async def _publish_pending(self) -> None:
        while self._pending:
            base, version = self.version, self._next_version()
            operations = self._take_pending()
            self._advance(version)
            await self._publish(operations, base, version)

    def _advance(self, version: Version) -> None:
        self.version = version
        self._line[version] = _Point(len(self._pieces), self._units, self.status)
        while len(self._line) > _KEPT_VERSIONS:
            self._line.popitem(last=False)

    async def _publish(
        self, operations: list[dict[str, Any]], base: Version, version: Version
    ) -> None:
        self.publishes += 1
        try:
            await self._bridge.publish_patch(
                self.session_id, operations, base_version=base, version=version, owner=self.owner
            )
        except Exception:
            # The sockets find the gap at the next delta and ask this stream (or the database).
            logger.warning(
                "answer publish failed session_id=%s version=%s",
                self.session_id,
                version,
                exc_info=True,
            )

    async def _checkpoint(self, status: AnswerStatus) -> None:
        """Commit the published answer at its version."""
        await self._commit(self.version, status)

    async def _finish(self, status: AnswerStatus) -> None:
        # The last appends and the status, committed at a new version before they are published:
        # a socket that loads a snapshot after the final patch finds the final text. A burst
        # too large for one delta goes out first, as ordinary deltas.
        while sum(map(len, self._pending)) > _MAX_DELTA_CHARS:
            await self._publish_pending()
        operations = self._take_pending()
        if self.status_path is not None and status is not self.status:
            operations.append({"op": "replace", "path": self.status_path, "value": status.value})
        saved = self._committed_point.status
        if not operations and self.version == self._committed and status is saved:
            return
        base, version = self.version, self._next_version()
        # Retried when the answer completed or was stopped: without this commit, the sockets
        # stay on "streaming" until the app's lease marks the answer interrupted, which would
        # be wrong. (Interrupted is what the lease says anyway.) Bounded by _FINISH_TIMEOUT.
        retries = (0.0,) if status is AnswerStatus.INTERRUPTED else _FINAL_RETRY_DELAYS
        for delay in retries:
            outcome = await self._commit(version, status)
            if outcome != "failed":
                break
            await anyio.sleep(delay)
        if outcome == "committed":
            self.status = status
            self._advance(version)
            await self._publish(operations, base, version)
        elif outcome == "rebased":
            self.status = status  # published with the rebase's patch
        else:
            logger.error(
                "the answer's final checkpoint failed: its sockets stay on the last published "
                "text until the app marks it (a lease) session_id=%s status=%s",
                self.session_id,
                status.value,
            )
        logger.info(
            "answer ended session_id=%s status=%s checkpoint=%s units=%d checkpoints=%d "
            "publishes=%d",
            self.session_id,
            status.value,
            outcome,
            self._units,
            self.checkpoints,
            self.publishes,
        )

    async def _commit(
        self, version: Version, status: AnswerStatus
    ) -> Literal["committed", "rebased", "failed"]:
        """Commit the text and ``status`` at ``version``, on top of the last commit.

        ``"committed"`` as asked; ``"rebased"`` on top of another writer's commit, at a higher
        version, the patch from it already published; ``"failed"`` (logged) when the callback
        raised, or the session kept moving: the next checkpoint tries again.
        """
        base = self._committed
        for _ in range(_REBASE_ATTEMPTS):
            checkpoint = Checkpoint(self.session_id, "".join(self._pieces), status, version, base)
            try:
                answer: object = await self._save(checkpoint)
            except Exception:
                logger.warning(
                    "answer checkpoint failed session_id=%s version=%s",
                    self.session_id,
                    version,
                    exc_info=True,
                )
                return "failed"
            result = as_version(answer)
            if result is None:
                logger.error(
                    "the checkpoint callback returned %r, not a version session_id=%s",
                    answer,
                    self.session_id,
                )
                return "failed"
            if result == version:
                self.checkpoints += 1
                rebased = base != self._committed
                if rebased:
                    # On top of another writer's commit: its sockets have the text up to the
                    # last checkpoint, and get the rest, and the status, in one patch.
                    await self._publish(self._since_commit(status), base, version)
                self._committed = version
                self._committed_point = self._line[version] = _Point(
                    len(self._pieces), self._units, status
                )
                return "rebased" if rebased else "committed"
            own = self._line.get(result)
            if own is not None and result > base:
                # Our own checkpoint, abandoned after the database had committed it: adopt it,
                # and commit the rest on top of it.
                self._committed, self._committed_point, base = result, own, result
                continue
            # Another writer committed ``result``: commit on top of it, above every version
            # this stream has published, and start a new line (older versions lack its change).
            logger.info(
                "answer rebased on another commit session_id=%s version=%s", self.session_id, result
            )
            base, version = result, max(result, self.version) + 1
            self.version = version
            self._line.clear()
        return "failed"

    def _since_commit(self, status: AnswerStatus) -> list[dict[str, Any]]:
        point = self._committed_point
        operations: list[dict[str, Any]] = []
        if len(self._pieces) > point.pieces:
            value = "".join(self._pieces[point.pieces :])
            operations.append(
                {"op": "append", "path": self.text_path, "offset": point.units, "value": value}
            )
        if self.status_path is not None and status is not point.status:
            operations.append({"op": "replace", "path": self.status_path, "value": status.value})
        return operations

    # Serving a socket that is behind (called from the broker's task, between our awaits).

    def _catch_up(self, version: Version) -> bytes | None:
        point, current = self._line.get(version), self._line.get(self.version)
        if point is None and version == self._committed:
            point = self._committed_point  # however many deltas came since
        if point is None or current is None or version == self.version:
            return None
        # The line's versions are in order: the first after ``version`` is where this patch
        # starts standing in for the deltas the socket lacks.
        covers_from = self._line_start if version == self._committed else None
        for line_version in self._line:
            if line_version > version:
                covers_from = line_version if covers_from is None else covers_from
                break
        operations: list[dict[str, Any]] = []
        # Up to the published version only: the final appends wait for their commit.
        if current.pieces > point.pieces:
            value = "".join(self._pieces[point.pieces : current.pieces])
            operations.append(
                {"op": "append", "path": self.text_path, "offset": point.units, "value": value}
            )
        if self.status_path is not None and current.status is not point.status:
            operations.append(
                {"op": "replace", "path": self.status_path, "value": current.status.value}
            )
        reply = SessionPatch(
            session_id=self.session_id,
            owner=self.owner,
            base_version=version,
            version=self.version,
            patch=operations,
            covers_from=covers_from,
        ).to_json()
        # Too large for one message: the socket loads a snapshot instead.
        return None if len(reply) > _MAX_CATCH_UP_BYTES else reply
