from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from asgi_session_sync import SessionContext, SessionSyncMiddleware, Snapshot
from asgi_session_sync._types import Receive, Scope, Send
from asgi_session_sync.fence import VersionFence
from asgi_session_sync.testing import connect_websocket

pytestmark = pytest.mark.anyio


def event(version: Any, type_: str = "session_update", session_id: str = "s1") -> str:
    return json.dumps({"type": type_, "session_id": session_id, "version": version})


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


class Received(list[Any]):
    """Frames the client got after the snapshot, and the middleware's fenced count."""

    fenced = 0


def parse(message: Any) -> Any:
    try:
        return json.loads(message["text"])
    except (KeyError, TypeError, ValueError):
        return message


async def received_after_snapshot(
    frames: Sequence[str | bytes], snapshot_version: Any = 6, **options: Any
) -> Received:
    async def loader(ctx: SessionContext) -> Snapshot:
        return Snapshot({"n": snapshot_version}, version=snapshot_version)

    app = SessionSyncMiddleware(
        replaying_app(frames), loader=loader, paths=["/ws/{session_id}"], **options
    )
    seen = Received()
    async with connect_websocket(app, "/ws/s1") as ws:
        assert (await ws.receive_json())["version"] == snapshot_version
        while True:
            message = await ws.receive()
            if message.get("text") == "end":
                break
            seen.append(parse(message))
    seen.fenced = app.stats.fenced_frames
    return seen


def versions(frames: list[Any]) -> list[Any]:
    return [f.get("version") if isinstance(f, dict) else f for f in frames]


async def test_events_not_newer_than_snapshot_are_dropped() -> None:
    seen = await received_after_snapshot([event(v) for v in (3, 5, 6, 7, 8)])
    assert versions(seen) == [7, 8]
    assert seen.fenced == 3


async def test_fence_stops_at_first_newer_frame() -> None:
    # After a newer frame the live stream has caught up; later frames are the app's business.
    seen = await received_after_snapshot([event(v) for v in (5, 7, 4)])
    assert versions(seen) == [7, 4]


async def test_patch_types_are_fenced_when_configured() -> None:
    frames = [event(5, "session_patch"), event(6, "token"), event(7, "session_patch")]
    unfenced = await received_after_snapshot(frames)
    assert [(f["type"], f["version"]) for f in unfenced] == [
        ("session_patch", 5),
        ("token", 6),
        ("session_patch", 7),
    ]
    fenced = await received_after_snapshot(frames, fence_event_types=["session_patch"])
    assert [(f["type"], f["version"]) for f in fenced] == [("token", 6), ("session_patch", 7)]


async def test_unfenced_frames_pass() -> None:
    frames: list[str | bytes] = [
        event(2, session_id="other"),  # another session's event
        json.dumps({"type": "session_update", "session_id": "s1"}),  # no version
        event("not-a-version"),
        event(True),
        "plain text",
        "{not json",
        b'{"type": "session_update", "session_id": "s1", "version": 1}',  # binary
        event(8),
    ]
    seen = await received_after_snapshot(frames)
    assert len(seen) == len(frames)


async def test_timestamp_versions_compare_as_instants() -> None:
    snapshot_at = "2026-11-25T12:00:00+00:00"
    frames = [
        event("2026-11-25T13:00:00+01:00"),  # the same instant: a duplicate
        event("2026-11-25T11:59:59.999999Z"),
        event("2026-11-25T12:00:00.000001Z"),
    ]
    seen = await received_after_snapshot(frames, snapshot_version=snapshot_at)
    assert versions(seen) == ["2026-11-25T12:00:00.000001Z"]


async def test_fence_window_bounds_the_frames_read() -> None:
    seen = await received_after_snapshot([event(v) for v in (1, 2, 3, 4)], fence_max_frames=2)
    assert versions(seen) == [3, 4]


async def test_fence_off_with_zero_frames() -> None:
    seen = await received_after_snapshot([event(1)], fence_max_frames=0)
    assert versions(seen) == [1]


async def test_fence_window_bounds_the_time() -> None:
    def fence(max_seconds: float) -> VersionFence:
        return VersionFence(
            "s1", 5, event_types={"session_update"}, max_frames=10, max_seconds=max_seconds
        )

    assert fence(3600).admit(event(4)) is False
    assert fence(0).admit(event(4)) is None  # the window is over: pass, stop fencing


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


def steps(frames: list[Any]) -> list[Any]:
    return [(f.get("base_version"), f["version"]) for f in frames]


async def test_patches_the_snapshot_already_holds_are_dropped_until_one_chains() -> None:
    frames = [patch(4, 5), patch(5, 6), patch(6, 7), patch(7, 8)]
    seen = await received_after_snapshot(frames, fence_event_types=["session_patch"])
    assert steps(seen) == [(6, 7), (7, 8)]
    assert seen.fenced == 2


async def test_a_patch_overlapping_the_snapshot_is_dropped_and_the_fence_goes_on() -> None:
    # 5 -> 7 starts from a state the client (at 6) never had: passing it would corrupt the
    # client's state, and it must not count as "caught up" either.
    frames = [patch(5, 7), event(6), patch(6, 7)]
    seen = await received_after_snapshot(frames, fence_event_types=["session_patch"])
    assert steps(seen) == [(6, 7)]
    assert seen.fenced == 2


async def test_a_patch_ahead_of_the_snapshot_passes_and_ends_the_fence() -> None:
    # A patch in between was lost before the app sent it: the client sees its base is not
    # its version and reconnects with since; the fence cannot repair it.
    frames = [patch(8, 9), event(5)]
    seen = await received_after_snapshot(frames, fence_event_types=["session_patch"])
    assert versions(seen) == [9, 5]


async def test_a_patch_without_comparable_versions_passes_and_the_fence_goes_on() -> None:
    frames = [patch("x", "y"), event(4)]
    seen = await received_after_snapshot(frames, fence_event_types=["session_patch"])
    assert versions(seen) == ["y"]


BIG = 2**64


async def test_versions_beyond_2_53_are_fenced_exactly() -> None:
    # As floats, BIG and BIG + 1 are equal; as decimal strings or exact JSON ints they are not.
    frames = [event(str(BIG)), event(BIG + 1), event(str(BIG + 1)), event(str(BIG + 2))]
    seen = await received_after_snapshot(frames, snapshot_version=str(BIG + 1))
    assert versions(seen) == [str(BIG + 2)]
    assert seen.fenced == 3


async def test_patches_beyond_2_53_chain_exactly() -> None:
    frames = [patch(str(BIG), str(BIG + 1)), patch(str(BIG + 1), str(BIG + 2))]
    seen = await received_after_snapshot(
        frames, snapshot_version=str(BIG + 1), fence_event_types=["session_patch"]
    )
    assert steps(seen) == [(str(BIG + 1), str(BIG + 2))]
