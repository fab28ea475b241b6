"""Connect to first frame: the middleware's cost per connection, against a bare app.

Each round starts a fresh ``bare`` and ``wrapped`` server (:mod:`benchmarks._server`), each in
its own process. The bare app sends the snapshot itself right after accepting, built with the
same ``SessionUpdate`` from the same in-memory store; the wrapped app is the same app without
that line, behind ``SessionSyncMiddleware`` with a dict-lookup loader. Every client frame is
checked to be the very same JSON.

Connections are sequential, one at a time, so latency is measured, not throughput. They go in
blocks alternating between the two servers (the first variant changes every block); per
connection the time is from starting to connect to receiving the first frame, with a
``websockets`` client. Around each block the servers' CPU seconds are read, giving the server
CPU time per connection. Figures are per round; ratios are wrapped/bare within a round.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

from ._clients import first_frame, rotate, server_pair
from ._harness import Part, Report, run_alone
from ._report import Column, Row, Target, compare, comparison_table, figure, percentile, ratio
from ._sessions import memory_sessions, numbered_ids, snapshot_text

__all__ = ["PART", "FirstFrameOptions"]

TARGET = 1.05  # wrapped/bare, at p50 and at p99
VARIANTS = ("bare", "wrapped")


@dataclass(frozen=True)
class FirstFrameOptions:
    """How much to measure: connections per variant per round, in blocks of ``block``."""

    QUICK: ClassVar[dict[str, Any]] = {"rounds": 1, "connections": 100, "block": 50, "warmup": 20}

    rounds: int = 5
    connections: int = 2000
    block: int = 100
    warmup: int = 200
    sessions: int = 200
    interactions: int = 20
    timeout: float = 10.0


def expected_frames(options: FirstFrameOptions) -> dict[str, str]:
    """The snapshot frame of every session the servers hold."""
    sizes = dict.fromkeys(numbered_ids(options.sessions), options.interactions)
    return {sid: snapshot_text(sid, s) for sid, s in memory_sessions(sizes).items()}


async def run_round(number: int, options: FirstFrameOptions, env: None) -> list[Row]:
    """One round on fresh servers: warm both up, then alternate blocks of connections."""
    expected = expected_frames(options)
    ids = list(expected)
    totals: dict[str, list[float]] = {v: [] for v in VARIANTS}
    opened: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu = dict.fromkeys(VARIANTS, 0.0)
    errors: dict[str, Counter[str]] = {v: Counter() for v in VARIANTS}
    sessions = ["--sessions", str(options.sessions), "--interactions", str(options.interactions)]
    async with server_pair(VARIANTS, *sessions) as servers:

        async def connect_block(variant: str, start: int, count: int, record: bool) -> None:
            server = servers[variant]
            for i in range(start, start + count):
                sid = ids[i % len(ids)]
                try:
                    result = await first_frame(server.url(sid), bound=options.timeout)
                except Exception as exc:
                    errors[variant][type(exc).__name__] += 1
                    continue
                if result.text != expected[sid]:
                    errors[variant]["unexpected first frame"] += 1
                elif record:
                    totals[variant].append(result.total)
                    opened[variant].append(result.opened)

        for variant in VARIANTS:
            await connect_block(variant, 0, options.warmup, record=False)
        for block in range(options.connections // options.block):
            for variant in rotate(VARIANTS, block + number):
                before = await servers[variant].control.cpu()
                await connect_block(variant, block * options.block, options.block, record=True)
                cpu[variant] += await servers[variant].control.cpu() - before
    return [
        {
            "variant": v,
            "round": number,
            "samples": len(totals[v]) + sum(errors[v].values()),
            "errors": sum(errors[v].values()),
            "error_kinds": dict(errors[v]),
            "p50_us": percentile(totals[v], 50) * 1e6,
            "p90_us": percentile(totals[v], 90) * 1e6,
            "p99_us": percentile(totals[v], 99) * 1e6,
            "open_p50_us": percentile(opened[v], 50) * 1e6,
            "server_cpu_us_per_connection": cpu[v] / max(1, len(totals[v])) * 1e6,
        }
        for v in VARIANTS
    ]


def progress(rows: list[Row]) -> str:
    """p50 of both variants and their ratio, and the p99 ratio."""
    bare, wrapped = rows
    return (
        f"p50 bare {bare['p50_us']:.0f} us, wrapped {wrapped['p50_us']:.0f} us "
        f"({ratio(wrapped['p50_us'], bare['p50_us']):.3f}x); "
        f"p99 {ratio(wrapped['p99_us'], bare['p99_us']):.3f}x"
    )


WHOLE = figure(".0f")
COLUMNS = [
    Column("p50 us", "p50_us", WHOLE),
    Column("p90 us", "p90_us", WHOLE),
    Column("p99 us", "p99_us", WHOLE),
    Column("p50 handshake us", "open_p50_us", WHOLE),
    Column("server CPU us/conn", "server_cpu_us_per_connection", WHOLE),
]


def report(rows: list[Row], options: FirstFrameOptions, env: None) -> Report:
    """wrapped/bare and wrapped-bare of every figure; the p50 and p99 targets."""
    summary = compare(
        rows,
        [c.figure for c in COLUMNS],
        baseline="bare",
        candidate="wrapped",
        difference=True,
    )["all"]
    ratios = summary["ratio"]
    targets = [
        Target(
            f"1. connect->first frame {q} wrapped/bare",
            f"<= {TARGET}",
            ratios[f"{q}_us"],
            ratios[f"{q}_us"]["median"] <= TARGET,
        )
        for q in ("p50", "p99")
    ]
    failures = [
        f"first frame: {summary[v]['errors']} {v} connection(s) failed or got another frame"
        for v in VARIANTS
        if summary[v]["errors"]
    ]
    snapshot = next(iter(expected_frames(FirstFrameOptions(sessions=1)).values()))
    heading = [
        "1. connect -> first frame: bare app sending the snapshot by hand vs the same app "
        "wrapped (in-memory loader)",
        f"{options.connections} sequential connections per variant per round, blocks of "
        f"{options.block} alternating, {options.rounds} round(s), {options.warmup} warm-up "
        f"connections each; snapshot {options.interactions} interactions ({len(snapshot)}"
        " bytes); websockets client, no compression",
    ]
    table = comparison_table(
        {"all": summary},
        COLUMNS,
        sides={"bare": "bare", "wrapped": "wrapped"},
        ratio_label="wrapped / bare",
        difference_format=figure("+.0f"),
    )
    return Report(heading, [table], summary, targets, failures)


PART = Part(
    name="first_frame",
    options=FirstFrameOptions,
    run_round=run_round,
    progress=progress,
    report=report,
)

if __name__ == "__main__":
    sys.exit(run_alone(PART))
