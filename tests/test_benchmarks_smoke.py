"""Every benchmark part runs end to end in its smallest form, so the harness cannot rot.

The e2e tests below do; the others check the harness's own rules without servers.

Each part starts its real servers (uvicorn in child processes, nats-server for the NATS parts,
SQLite for the database parts) with far less work than even ``--quick``: the figures are noise,
but every connection must succeed and every frame be the expected one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from asgi_session_sync.protocol import AnswerStatus, SessionPatch
from asgi_session_sync.streaming import Checkpoint
from benchmarks import token_cost
from benchmarks.__main__ import PARTS
from benchmarks._answers import CheckpointStore, Tab, token_ends
from benchmarks._harness import declared, measure, run_alone
from benchmarks._report import Column, Goal, Table, machine_info, summarise
from benchmarks._sessions import answer_sessions, answered_session

SMALLEST: dict[str, dict[str, Any]] = {
    "first_frame": {"connections": 6, "block": 3, "warmup": 2, "sessions": 4},
    "passthrough": {"bursts": 2, "burst": 50, "fresh": 2},
    "snapshot_cost": {
        "databases": ("sqlite",),
        "connections": {10: 2, 100: 2, 1000: 1},
        "block": 1,
        "loads": {10: 1, 100: 1, 1000: 1},
        "sessions_per_size": 1,
    },
    "idle_memory": {"connections": 10, "warmup": 2, "settle_seconds": 0.05},
    "mass_reconnect": {"clients": 20, "sessions": 5, "knee": (20, 40)},
    "token_cost": {"sizes": (10, 100), "tokens": 2, "warmup_tokens": 1, "lengths": (20, 40)},
    "fanout": {"clients": (3,), "updates": 20, "warmup_updates": 2},
    "answer_load": {"answers": 2, "tabs": 2, "tokens": 20, "warmup_tokens": 2, "token_rate": 400},
    "sse": {"connections": 6, "block": 3, "warmup": 2, "idle": 10},
}


def test_every_part_has_a_smallest_form() -> None:
    assert set(SMALLEST) == set(PARTS)


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(SMALLEST))
def test_part_runs_without_failures_and_reports_every_variant(name: str) -> None:
    part = PARTS[name]
    result = measure(part, part.configure(quick=True, **SMALLEST[name]), machine_info())

    assert result.failures == []
    assert result.data["rounds"], "no rows measured"
    assert result.data["summary"], "nothing summarised"
    assert "round(s) took" in result.text


@pytest.mark.e2e
def test_token_cost_alone_compares_full_state_and_patches_in_the_report(tmp_path: Path) -> None:
    path = tmp_path / "token_cost.json"
    argv = ["--quick", "--json", str(path), "--sizes", "10", "1000", "--tokens", "2"]
    argv += ["--warmup-tokens", "1", "--lengths", "20", "200", "--token-rate", "2000"]

    assert run_alone(token_cost.PART, argv) == 0

    report = json.loads(path.read_text())
    assert report["failures"] == []
    assert report["parts"]["token_cost"]["config"]["sizes"] == [10, 1000]
    summary = report["parts"]["token_cost"]["summary"]
    # One full-state frame of 1,000 interactions carries the whole session; a patch, one change.
    assert summary["by_size"]["1000"]["full"]["bytes_per_token"]["median"] > 1_000_000
    assert summary["by_size"]["1000"]["patch"]["bytes_per_token"]["median"] < 1_000
    # A replace carries the answer so far; an append, the tokens since the last delta.
    by_length = summary["by_length"]
    # 7.1 characters per token: the 200th replace carries 1,425 bytes of text.
    assert by_length["200"]["replace"]["bytes_per_token"]["median"] > 500
    assert by_length["200"]["append"]["bytes_per_token"]["median"] < 200
    assert by_length["200"]["replace"]["db_writes"]["median"] == 200
    figures = {t["figure"].split(":")[0] for t in report["targets"]}
    assert {"11 patches", "18 append"} <= figures


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_answer_checkpoints_commit_only_on_the_base_version_and_are_counted(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(tmp_path / "answers.sqlite3")
    try:
        await store.start("s1", 7)
        first = Checkpoint("s1", "Hel", AnswerStatus.STREAMING, version=1007, base_version=7)
        stale = Checkpoint("s1", "He", AnswerStatus.STREAMING, version=1008, base_version=7)

        assert await store.save(first) == 1007
        assert await store.save(stale) == 1007

        assert await store.row("s1") == (1007, "Hel", "streaming")
        assert store.commits["s1"] == 1
    finally:
        store.close()


def test_answer_tab_checks_its_frames_and_times_each_token_it_carried() -> None:
    snapshot = answer_sessions(1, 2)["s0000"]
    head = json.dumps({"type": "session_update", "session_id": "s0000", "version": 7})
    head = head[:-1] + f', "session": {json.dumps(snapshot.session)}}}'
    tokens = [" lorem", " ipsum", " dolor"]

    def frame(base: int, version: int, offset: int, value: str, done: bool = False) -> bytes:
        patch: list[dict[str, Any]] = [
            {"op": "append", "path": "/interactions/2/content", "offset": offset, "value": value}
        ]
        if done:
            patch.append({"op": "replace", "path": "/interactions/2/status", "value": "complete"})
        event = SessionPatch(session_id="s0000", base_version=base, version=version, patch=patch)
        return event.to_json()

    tab = Tab(ws=None, session_id="s0000", snapshot=head.encode())  # type: ignore[arg-type]
    tab.frames = [frame(7, 1007, 0, " lorem ipsum"), frame(1007, 1008, 12, " dolor", done=True)]
    tab.times = [10.0, 20.0]
    expected = answered_session(snapshot, 2, tokens)

    assert tab.problem(expected, 1008) is None
    assert tab.problem(expected, 1009) is not None  # not the answer's last version
    assert tab.latencies({("s0000", 1007): 9.0, ("s0000", 1008): 19.5}, token_ends(tokens)) == [
        1.0,
        1.0,
        0.5,
    ]
    tab.frames.reverse()
    assert tab.problem(expected, 1007) is not None  # does not chain from the snapshot


ROWS = [
    {"variant": "bare", "round": 1, "t": 100.0, "samples": 10, "errors": 0},
    {"variant": "wrapped", "round": 1, "t": 110.0, "samples": 10, "errors": 0},
    {"variant": "bare", "round": 2, "t": 200.0, "samples": 10, "errors": 0},
    {"variant": "wrapped", "round": 2, "t": 200.0, "samples": 10, "errors": 2},
]
TABLE = Table(
    "t",
    [Column("t", "t")],
    {"bare": "bare", "wrapped": "wrapped"},
    ratios=[("wrapped", "bare")],
    differences=[("wrapped", "bare")],
)


def test_ratios_are_taken_within_each_round_before_summarising() -> None:
    summary = summarise(ROWS, ["t"], pairs=[("wrapped", "bare")])["all"]

    # Per round 1.10 and 1.00; the ratio of the medians (155/150) would hide the first round.
    assert summary["ratio"]["wrapped/bare"]["t"] == {"median": 1.05, "min": 1.0, "max": 1.1}
    assert summary["difference"]["wrapped-bare"]["t"] == {"median": 5.0, "min": 0.0, "max": 10.0}
    assert summary["wrapped"]["t"]["median"] == 155.0
    assert summary["wrapped"]["errors"] == 2


def test_a_goal_judges_the_median_or_the_worst_round_and_skips_what_was_not_measured() -> None:
    ratio = Goal("ratio", "t", "t", ("wrapped", "bare"), 1.05)
    worst = Goal("worst", "t", "t", ("wrapped", "bare"), 1.05, worst=True)
    added = Goal("added", "t", "t", ("wrapped", "bare"), 4, difference=True)
    absent = Goal("absent", "t", "t", ("wrapped", "bare"), 1, group="sqlite")

    report = declared(ROWS, heading=[], tables=[TABLE], goals=[ratio, worst, added, absent])

    assert [(t.figure, t.met) for t in report.targets] == [
        ("ratio", True),
        ("worst", False),
        ("added", False),
    ]
    assert report.failures == ["round 2 variant=wrapped: 2 of 10 failed"]
    assert "wrapped / bare  1.050x (1.000-1.100)" in report.tables[0]


def test_token_cost_flags_a_resync_snapshot_inside_a_patch_stream() -> None:
    snapshot = b'{"type":"session_update","session_id":"s","version":1,"session":{"a":1}}'
    patch = b'{"type":"session_patch","session_id":"s","base_version":1,"version":2,'
    patch += b'"patch":[{"op":"replace","path":"/a","value":2}]}'
    resync = b'{"type":"session_update","session_id":"s","version":2,"session":{"a":2}}'

    chained = {"snapshot": snapshot, "frames": [patch]}
    resynced = {"snapshot": snapshot, "frames": [resync]}

    assert token_cost.check("patch", chained, {"a": 2}) is None
    assert token_cost.check("patch", chained, {"a": 3}) is not None
    assert token_cost.check("patch", resynced, {"a": 2}) is not None
