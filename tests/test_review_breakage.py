"""A reviewer's attempts to break AnswerStream, the catch-up, the hub's ledger and the SSE fence.

Every test here FAILS at the commit that added it: each states a behaviour a user of the library
can rely on by the docs or the issues (18 and 22), and shows the code breaking it. The rigs are
the existing suites' own (``tests/test_streaming.py``: a real nats-server, a producer's bridge
and an API's; ``tests/test_sse.py``: the in-process HTTP client).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import nats
import pytest
from test_sse import VERSION as SSE_VERSION
from test_sse import memory_hub, open_response, parse_events, raw_sse_app, seen, update_event, wrap
from test_streaming import (
    SID,
    STATUS,
    SUBJECT,
    TEXT,
    Rig,
    Sessions,
    Tokens,
    answer_for,
    connected,
    llm,
    rig,
    until,
)

from asgi_session_sync import SessionContext, SessionSync, Snapshot
from asgi_session_sync.nats import EmbeddedNats
from asgi_session_sync.protocol import MAX_VERSION, AnswerStatus, Version, apply_patch
from asgi_session_sync.streaming import AnswerStream, Checkpoint

__all__ = ["llm", "rig"]  # fixtures, imported for pytest

pytestmark = pytest.mark.anyio

NATS = pytest.mark.parametrize("anyio_backend", ["asyncio"])  # nats-py runs on asyncio only


class MemoryTransport:
    """An AnswerTransport with no broker: records each publish; catch-ups and stops by hand."""

    def __init__(self) -> None:
        self.published: list[tuple[Version, Version, list[dict[str, Any]]]] = []
        self.catch_up: Callable[[Version], bytes | None] | None = None
        self.stop: Callable[[], bool] | None = None

    async def publish_patch(
        self,
        session_id: str,
        patch: Sequence[Mapping[str, Any]],
        *,
        base_version: Version,
        version: Version,
        owner: str | None = None,
    ) -> None:
        self.published.append((base_version, version, [dict(op) for op in patch]))

    @asynccontextmanager
    async def serve_answer(
        self,
        session_id: str,
        text_path: str,
        *,
        catch_up: Callable[[Version], bytes | None],
        stop: Callable[[], bool],
    ) -> AsyncIterator[None]:
        self.catch_up, self.stop = catch_up, stop
        yield


def memory_answer(db: Sessions, transport: MemoryTransport, **options: Any) -> AnswerStream:
    return AnswerStream(
        transport,
        SID,
        text_path=TEXT,
        status_path=STATUS,
        version=db.version,
        checkpoint=db.save,
        **options,
    )


# --------------------------------------------------------------------------------------------
# 1. A checkpoint that hangs makes the producer impossible to stop or cancel
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["stop", "deadline"])
async def test_a_checkpoint_that_hangs_does_not_make_the_answer_unstoppable(how: str) -> None:
    # FAILS: streaming.py _pump runs each periodic checkpoint under an unbounded shield
    # (CancelScope(shield=True) around self._checkpoint). A save that blocks (a row lock held
    # by another transaction, a pool exhausted) then makes the answer immune to a user's stop
    # and to the worker's own deadline: the block never exits, _finish never runs.
    db = Sessions()
    release = anyio.Event()

    async def save(checkpoint: Checkpoint) -> Version:
        if checkpoint.status is AnswerStatus.STREAMING:
            await release.wait()  # the database does not answer
        return await db.save(checkpoint)

    transport = MemoryTransport()
    answer = AnswerStream(
        transport,
        SID,
        text_path=TEXT,
        status_path=STATUS,
        version=db.version,
        checkpoint=save,
        publish_interval=0.01,
        checkpoint_interval=0.02,
    )
    ended = anyio.Event()

    async def produce() -> None:
        with anyio.move_on_after(0.5 if how == "deadline" else 3600):
            async with answer:
                answer.append("Hello")
                await anyio.sleep_forever()
        ended.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        await until(lambda: bool(transport.published), within=5)
        if how == "stop":
            await anyio.sleep(0.1)  # the first checkpoint is under way (and hangs)
            assert transport.stop is not None
            assert transport.stop() is True
        with anyio.move_on_after(5):
            await ended.wait()
        still_running = not ended.is_set()
        release.set()  # let the test end
    assert not still_running, f"the answer's block did not end 5 s after a {how}"


# --------------------------------------------------------------------------------------------
# 2. A producer that restarts from the database's version reuses versions for other text
# --------------------------------------------------------------------------------------------


class Tab:
    """A browser tab's state, applying every patch the producer published."""

    def __init__(self, db: Sessions) -> None:
        self.state = copy.deepcopy(db.state)
        self.version = db.version

    def apply(self, transport: MemoryTransport, start: int = 0) -> None:
        for base, version, patch in transport.published[start:]:
            assert base == self.version
            self.state, self.version = apply_patch(self.state, patch), version

    @property
    def text(self) -> str:
        text: str = self.state["interactions"][0]["response"]
        return text


@pytest.mark.xfail(
    strict=True,
    reason=(
        "known limitation, left open: a producer's deltas are numbered from the last "
        "commit, so a producer that died before its first checkpoint leaves versions a "
        "later producer of the same session may reuse; reserving them needs the app to "
        "store a high-water mark"
    ),
)
async def test_a_version_a_dead_producer_published_is_never_reused_for_other_text() -> None:
    # FAILS: streaming.py _next_version numbers deltas from the last commit alone
    # (committed + VERSION_SKIP, then +1). A producer killed before its checkpoint published
    # versions the database never heard of; the next answer of the session (after the lease
    # sweeper's commit and a "regenerate" that resets the text, both version + 1) numbers
    # its deltas from the same base and commits one of those versions with other text. A tab
    # that held the dead producer's version (it was offline, or its API process restarted)
    # resumes with it as since / Last-Event-ID, and the resume check says "current": the tab
    # keeps the dead answer's text for good, silently.
    db = Sessions()
    tab = Tab(db)
    dead = MemoryTransport()
    first = memory_answer(db, dead, publish_interval=0.001, checkpoint_interval=3600)
    with anyio.CancelScope() as worker:
        async with first:
            for count, token in enumerate(["AAAA", "AAAA", "AAAA"], start=1):
                first.append(token)
                await until(lambda count=count: len(dead.published) == count)  # type: ignore[misc]
            db.broken = True  # kill -9: nothing more reaches the database...
            worker.cancel()
    db.broken = False
    tab.apply(dead)
    held = tab.version
    assert (tab.text, held) == ("AAAA" * 3, db.version + 1002)

    # The lease sweeper marks the answer interrupted; the user regenerates it.
    db.write(lambda state: state["interactions"][0].update(status="interrupted"))
    db.write(lambda state: state["interactions"][0].update(response="", status="streaming"))
    second_transport = MemoryTransport()
    second = memory_answer(db, second_transport, publish_interval=0.001, checkpoint_interval=0.01)

    async def load(ctx: SessionContext) -> Snapshot:
        return Snapshot(copy.deepcopy(db.state), version=db.version)

    sent: list[dict[str, Any]] = []

    async def send(message: Mapping[str, Any]) -> None:
        if message["type"] == "websocket.send":
            sent.append(json.loads(message["text"]))

    scope = {
        "type": "websocket",
        "path": f"/ws/sessions/{SID}",
        "query_string": f"since={held}".encode(),
        "headers": [],
    }
    async with second:
        # As long as the dead answer's text so far: every later delta of this answer then
        # applies cleanly on the tab's wrong text, so no client-side offset check catches it.
        second.append("B" * 12)
        await until(lambda: db.text == "B" * 12)  # its first checkpoint
        assert db.version == held, "the database now has the tab's version, with other text"
        # The tab comes back mid-answer and resumes from the version it holds.
        await SessionSync(load).accept(scope, send, SID)
    snapshots = [event for event in sent if event["type"] == "session_update"]
    assert snapshots, (
        f"resuming with since={held} was answered as current: the tab keeps "
        f"{tab.text!r} while the database has {'B' * 12!r} at the same version"
    )


# --------------------------------------------------------------------------------------------
# 3. The producer cannot catch up a socket from its own last commit after 512 deltas
# --------------------------------------------------------------------------------------------


@NATS
async def test_the_producer_answers_a_catch_up_from_its_last_commit_however_many_deltas_since(
    rig: Rig, llm: Tokens
) -> None:
    # FAILS: streaming.py _catch_up looks the version up in self._line only, which keeps the
    # last _KEPT_VERSIONS (512) versions and drops the committed one after 512 deltas, though
    # the stream keeps its text (_pieces) and the commit's point (_committed_point). The
    # committed version is the one every late socket asks from (a database snapshot): with a
    # long checkpoint interval, or while checkpoints fail (a database outage), every socket
    # that connects mid-answer fails its catch-up, loads again, and is ended after ~5 s of
    # retries, over and over, until a checkpoint finally commits.
    answer = answer_for(rig.producer, rig.db, publish_interval=0.0005, checkpoint_interval=3600)
    start = rig.db.version
    async with anyio.create_task_group() as tg:
        tg.start_soon(llm.produce, answer)
        for n in range(520):
            await llm.give(answer, f"t{n} ")
        assert rig.db.version == start  # no checkpoint yet
        data = await rig.api.catch_up(SID, start)
        llm.send.close()
    assert data is not None, "no catch-up from the database's version after 520 deltas"
    assert json.loads(data)["base_version"] == start


# --------------------------------------------------------------------------------------------
# 4. A catch-up reply's covers_from is trusted without bound
# --------------------------------------------------------------------------------------------


@NATS
async def test_a_forged_catch_up_reply_cannot_freeze_a_socket(
    rig: Rig, nats_server: EmbeddedNats
) -> None:
    # FAILS: cursor.py catch_up takes covers_from..version from the reply as "already
    # covered", and _stale then DROPs every later frame in that range without the VERIFY
    # that the module docstring says "keeps one bad message from freezing a socket". A reply
    # with version 2**53 - 2 and covers_from = base + 1 (from a buggy producer, or any client
    # allowed to answer on <prefix>.<sid>.catchup) makes the socket drop every real update,
    # full states included, until the client reconnects.
    forger = await nats.connect(nats_server.url)
    try:

        async def answer(msg: Any) -> None:
            base = int(msg.data)
            patch = {
                "type": "session_patch",
                "session_id": SID,
                "base_version": base,
                "version": MAX_VERSION - 1,
                "covers_from": base + 1,
                "patch": [],
            }
            await msg.respond(json.dumps(patch).encode())

        await forger.subscribe(f"{SUBJECT}.catchup", cb=answer)
        await forger.flush()
        async with connected(rig.api, rig.db) as client:
            raw = rig.producer.bridge.client
            # A patch that does not chain: the hub asks for a catch-up, the forger answers.
            gap = {
                "type": "session_patch",
                "session_id": SID,
                "base_version": rig.db.version + 5,
                "version": rig.db.version + 6,
                "patch": [],
            }
            await raw.publish(SUBJECT, json.dumps(gap).encode())
            await until(lambda: rig.api.stats.catch_ups >= 1)
            await anyio.sleep(0.2)
            # The real publisher commits a new title and publishes the whole state.
            _, version = rig.db.write(lambda state: state.update(title="renamed"))
            await rig.producer.bridge.publish(SID, rig.db.state, version=version)
            with anyio.move_on_after(6.0):
                await until(lambda: client.state.get("title") == "renamed")
            stats = rig.api.stats
            assert client.state.get("title") == "renamed", (
                f"the socket is frozen at version {client.version}: every later frame dropped "
                f"(stale_dropped={stats.stale_dropped}, resyncs={stats.resyncs})"
            )
    finally:
        await forger.close()


# --------------------------------------------------------------------------------------------
# 5. Lone surrogates in appends (a surrogate pair split across two tokens)
# --------------------------------------------------------------------------------------------


@NATS
async def test_a_surrogate_pair_split_across_two_appends_reaches_every_socket(
    rig: Rig, llm: Tokens, caplog: pytest.LogCaptureFixture
) -> None:
    # FAILS: an LLM API streaming JSON with escaped UTF-16 can split an emoji's pair across
    # two chunks; json.loads gives "\ud83d" then "\ude00", which Python keeps as two lone
    # surrogates even once joined (utf16_length counts them, as the protocol docstring says
    # it should). SessionPatch.to_json (pydantic) refuses to encode them, streaming.py
    # _publish logs "answer publish failed" and drops the delta, every catch-up then raises in
    # the producer's NATS callback (no reply: a 1 s timeout per socket), and the sockets never
    # see the final text.
    caplog.set_level(logging.WARNING, "asgi_session_sync")
    answer = answer_for(rig.producer, rig.db, publish_interval=0.01, checkpoint_interval=0.05)
    async with connected(rig.api, rig.db) as client, anyio.create_task_group() as tg:
        tg.start_soon(llm.produce, answer)
        pair = json.loads('"\\ud83d"'), json.loads('"\\ude00"')
        for token in ("Hi ", *pair, "!"):
            await llm.send.send(token)
        # The two halves are joined into the one character they spell.
        await until(lambda: "".join(answer._pieces) == "Hi \U0001f600!")
        llm.send.close()
        await until(lambda: rig.db.status == "complete")
        await until(lambda: client.status == "complete", within=8.0)
        assert client.text == rig.db.text
    failures = [r.getMessage() for r in caplog.records if "publish failed" in r.getMessage()]
    assert not failures, failures


# --------------------------------------------------------------------------------------------
# 6. A bad append that no earlier append checked reaches the sockets
# --------------------------------------------------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason=(
        "known limitation, left open: the hub checks an append against the last one it "
        "saw to the same string; the first one is checked only by each client, which "
        "refuses the patch whole and resyncs"
    ),
)
@NATS
async def test_the_first_append_past_the_text_or_on_a_non_string_reaches_no_socket(
    rig: Rig,
) -> None:
    # FAILS: issue 18 ("Bad input"): a delta at an offset past the text or on a non-string is
    # refused, counted and never reaches a socket. hub.py _Channel.append_problem checks an
    # append only against an earlier append it saw on the same string; the first append to a
    # string (every answer's first delta, and any after another operation touched the path) is
    # forwarded unchecked, so the socket moves to a version whose patch every client fails.
    version = rig.db.version
    bad = [
        (TEXT, 9999, "PAST"),  # the response is ""
        ("/title", 0, "SHORT"),  # the title is "a chat": 6 units, not 0
        ("/interactions/0", 0, "OBJECT"),  # not a string at all
    ]
    async with rig.api.subscribe(SID) as updates:
        updates.version = version  # the app sent the snapshot at this version itself
        raw = rig.producer.bridge.client
        for n, (path, offset, value) in enumerate(bad):
            event = {
                "type": "session_patch",
                "session_id": SID,
                "base_version": version + n,
                "version": version + n + 1,
                "patch": [{"op": "append", "path": path, "offset": offset, "value": value}],
            }
            await raw.publish(SUBJECT, json.dumps(event).encode())
        await raw.publish(SUBJECT, json.dumps({"type": "note", "session_id": SID}).encode())
        sent = []
        with anyio.fail_after(5):
            async for text in updates:
                sent.append(text)
                if '"note"' in text:
                    break
    assert sent == [json.dumps({"type": "note", "session_id": SID})], sent
    assert rig.api.stats.refused_frames == len(bad)


# --------------------------------------------------------------------------------------------
# 7. The SSE fence lets a stale event through after a comment line or a lone line break
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "before",
    [b": keep-alive\n", b"event: greeting\r\ndata: hello\r\n\r", b"\n"],
    ids=["comment-line", "crlf-split-between-chunks", "blank-line"],
)
async def test_a_stale_event_after_a_chunk_ending_in_a_line_break_is_still_fenced(
    before: bytes,
) -> None:
    # FAILS: _sse_responder.py _send_fenced: a chunk whose rest is a whole line with no
    # session event (a comment keep-alive, the "\n" of a CRLF split from its "\r" by the
    # chunking, a stray blank line) is passed with self._passing = True, which marks the NEXT
    # event as "the rest of an event whose start went out unjudged": a stale session_update
    # right after it reaches the client unfenced. _may_be_session_event returns False for
    # such a rest, and the branch does not check that the rest ends mid-event.
    chunks = [before]
    if before.endswith(b"\r"):
        chunks.append(b"\n")  # the LF of the CRLF, in the app's next body message
    chunks += [update_event(SSE_VERSION - 1), update_event(SSE_VERSION + 1)]
    app = wrap(raw_sse_app(chunks))
    async with open_response(app, "/sse/sessions/s1") as client:
        await client.wait_for(lambda: str(SSE_VERSION + 1).encode() in client.body)
        await anyio.sleep(0.05)
    events = [pair for pair in seen(parse_events(bytes(client.body))) if pair[0] != "greeting"]
    assert events == [
        ("session_update", str(SSE_VERSION)),
        ("session_update", str(SSE_VERSION + 1)),
    ], events
    assert app.stats.fenced_frames == 1


# --------------------------------------------------------------------------------------------
# 8. The hub's append ledger ignores array indexes that shift within a patch
# --------------------------------------------------------------------------------------------


async def test_a_valid_append_after_an_array_shift_in_the_same_patch_is_not_refused() -> None:
    # FAILS: hub.py _Channel.append_problem forgets a string only when an operation's path
    # overlaps it (the same pointer or a parent). Removing /items/0 shifts /items/1 to
    # /items/0 and /items/2 to /items/1, so the ledger's length for /items/1/text is now
    # another string's; an append in the same patch at that string's true length is refused
    # as "an append at offset ...", although every client applies it.
    hub, broker = memory_hub()
    state = {"items": [{"text": "a"}, {"text": "bb"}, {"text": "cccc"}]}
    frames: list[str] = []
    async with hub.subscribe(SID) as updates:
        updates.version = 1

        def publish(base: int, patch: list[dict[str, Any]]) -> None:
            event = {
                "type": "session_patch",
                "session_id": SID,
                "base_version": base,
                "version": base + 1,
                "patch": patch,
            }
            broker.subscribers[SID](json.dumps(event).encode())

        publish(1, [{"op": "append", "path": "/items/1/text", "offset": 2, "value": "B"}])
        state = apply_patch(
            state, [{"op": "append", "path": "/items/1/text", "offset": 2, "value": "B"}]
        )
        shift = [
            {"op": "remove", "path": "/items/0"},
            {"op": "append", "path": "/items/1/text", "offset": 4, "value": "C"},  # "cccc"
        ]
        state = apply_patch(state, shift)  # every client applies it
        publish(2, shift)
        with anyio.fail_after(2):
            while len(frames) < 2:
                frames.append(await updates.__anext__())
    assert hub.stats.refused_frames == 0
    assert state["items"][1]["text"] == "ccccC"
