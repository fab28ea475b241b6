"""Pass-through: frames per second from the app to the client, wrapped vs bare.

The same servers as the first-frame part (:mod:`benchmarks._server`): after the
snapshot, a client message ``burst N`` makes the app send ``N`` token frames (about 130 bytes
each) as fast as it can. The snapshot carries a version, so the middleware's version fence is
armed for the default window (256 frames, 10 s). Two cases:

- **settled**: 300 frames first (untimed), which closes the fence window; then timed bursts.
  This is every frame of a long-lived connection.
- **fence active**: the first 256 frames after the snapshot, the whole fence window. The frames
  carry a ``version`` but are not of a fenced type, so the fence parses every one of them and
  lets it pass: the costliest case for a frame the client receives.

The client is :class:`~benchmarks._clients.RawWebSocket`: it reads the burst as raw bytes and
compares them with the expected frames after the clock stops, so the server bounds the rate.
Each burst is timed from sending the request to its last byte received; the servers' CPU
seconds are read around each burst. Connections alternate between the two servers.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio

from ._clients import RawWebSocket, Server, encoded_frames, rotate, server_pair
from ._harness import Part, Report, run_alone
from ._report import Column, Row, Target, compare, comparison_table, figure, percentile, ratio
from ._server import PREFIX, token_frames
from ._sessions import memory_sessions, snapshot_text

__all__ = ["PART", "PassthroughOptions"]

TARGET = 0.98  # wrapped/bare frames per second
CASES = ("settled", "fence active")
FENCE_WINDOW = 256  # the middleware's default fence_max_frames
SETTLE_FRAMES = 300
SESSION_ID = "s0000"
VARIANTS = ("bare", "wrapped")


@dataclass(frozen=True)
class PassthroughOptions:
    """How much to measure, per variant per round."""

    QUICK: ClassVar[dict[str, Any]] = {
        "rounds": 1,
        "settled_bursts": 4,
        "burst": 500,
        "fence_connections": 10,
    }

    rounds: int = 5
    settled_connections: int = 2
    settled_bursts: int = 40
    burst: int = 2000
    fence_connections: int = 120
    timeout: float = 30.0


@dataclass
class Burst:
    """One timed burst: frames, seconds, the server's CPU seconds, and whether it was intact."""

    frames: int
    seconds: float
    server_cpu: float
    ok: bool


async def open_connection(server: Server, expected_snapshot: str) -> RawWebSocket:
    """A connection whose first frame was checked to be the snapshot."""
    ws = await RawWebSocket.connect(server.process.port, PREFIX + SESSION_ID)
    try:
        if await ws.receive_text() != expected_snapshot:
            raise AssertionError("the first frame is not the snapshot")
    except BaseException:
        await ws.close()
        raise
    return ws


async def timed_burst(server: Server, ws: RawWebSocket, size: int) -> Burst:
    """Ask for ``size`` frames; time them, read the server's CPU around, check the bytes."""
    expected = encoded_frames(token_frames(SESSION_ID)[:size])
    cpu_before = await server.control.cpu()
    started = time.perf_counter()
    ws.send_text(f"burst {size}")
    received = await ws.receive_exactly(len(expected))
    seconds = time.perf_counter() - started
    cpu = await server.control.cpu() - cpu_before
    return Burst(size, seconds, cpu, received == expected)


class Tally:
    """The bursts and errors of each case and variant in one round."""

    def __init__(self) -> None:
        self.bursts: dict[tuple[str, str], list[Burst]] = {
            (case, v): [] for case in CASES for v in VARIANTS
        }
        self.errors: dict[tuple[str, str], Counter[str]] = {
            (case, v): Counter() for case in CASES for v in VARIANTS
        }

    def add(self, case: str, variant: str, burst: Burst) -> None:
        """Keep an intact burst; count one whose bytes were not the expected frames."""
        if burst.ok:
            self.bursts[case, variant].append(burst)
        else:
            self.errors[case, variant]["frames differ"] += 1

    def rows(self, number: int) -> list[Row]:
        """Each case and variant's figures for this round."""
        rows = []
        for (case, variant), mine in self.bursts.items():
            rates = [b.frames / b.seconds for b in mine]
            frames = sum(b.frames for b in mine)
            errors = self.errors[case, variant]
            rows.append(
                {
                    "case": case,
                    "variant": variant,
                    "round": number,
                    "samples": len(mine) + sum(errors.values()),
                    "frames": frames,
                    "errors": sum(errors.values()),
                    "error_kinds": dict(errors),
                    "frames_per_s_p50": percentile(rates, 50),
                    "frames_per_s_p1": percentile(rates, 1),
                    "frames_per_s_total": ratio(frames, sum(b.seconds for b in mine)),
                    "server_cpu_us_per_frame": ratio(sum(b.server_cpu for b in mine), frames) * 1e6,
                }
            )
        return rows


async def run_settled(
    servers: dict[str, Server], number: int, options: PassthroughOptions, tally: Tally
) -> None:
    """Settled connections on both servers, then timed bursts alternating between them."""
    snapshot = snapshot_text(SESSION_ID, memory_sessions({SESSION_ID: 20})[SESSION_ID])
    connections: dict[str, list[RawWebSocket]] = {v: [] for v in VARIANTS}
    try:
        for variant in VARIANTS:
            for _ in range(options.settled_connections):
                ws = await open_connection(servers[variant], snapshot)
                connections[variant].append(ws)
                # Past the fence window, untimed: from here on every frame is a settled one.
                settle = await timed_burst(servers[variant], ws, SETTLE_FRAMES)
                if not settle.ok:
                    raise AssertionError("settling frames differ")
        for turn in range(options.settled_bursts):
            for variant in rotate(VARIANTS, turn + number):
                ws = connections[variant][turn % options.settled_connections]
                try:
                    with anyio.fail_after(options.timeout):
                        burst = await timed_burst(servers[variant], ws, options.burst)
                except Exception as exc:
                    tally.errors["settled", variant][type(exc).__name__] += 1
                    continue
                tally.add("settled", variant, burst)
    finally:
        for mine in connections.values():
            for ws in mine:
                await ws.close()


async def run_fence_active(
    servers: dict[str, Server], number: int, options: PassthroughOptions, tally: Tally
) -> None:
    """Fresh connections alternating between the servers, each timing the fence window."""
    snapshot = snapshot_text(SESSION_ID, memory_sessions({SESSION_ID: 20})[SESSION_ID])
    for turn in range(options.fence_connections):
        for variant in rotate(VARIANTS, turn + number):
            try:
                with anyio.fail_after(options.timeout):
                    ws = await open_connection(servers[variant], snapshot)
                    try:
                        burst = await timed_burst(servers[variant], ws, FENCE_WINDOW)
                    finally:
                        await ws.close()
            except Exception as exc:
                tally.errors["fence active", variant][type(exc).__name__] += 1
                continue
            tally.add("fence active", variant, burst)


async def run_round(number: int, options: PassthroughOptions, env: None) -> list[Row]:
    """One round on fresh servers: a warm-up, then both cases."""
    async with server_pair(VARIANTS) as servers:
        warm_up = PassthroughOptions(
            settled_connections=1, settled_bursts=2, fence_connections=5, timeout=options.timeout
        )
        await run_settled(servers, number, warm_up, Tally())
        await run_fence_active(servers, number, warm_up, Tally())
        tally = Tally()
        await run_settled(servers, number, options, tally)
        await run_fence_active(servers, number, options, tally)
    return tally.rows(number)


def progress(rows: list[Row]) -> str:
    """wrapped/bare frames per second (p50) of each case."""
    rate = {(r["case"], r["variant"]): r["frames_per_s_p50"] for r in rows}
    return ", ".join(
        f"{case} {ratio(rate[case, 'wrapped'], rate[case, 'bare']):.3f}x" for case in CASES
    )


WHOLE = figure(",.0f")
COLUMNS = [
    Column("frames/s p50", "frames_per_s_p50", WHOLE),
    Column("frames/s p1 (slowest)", "frames_per_s_p1", WHOLE),
    Column("frames/s overall", "frames_per_s_total", WHOLE),
    Column("server CPU us/frame", "server_cpu_us_per_frame", figure(".2f")),
]


def report(rows: list[Row], options: PassthroughOptions, env: None) -> Report:
    """Per case: both variants and wrapped/bare; the target on the p50 rate of each case."""
    summary = compare(
        rows, [c.figure for c in COLUMNS], baseline="bare", candidate="wrapped", by=("case",)
    )
    targets = [
        Target(
            f"2. pass-through {case} frames/s p50 wrapped/bare",
            f">= {TARGET}",
            summary[case]["ratio"]["frames_per_s_p50"],
            summary[case]["ratio"]["frames_per_s_p50"]["median"] >= TARGET,
        )
        for case in CASES
    ]
    failures = [
        f"pass-through {case}: {summary[case][v]['errors']} {v} error(s)"
        for case in CASES
        for v in VARIANTS
        if summary[case][v]["errors"]
    ]
    heading = [
        "2. pass-through: app -> client frames per second on one connection, bare vs wrapped",
        f"token frames of {len(token_frames(SESSION_ID)[0])} bytes; settled: "
        f"{options.settled_bursts} burst(s) of {options.burst} frames over "
        f"{options.settled_connections} connection(s), each past {SETTLE_FRAMES} settling "
        f"frames; fence active: {options.fence_connections} connection(s) x the first "
        f"{FENCE_WINDOW} frames after the snapshot (each one parsed by the fence); per variant "
        f"per round, {options.rounds} round(s); raw client reading bytes, no compression; "
        "rates are per burst",
    ]
    table = comparison_table(
        summary,
        COLUMNS,
        sides={"bare": "bare", "wrapped": "wrapped"},
        ratio_label="wrapped / bare",
        group_title="case",
    )
    return Report(heading, [table], summary, targets, failures)


PART = Part(
    name="passthrough",
    options=PassthroughOptions,
    run_round=run_round,
    progress=progress,
    report=report,
)

if __name__ == "__main__":
    sys.exit(run_alone(PART))
