"""The middleware's fence: the app's session events right after the snapshot, judged by the cursor.

The ordering rules themselves are tested on the cursor alone (``test_cursor.py``); here, what
the middleware does with each verdict, and which frames it judges at all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from asgi_session_sync import SessionContext, SessionSyncMiddleware, Snapshot
from asgi_session_sync._types import Receive, Scope, Send
from asgi_session_sync.protocol import MAX_VERSION
from asgi_session_sync.testing import connect_websocket

pytestmark = pytest.mark.anyio


def event(version: Any, type_: str = "session_update", session_id: str = "s1") -> str:
    return json.dumps({"type": type_, "session_id": session_id, "version": version})


def patch(base: Any, version: Any, session_id: str = "s1") -> str:
    return json.dumps(
        {
            "type": "session_patch",
            "session_id": session_id,
            "base_version": base,
            "version": version,
            "patch": [{"op": "replace", "path": "/n", "value": version}],
        }
    )


def replaying_app(frames: Sequence[str | bytes]) -> Any:
    """Accepts, sends the frames it had queued (as a subscriber would), then idles."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        for frame in frames:
            key = "bytes" if isinstance(frame, bytes) else "text"
            await send({"type": "websocket.send", key: frame})
        await send({"type": "websocket.send", "text": "end"})
        await receive()

    return app


class Database:
    """A loader whose successive loads return the given versions (the last one from then on)."""

    def __init__(self, *versions: int | None) -> None:
        self.versions = list(versions)
        self.loads = 0

    async def load(self, ctx: SessionContext) -> Snapshot | None:
        version = self.versions[min(self.loads, len(self.versions) - 1)]
        self.loads += 1
        return None if version is None else Snapshot({"n": version}, version=version)


class Received(list[Any]):
    """Frames the client got after the first snapshot, and the middleware's counters."""

    fenced = 0
    loads = 0


def parse(message: Any) -> Any:
    """A text frame as its JSON, or its text when it is not JSON; a binary frame as is."""
    if message.get("text") is None:
        return message
    try:
        return json.loads(message["text"])
    except ValueError:
        return message["text"]


async def received_after_snapshot(
    frames: Sequence[str | bytes], snapshot_version: int = 6, **options: Any
) -> Received:
    return await received_with(Database(snapshot_version), frames, **options)


async def received_with(
    database: Database, frames: Sequence[str | bytes], **options: Any
) -> Received:
    app = SessionSyncMiddleware(
        replaying_app(frames), loader=database.load, paths=["/ws/{session_id}"], **options
    )
    seen = Received()
    async with connect_websocket(app, "/ws/s1") as ws:
        first = await ws.receive_json()
        assert first["version"] == database.versions[0]
        assert "reset" not in first
        while True:
            message = await ws.receive()
            if message.get("text") == "end":
                break
            seen.append(parse(message))
    seen.fenced = app.stats.fenced_frames
    seen.loads = database.loads
    return seen


def versions(frames: list[Any]) -> list[Any]:
    return [f.get("version") if isinstance(f, dict) else f for f in frames]


def steps(frames: list[Any]) -> list[Any]:
    """Each frame as (base_version, version), with "reset" for a fresh snapshot."""
    return [
        ("reset", f["version"]) if f.get("reset") else (f.get("base_version"), f["version"])
        for f in frames
    ]


# --------------------------------------------------------------------------------------------
# What is dropped, and when the fence ends
# --------------------------------------------------------------------------------------------


async def test_events_not_newer_than_snapshot_are_dropped() -> None:
    seen = await received_after_snapshot([event(v) for v in (3, 5, 6, 7, 8)])
    assert versions(seen) == [7, 8]
    assert seen.fenced == 3
    assert seen.loads == 1


async def test_fence_stops_at_first_newer_frame() -> None:
    # After a newer frame the live stream has caught up; later frames are the app's business.
    seen = await received_after_snapshot([event(v) for v in (5, 7, 4)])
    assert versions(seen) == [7, 4]


async def test_patches_the_snapshot_already_holds_are_dropped_until_one_chains() -> None:
    frames = [patch(4, 5), patch(5, 6), patch(6, 7), patch(7, 8)]
    seen = await received_after_snapshot(frames)
    assert steps(seen) == [(6, 7), (7, 8)]
    assert seen.fenced == 2
    assert seen.loads == 1


async def test_session_synced_from_the_app_is_dropped() -> None:
    # Only the middleware says "you are current"; during the window the cursor drops it.
    seen = await received_after_snapshot([event(9, "session_synced"), event(7)])
    assert [(f["type"], f["version"]) for f in seen] == [("session_update", 7)]
    assert seen.fenced == 1


async def test_an_update_without_version_passes_and_ends_the_fence() -> None:
    versionless = json.dumps({"type": "session_update", "session_id": "s1", "session": {}})
    seen = await received_after_snapshot([versionless, event(5)])
    assert versions(seen) == [None, 5]
    assert seen.fenced == 0


async def test_frames_that_are_not_protocol_frames_pass_unjudged() -> None:
    # The event type is always session_update, but a frame whose version is not a version
    # (a string, a timestamp, a bool, a fraction, 2**53, a negative number) is not a protocol
    # frame: parse_frame refuses it, so the fence neither drops it nor ends. The stale frame
    # at the end shows the fence is still up.
    frames: list[str | bytes] = [
        event("7"),
        event("2026-11-25T12:00:00Z"),
        event(True),
        event(7.5),
        event(2**53),
        event(-1),
        patch("x", "y"),
        patch(6, 6),
        json.dumps({"type": "session_patch", "session_id": "s1", "base_version": 6, "version": 7}),
        event(2, session_id="other"),  # another session's event: not this snapshot's to judge
        event(3, "token_delta"),  # the app's own event types are never judged
        "plain text",
        "{not json",
        '["session_update", 1]',
        b'{"type": "session_update", "session_id": "s1", "version": 1}',  # binary
        event(5),
    ]
    seen = await received_after_snapshot(frames)
    assert len(seen) == len(frames) - 1
    assert [m for m in seen if isinstance(m, dict) and "bytes" in m] == [
        {"type": "websocket.send", "bytes": frames[-2]}
    ]
    assert seen.fenced == 1


async def test_an_update_without_session_id_is_judged_as_this_sessions() -> None:
    frames = [json.dumps({"type": "session_update", "version": 5}), event(7)]
    seen = await received_after_snapshot(frames)
    assert versions(seen) == [7]
    assert seen.fenced == 1


async def test_versions_up_to_2_53_minus_1_are_fenced_exactly() -> None:
    frames = [event(MAX_VERSION - 2), event(MAX_VERSION - 1), event(MAX_VERSION)]
    seen = await received_after_snapshot(frames, snapshot_version=MAX_VERSION - 1)
    assert versions(seen) == [MAX_VERSION]
    assert seen.fenced == 2


async def test_a_whole_float_version_is_judged_as_its_int() -> None:
    seen = await received_after_snapshot([event(6.0), event(7.0)])
    assert versions(seen) == [7.0]
    assert seen.fenced == 1


# --------------------------------------------------------------------------------------------
# Repairs: a patch the client cannot apply is preceded by a fresh snapshot
# --------------------------------------------------------------------------------------------


async def test_a_patch_ahead_of_the_snapshot_gets_a_fresh_snapshot_first() -> None:
    # A patch in between (6 -> 8) was lost before the app sent 8 -> 9: the middleware loads
    # again (v8), sends it with "reset": true, then the held patch, which now chains; the
    # fence goes on from there and drops the duplicate.
    frames = [patch(8, 9), event(9), patch(9, 10)]
    seen = await received_with(Database(6, 8), frames)
    assert steps(seen) == [("reset", 8), (8, 9), (9, 10)]
    assert seen[0]["session"] == {"n": 8}
    assert seen.loads == 2
    assert seen.fenced == 1


SPELLINGS = {
    "leading whitespace": lambda text: " \n\t" + text,
    "escaped underscore": lambda text: text.replace("session_", "session\\u005f"),
    "escaped member name": lambda text: text.replace('"type"', '"\\u0074ype"'),
    "escaped session id": lambda text: text.replace('"s1"', '"\\u0073\\u0031"'),
}


@pytest.mark.parametrize("spell", SPELLINGS.values(), ids=SPELLINGS.keys())
async def test_every_json_spelling_of_a_session_event_is_judged(spell: Any) -> None:
    # JSON.parse reads each spelling as the session event it is: the fence must too, or a
    # stale update takes the client (at 6) back, and a patch it cannot apply (8 -> 9) reaches
    # it without the fresh snapshot first.
    frames = [spell(event(5)), spell(patch(8, 9)), spell(event(9)), patch(9, 10)]
    seen = await received_with(Database(6, 8), frames)
    assert steps(seen) == [("reset", 8), (8, 9), (9, 10)]
    assert seen.loads == 2
    assert seen.fenced == 2


async def test_a_patch_overlapping_the_snapshot_gets_a_fresh_snapshot_first() -> None:
    # 5 -> 7 starts from a state the client (at 6) never had: passing it would corrupt the
    # client's state. The fresh snapshot (v7) already holds it, so the patch is dropped.
    frames = [patch(5, 7), event(6), patch(7, 8)]
    seen = await received_with(Database(6, 7), frames)
    assert steps(seen) == [("reset", 7), (7, 8)]
    assert seen.loads == 2
    assert seen.fenced == 1  # event(6): the held patch is not counted as fenced


async def test_a_fresh_snapshot_behind_the_held_patch_drops_it_and_the_fence_judges_on() -> None:
    # The loader is behind the app's stream: the fresh snapshot (v7) does not reach 8 -> 9.
    frames = [patch(8, 9), event(7), patch(7, 8)]
    seen = await received_with(Database(6, 7), frames)
    assert steps(seen) == [("reset", 7), (7, 8)]
    assert seen.loads == 2


async def test_a_stale_frame_after_a_repair_asks_the_database_again() -> None:
    # After the repair the held patch moved the client to 9, a version from a live frame:
    # an older one (5) makes the middleware ask the database which is right.
    frames = [patch(8, 9), event(5), patch(9, 10)]
    seen = await received_with(Database(6, 8, 9), frames)
    assert steps(seen) == [("reset", 8), (8, 9), ("reset", 9), (9, 10)]
    assert seen.loads == 3


async def test_a_repair_that_loads_nothing_gives_up_and_ends_the_fence() -> None:
    frames = [patch(8, 9), event(5)]
    seen = await received_with(Database(6, None), frames)
    assert versions(seen) == [5]  # the held patch is dropped; the fence is down
    assert seen.loads == 2


async def test_a_repair_sends_its_snapshot_then_the_held_patch() -> None:
    database = Database(6, 8)
    app = SessionSyncMiddleware(
        replaying_app([patch(8, 9)]), loader=database.load, paths=["/ws/{session_id}"]
    )
    async with connect_websocket(app, "/ws/s1") as ws:
        assert (await ws.receive_json())["version"] == 6
        assert (await ws.receive_json())["reset"] is True
        assert (await ws.receive_json())["version"] == 9
        assert await ws.receive_text() == "end"
    assert app.stats.loads == 2


async def test_a_repair_never_shares_the_first_load_or_the_cache() -> None:
    frames = [patch(8, 9)]
    seen = await received_with(Database(6, 8), frames, cache_ttl=60)
    assert steps(seen) == [("reset", 8), (8, 9)]
    assert seen.loads == 2


@pytest.mark.parametrize("single_flight", [True, False])
async def test_concurrent_sends_during_a_repair_never_take_the_client_back(
    single_flight: bool,
) -> None:
    # Two app tasks send during the fence: the first a patch that does not chain (8 -> 9),
    # which starts a repair; the second, while that repair loads, the patch after it.
    first_load_may_end = anyio.Event()
    second_snapshot_sent = anyio.Event()
    loads = 0

    async def loader(ctx: SessionContext) -> Snapshot:
        nonlocal loads
        loads += 1
        version = {1: 6, 2: 8}.get(loads, 10)
        if loads == 2:  # the first repair read the database at 8, and is slow
            await first_load_may_end.wait()
        return Snapshot({"n": version}, version=version)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})

        async def first() -> None:
            await send({"type": "websocket.send", "text": patch(8, 9)})

        async def second() -> None:
            await anyio.lowlevel.checkpoint()  # the first task is in its load by now
            async with anyio.create_task_group() as sending:
                sending.start_soon(send, {"type": "websocket.send", "text": patch(9, 10)})
                # This send is as far as it can get while the first repair loads (judged,
                # or waiting its turn): only then may the slow first load end.
                await anyio.wait_all_tasks_blocked()
                first_load_may_end.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            tg.start_soon(second)
        await send({"type": "websocket.send", "text": "end"})
        await receive()

    middleware = SessionSyncMiddleware(
        app, loader=loader, paths=["/ws/{session_id}"], single_flight=single_flight
    )

    async def server_side(scope: Scope, receive: Receive, send: Send) -> None:
        after_first_snapshot = False

        async def watched(message: Any) -> None:
            nonlocal after_first_snapshot
            text = message.get("text") or ""
            if '"reset":true' in text and '"version":10' in text:
                second_snapshot_sent.set()
            elif after_first_snapshot and not second_snapshot_sent.is_set():
                # Between the first repair's frames, give the other repair its chance to
                # interleave. A correct middleware never sends it here: bounded, then go on.
                with anyio.move_on_after(1):
                    await second_snapshot_sent.wait()
            after_first_snapshot = '"reset":true' in text and '"version":8' in text
            await send(message)

        await middleware(scope, receive, watched)

    seen: list[Any] = []
    with anyio.fail_after(5):
        async with connect_websocket(server_side, "/ws/s1") as ws:
            assert (await ws.receive_json())["version"] == 6
            while (text := await ws.receive_text()) != "end":
                seen.append(json.loads(text))
    assert seen[0]["reset"] is True
    version = 6
    for frame in seen:  # what a client does, and may do, with each frame
        if frame["type"] == "session_patch":
            assert frame["base_version"] == version, f"a patch that does not chain: {steps(seen)}"
        assert frame["version"] >= version, f"the client went back: {steps(seen)}"
        version = frame["version"]
    assert version == 10


# --------------------------------------------------------------------------------------------
# The window
# --------------------------------------------------------------------------------------------


async def test_fence_window_bounds_the_frames_read() -> None:
    seen = await received_after_snapshot([event(v) for v in (1, 2, 3, 4)], fence_max_frames=2)
    assert versions(seen) == [3, 4]


async def test_frames_not_judged_count_toward_the_window() -> None:
    seen = await received_after_snapshot(["hello", "hi", event(3)], fence_max_frames=2)
    assert versions(seen) == ["hello", "hi", 3]


async def test_fence_off_with_zero_frames() -> None:
    seen = await received_after_snapshot([event(1), patch(8, 9)], fence_max_frames=0)
    assert versions(seen) == [1, 9]
    assert seen.loads == 1  # no repair either


async def test_fence_window_bounds_the_time() -> None:
    seen = await received_after_snapshot([event(4), patch(8, 9)], fence_max_seconds=0)
    assert versions(seen) == [4, 9]
    assert seen.fenced == 0
    assert seen.loads == 1


async def test_a_long_window_keeps_judging() -> None:
    seen = await received_after_snapshot([event(4)] * 5 + [event(7)], fence_max_seconds=3600)
    assert versions(seen) == [7]
    assert seen.fenced == 5


async def test_no_fence_without_a_snapshot_version() -> None:
    async def loader(ctx: SessionContext) -> dict[str, int]:
        return {"n": 1}

    app = SessionSyncMiddleware(
        replaying_app([event(1), patch(8, 9)]), loader=loader, paths=["/ws/{session_id}"]
    )
    async with connect_websocket(app, "/ws/s1") as ws:
        assert "version" not in await ws.receive_json()
        assert (await ws.receive_json())["version"] == 1
        assert (await ws.receive_json())["version"] == 9
        assert await ws.receive_text() == "end"
    assert app.stats.loads == 1
