"""The one ordering engine: a test per row of the rules table in ``cursor.py``, then properties.

Frames are built as the wire has them and read with ``parse_frame``, as every caller does.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
from hypothesis import given, settings
from hypothesis import strategies as st

from asgi_session_sync.cursor import Cursor, Verdict
from asgi_session_sync.protocol import (
    HEARTBEAT,
    MAX_VERSION,
    Frame,
    Kind,
    SessionPatch,
    SessionSynced,
    SessionUpdate,
    parse_frame,
)

EMIT, DROP, HOLD, VERIFY = Verdict.EMIT, Verdict.DROP, Verdict.HOLD, Verdict.VERIFY
ROOMY = 1 << 20


def read(text: str | bytes) -> Frame:
    frame = parse_frame(text if isinstance(text, str) else text.decode())
    assert isinstance(frame, Frame), frame
    return frame


def update(version: int | None, session: Any = None) -> Frame:
    event = SessionUpdate(session_id="s1", version=version, session=session or {})
    return read(event.to_json())


def patch(base_version: int, version: int, operations: Any = ()) -> Frame:
    event = SessionPatch(
        session_id="s1", base_version=base_version, version=version, patch=list(operations)
    )
    return read(event.to_json())


def snapshot(version: int | None, session: Any = None) -> Frame:
    event = SessionUpdate(session_id="s1", version=version, session=session or {}, reset=True)
    return read(event.to_json())


def verified(version: int | None, *, max_held_bytes: int = ROOMY) -> Cursor:
    """A cursor whose client got a snapshot at ``version``."""
    return Cursor(version, known=True, max_held_bytes=max_held_bytes)


def live(version: int) -> Cursor:
    """A cursor whose client's ``version`` came from a live frame, after a snapshot below it."""
    cursor = verified(version - 1)
    assert cursor.offer(update(version)) is EMIT
    return cursor


def versions(frames: list[Frame]) -> list[int | None]:
    return [frame.version for frame in frames]


# --------------------------------------------------------------------------------------------
# One test per row of the table
# --------------------------------------------------------------------------------------------


def test_a_frame_that_is_not_a_session_event_is_emitted_even_while_repairing() -> None:
    cursor = verified(5)
    assert cursor.offer(read(HEARTBEAT)) is EMIT
    assert cursor.offer(read('{"type": "token", "version": 1}')) is EMIT
    assert cursor.offer(patch(7, 8)) is HOLD
    assert cursor.offer(read(HEARTBEAT)) is EMIT
    assert (cursor.version, cursor.held_bytes) == (5, patch(7, 8).size)


def test_session_events_wait_while_a_repair_is_under_way() -> None:
    cursor = verified(5)
    assert cursor.offer(patch(7, 8)) is HOLD
    assert cursor.repairing
    # Even frames that would chain, be newer, be stale or be dropped wait for the snapshot.
    synced = read(SessionSynced(session_id="s1", version=5).to_json())
    waiting = [patch(5, 6), update(9), update(1), synced]
    assert [cursor.offer(frame) for frame in waiting] == [HOLD] * 4
    assert cursor.version == 5
    assert cursor.held_bytes == patch(7, 8).size + sum(frame.size for frame in waiting)


def test_an_update_without_version_is_emitted_and_leaves_the_version() -> None:
    cursor = verified(5)
    assert cursor.offer(update(None)) is EMIT
    assert cursor.version == 5
    assert cursor.offer(patch(5, 6)) is EMIT  # still chains from the snapshot


def test_an_update_when_the_version_is_unknown_is_emitted_and_sets_it() -> None:
    cursor = Cursor(max_held_bytes=ROOMY)
    assert cursor.offer(update(3)) is EMIT
    assert cursor.version == 3
    assert cursor.offer(patch(3, 4)) is EMIT


def test_an_update_after_an_unversioned_snapshot_is_emitted() -> None:
    cursor = verified(None)
    assert cursor.offer(update(0)) is EMIT
    assert cursor.version == 0


def test_a_newer_update_is_emitted_and_moves_the_version() -> None:
    cursor = verified(5)
    assert cursor.offer(update(9)) is EMIT  # a gap is fine: an update is the whole state
    assert cursor.version == 9


def test_an_update_at_the_clients_version_is_a_duplicate_dropped_even_when_live() -> None:
    assert verified(5).offer(update(5)) is DROP
    cursor = live(5)
    assert cursor.offer(update(5)) is DROP
    assert not cursor.repairing


def test_an_older_update_after_a_snapshot_is_dropped() -> None:
    cursor = verified(5)
    assert cursor.offer(update(4)) is DROP
    assert cursor.offer(update(0)) is DROP
    assert (cursor.version, cursor.repairing) == (5, False)


def test_an_older_update_after_a_live_frame_asks_the_database() -> None:
    cursor = live(5)
    assert cursor.offer(update(4)) is VERIFY
    assert cursor.repairing
    assert cursor.held_bytes == 0  # a stale frame is not kept: the snapshot covers it
    assert cursor.version == 5


def test_a_patch_from_the_clients_version_is_emitted_and_moves_it() -> None:
    cursor = verified(5)
    assert cursor.offer(patch(5, 6)) is EMIT
    assert cursor.offer(patch(6, 9)) is EMIT  # a patch may span versions
    assert cursor.version == 9


def test_a_patch_the_snapshot_already_holds_is_dropped() -> None:
    cursor = verified(5)
    assert cursor.offer(patch(4, 5)) is DROP
    assert cursor.offer(patch(1, 3)) is DROP
    assert (cursor.version, cursor.repairing) == (5, False)


def test_a_patch_to_the_clients_live_version_is_a_duplicate_dropped() -> None:
    cursor = live(5)
    assert cursor.offer(patch(4, 5)) is DROP
    assert not cursor.repairing


def test_a_patch_older_than_a_live_version_asks_the_database() -> None:
    cursor = live(5)
    assert cursor.offer(patch(3, 4)) is VERIFY
    assert cursor.repairing


def test_a_patch_ahead_of_the_client_is_held_for_a_repair() -> None:
    # A patch in between was lost.
    cursor = verified(5)
    assert cursor.offer(patch(6, 7)) is HOLD
    assert cursor.repairing
    assert cursor.version == 5


def test_a_patch_overlapping_the_clients_version_is_held_for_a_repair() -> None:
    # 4 -> 7 starts from a state the client (at 5) does not have, and ends past it.
    cursor = verified(5)
    assert cursor.offer(patch(4, 7)) is HOLD
    assert cursor.repairing


def test_a_patch_when_the_state_is_unknown_is_held_for_a_repair() -> None:
    cursor = Cursor(max_held_bytes=ROOMY)
    assert cursor.offer(patch(0, 1)) is HOLD
    assert cursor.repairing


def test_a_patch_after_an_unversioned_snapshot_can_never_chain_and_is_dropped() -> None:
    cursor = verified(None)
    assert cursor.offer(patch(0, 1)) is DROP
    assert (cursor.version, cursor.repairing) == (None, False)


def test_session_synced_on_a_live_path_is_dropped() -> None:
    synced = read(SessionSynced(session_id="s1", version=9).to_json())
    for cursor in (verified(5), live(5), Cursor(max_held_bytes=ROOMY)):
        assert cursor.offer(synced) is DROP
        assert not cursor.repairing
    assert verified(5).offer(synced) is DROP


def test_a_snapshot_is_emitted_even_when_older_and_becomes_the_verified_version() -> None:
    cursor = live(9)
    assert cursor.offer(update(3)) is VERIFY
    fresh = snapshot(3)
    assert cursor.reset(fresh) == [fresh]
    assert (cursor.version, cursor.repairing) == (3, False)
    # Verified: a stale frame now costs nothing, where before it asked the database.
    assert cursor.offer(update(2)) is DROP
    assert not cursor.repairing


def test_a_snapshot_needs_no_repair_to_be_taken() -> None:
    cursor = verified(5)
    fresh = snapshot(7)
    assert cursor.reset(fresh) == [fresh]
    assert cursor.version == 7


def test_an_unversioned_snapshot_makes_the_state_known() -> None:
    cursor = Cursor(max_held_bytes=ROOMY)
    assert cursor.offer(patch(0, 1)) is HOLD
    assert cursor.reset(snapshot(None)) == [snapshot(None)]
    assert (cursor.version, cursor.repairing) == (None, False)
    assert cursor.unrepaired == 0  # the held patch was judged: dropped, it can never chain
    assert cursor.offer(patch(1, 2)) is DROP


# --------------------------------------------------------------------------------------------
# The poisoned message, repair replays, the held-bytes bound, giving up
# --------------------------------------------------------------------------------------------


def test_a_poisoned_version_is_repaired_by_the_first_stale_frame() -> None:
    # The client got a snapshot at 2; a live patch claims 2**53 - 1 (a publisher's bug, a
    # forged message). Real frames then look stale: the first asks the database, whose v3
    # replaces the bad state although it is lower, and real patches chain again.
    cursor = verified(2)
    assert cursor.offer(patch(2, MAX_VERSION, [{"op": "add", "path": "/x", "value": 1}])) is EMIT
    assert cursor.version == MAX_VERSION
    assert cursor.offer(patch(2, 3)) is VERIFY
    assert cursor.offer(patch(3, 4)) is HOLD  # arrives while the snapshot loads
    fresh = snapshot(3)
    assert versions(cursor.reset(fresh)) == [3, 4]
    assert cursor.offer(patch(4, 5)) is EMIT
    assert cursor.offer(update(4)) is VERIFY  # live again: a stale frame asks again
    assert cursor.reset(snapshot(5)) == [snapshot(5)]
    assert cursor.offer(patch(5, 6)) is EMIT
    assert (cursor.version, cursor.unrepaired) == (6, 0)


def test_a_poisoned_update_is_repaired_too() -> None:
    cursor = verified(2)
    assert cursor.offer(update(MAX_VERSION)) is EMIT
    assert cursor.offer(update(3)) is VERIFY
    assert versions(cursor.reset(snapshot(3))) == [3]
    assert cursor.offer(update(4)) is EMIT


def test_a_reset_replays_the_held_frames_that_chain_and_drops_the_stale_ones() -> None:
    cursor = verified(5)
    held = [patch(7, 8), update(6), patch(5, 6), patch(8, 9), patch(9, 10), read(HEARTBEAT)]
    assert [cursor.offer(frame) for frame in held] == [HOLD] * 5 + [EMIT]
    fresh = snapshot(8)
    emitted = cursor.reset(fresh)
    assert emitted == [fresh, held[3], held[4]]
    assert (cursor.version, cursor.repairing, cursor.held_bytes) == (10, False, 0)
    assert cursor.unrepaired == 0


def test_a_stale_frame_held_after_one_that_chains_does_not_cost_the_next() -> None:
    cursor = verified(5)
    held = [patch(8, 9), update(6), patch(9, 10)]
    assert [cursor.offer(frame) for frame in held] == [HOLD] * 3
    fresh = snapshot(8)
    assert cursor.reset(fresh) == [fresh, held[0], held[2]]
    assert (cursor.version, cursor.repairing, cursor.unrepaired) == (10, False, 0)


def test_a_reset_never_returns_still_repairing_without_saying_so() -> None:
    cursor = verified(5)
    assert cursor.offer(patch(8, 9)) is HOLD
    assert cursor.offer(update(6)) is HOLD
    fresh = snapshot(8)
    assert cursor.reset(fresh) == [fresh, patch(8, 9)]
    assert not cursor.repairing


def test_a_reset_replays_held_updates_newer_than_the_snapshot() -> None:
    cursor = verified(5)
    assert cursor.offer(patch(6, 7)) is HOLD
    assert cursor.offer(update(9)) is HOLD
    assert versions(cursor.reset(snapshot(7))) == [7, 9]
    assert cursor.version == 9


def test_a_held_frame_the_snapshot_does_not_reach_stays_held_and_the_repair_goes_on() -> None:
    # The loader is behind the publisher: the snapshot is at 6, the held patches start at 8.
    cursor = verified(5)
    first, second = patch(8, 9), patch(9, 10)
    assert cursor.offer(first) is HOLD
    assert cursor.offer(second) is HOLD
    behind = snapshot(6)
    assert cursor.reset(behind) == [behind]
    assert (cursor.version, cursor.repairing) == (6, True)
    assert cursor.held_bytes == first.size + second.size
    assert cursor.unrepaired == 0
    # Live frames meanwhile wait with them; the next snapshot, caught up, releases them all.
    third = patch(10, 11)
    assert cursor.offer(third) is HOLD
    caught_up = snapshot(8)
    assert cursor.reset(caught_up) == [caught_up, first, second, third]
    assert (cursor.version, cursor.repairing, cursor.held_bytes) == (11, False, 0)
    # Or the caller gives up: the held frames are dropped and counted.
    cursor = verified(5)
    cursor.offer(patch(8, 9))
    cursor.reset(snapshot(6))
    assert cursor.give_up() == 1
    assert (cursor.repairing, cursor.held_bytes, cursor.unrepaired) == (False, 0, 1)


def test_a_reset_sends_the_frames_that_chain_and_holds_on_at_a_gap_in_the_held_ones() -> None:
    cursor = verified(5)
    for frame in (patch(6, 7), patch(7, 8), patch(9, 10)):
        assert cursor.offer(frame) is HOLD
    assert versions(cursor.reset(snapshot(6))) == [6, 7, 8]
    # 9 -> 10 does not chain from 8: it stays held, and the repair goes on.
    assert (cursor.version, cursor.repairing, cursor.unrepaired) == (8, True, 0)
    assert cursor.held_bytes == patch(9, 10).size


def test_held_frames_are_bounded_in_bytes() -> None:
    frames = [patch(7, 8), patch(8, 9), patch(9, 10)]
    cursor = verified(5, max_held_bytes=frames[0].size + frames[1].size)
    assert cursor.offer(frames[0]) is HOLD
    assert cursor.offer(frames[1]) is HOLD
    assert cursor.held_bytes == cursor.max_held_bytes
    # Past the bound, everything held is dropped: the snapshot covers it.
    assert cursor.offer(frames[2]) is HOLD
    assert (cursor.held_bytes, cursor.unrepaired, cursor.repairing) == (0, 3, True)
    # Holding starts again after an overflow.
    assert cursor.offer(patch(10, 11)) is HOLD
    assert cursor.held_bytes == patch(10, 11).size
    assert versions(cursor.reset(snapshot(10))) == [10, 11]


def test_a_frame_larger_than_the_bound_is_never_held() -> None:
    cursor = verified(5, max_held_bytes=10)
    assert cursor.offer(patch(7, 8)) is HOLD
    assert (cursor.held_bytes, cursor.unrepaired) == (0, 1)
    assert cursor.reset(snapshot(8)) == [snapshot(8)]


def test_give_up_drops_the_held_frames_and_ends_the_repair() -> None:
    cursor = verified(5)
    assert cursor.offer(patch(7, 8)) is HOLD
    assert cursor.offer(patch(8, 9)) is HOLD
    assert cursor.give_up() == 2
    assert (cursor.repairing, cursor.held_bytes, cursor.unrepaired, cursor.version) == (
        False,
        0,
        2,
        5,
    )
    assert cursor.offer(patch(5, 6)) is EMIT  # judged again, from the version it had
    assert cursor.give_up() == 0


def test_give_up_after_a_verify_leaves_the_live_version() -> None:
    cursor = live(9)
    assert cursor.offer(update(3)) is VERIFY
    assert cursor.give_up() == 0
    assert (cursor.version, cursor.repairing) == (9, False)


# --------------------------------------------------------------------------------------------
# Property: a linear history through a lossy, duplicating, reordering channel
# --------------------------------------------------------------------------------------------


def state_at(version: int) -> dict[str, Any]:
    return {"n": version, "items": list(range(1, version + 1))}


def history_frame(version: int, as_patch: bool) -> Frame:
    """Version ``version`` of the history, as a full update or as the patch from the one before."""
    if as_patch and version > 0:
        operations = [
            {"op": "add", "path": "/items/-", "value": version},
            {"op": "replace", "path": "/n", "value": version},
        ]
        return patch(version - 1, version, operations)
    return update(version, state_at(version))


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[int, int, list[tuple[int, bool, int]], int]:
    """A history's length, the snapshot's version, and the channel's deliveries.

    Each delivery is (version, as a patch, frames delivered while a repair started at it
    loads). The final version is delivered last, after every repair.
    """
    last = draw(st.integers(1, 12))
    first = draw(st.integers(0, last - 1))
    sent = list(range(first + 1, last))
    delivered: list[int] = []
    for version in sent:
        copies = draw(st.sampled_from([0, 1, 1, 1, 2]))  # lost, delivered, duplicated
        delivered.extend([version] * copies)
    swaps = draw(st.lists(st.integers(0, max(len(delivered) - 2, 0)), max_size=6))
    for index in swaps:  # neighbours swapped: a reordering
        if index + 1 < len(delivered):
            delivered[index], delivered[index + 1] = delivered[index + 1], delivered[index]
    plan = [(v, draw(st.booleans()), draw(st.integers(0, 3))) for v in delivered]
    max_held_bytes = draw(st.sampled_from([0, 200, 400, ROOMY]))
    return last, first, plan, max_held_bytes


class Client:
    """A browser client: applies what it is sent, by the protocol, and checks each step."""

    def __init__(self, first: int) -> None:
        self.version = first
        self.state = state_at(first)
        self.versions_since_reset: list[int] = [first]

    def receive(self, frame: Frame) -> None:
        event = json.loads(frame.text)
        if frame.kind is Kind.PATCH:
            assert frame.base_version == self.version, "a patch that does not chain was sent"
            self.state = jsonpatch.apply_patch(self.state, event["patch"])
            self.versions_since_reset.append(event["version"])
        else:
            assert frame.kind is Kind.UPDATE
            self.state = copy.deepcopy(event["session"])
            if frame.reset:
                self.versions_since_reset = []
            self.versions_since_reset.append(event["version"])
        self.version = event["version"]
        assert self.state == state_at(self.version)
        ordered = self.versions_since_reset
        assert ordered == sorted(set(ordered)), "versions went down, or repeated, after a reset"


class Connection:
    """A caller of the cursor, as the hub and the middleware are: sends what it emits, and on
    ``HOLD`` or ``VERIFY`` asks the database for a snapshot, which arrives after ``lag`` more
    frames (held meanwhile) and reads a version between the ask and the arrival."""

    def __init__(self, first: int, max_held_bytes: int, data: st.DataObject) -> None:
        self.cursor = verified(first, max_held_bytes=max_held_bytes)
        self.client = Client(first)
        self.data = data
        self.published = first  # the database is written before each publish
        self.asked_at: int | None = None  # what was published when the repair was asked
        self.frames_until_loaded = 0

    def deliver(self, version: int, as_patch: bool, lag: int) -> None:
        self.published = max(self.published, version)
        verdict = self.cursor.offer(history_frame(version, as_patch))
        if verdict is EMIT:
            self.client.receive(history_frame(version, as_patch))
        elif verdict in (HOLD, VERIFY) and self.asked_at is None:
            self.asked_at, self.frames_until_loaded = self.published, lag
        elif self.asked_at is not None:
            self.frames_until_loaded -= 1
        if self.asked_at is not None and self.frames_until_loaded <= 0:
            self.load()

    def load(self) -> None:
        assert self.asked_at is not None
        version = self.data.draw(st.integers(self.asked_at, self.published), label="snapshot")
        self.asked_at = None
        for frame in self.cursor.reset(snapshot(version, state_at(version))):
            self.client.receive(frame)


@settings(max_examples=400, deadline=None)
@given(deliveries(), st.data())
def test_a_client_ends_at_the_last_version_through_loss_duplicates_and_reordering(
    plan: tuple[int, int, list[tuple[int, bool, int]], int], data: st.DataObject
) -> None:
    last, first, delivered, max_held_bytes = plan
    connection = Connection(first, max_held_bytes, data)
    for version, as_patch, lag in delivered:
        connection.deliver(version, as_patch, lag)
    if connection.asked_at is not None:
        connection.load()
    # The last version is published after every repair has loaded.
    connection.deliver(last, data.draw(st.booleans(), label="last as a patch"), lag=0)
    assert connection.asked_at is None
    assert not connection.cursor.repairing
    assert (connection.cursor.version, connection.client.version) == (last, last)
