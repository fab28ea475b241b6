"""Pass-through: frames per second from the app to the client, settled and in the fence window.

Two servers side by side (:mod:`benchmarks._server`, fresh every round): ``by_hand`` sends the
snapshot itself, ``wrapped`` through the middleware. After the snapshot, a client message
``burst N`` makes the app send ``N`` token frames (about 130 bytes each) as fast as it can.
The snapshot carries a version, so the middleware's version fence is armed for its default
window (256 frames, 10 s). Two cases:

- **settled**: 300 frames first (untimed) close the fence window; then timed bursts of
  ``burst`` frames: every frame of a long-lived connection;
- **fence window** (issue 20 point 3): the first 256 frames after the snapshot on fresh
  connections, the whole window. The frames carry a ``version`` but are not session events,
  so the fence must look at each one and let it pass.

The client is :class:`~benchmarks._clients.LightClient`: it takes a burst as bytes and parses
it after the clock stops, so the server, not the client, bounds the rate. A burst is timed
from sending the request to its last byte; the server's CPU seconds are read around it.
Connections and bursts rotate between the servers.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio

from ._clients import LightClient, Server, encoded_frames, rotate, running_servers
from ._harness import Part, Report, declared, run_alone
from ._report import Column, Goal, Row, Table, percentile, ratio
from ._server import token_frames

__all__ = ["PART", "PassthroughOptions"]

SIDES = {"by_hand": "by hand", "wrapped": "wrapped"}
FENCE_WINDOW, SETTLE_FRAMES = 256, 300  # the middleware's default fence_max_frames; past it
SESSION_ID = "s0000"


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


async def connected(server: Server) -> LightClient:
    """A connection whose first frame is the session's snapshot."""
    ws = await LightClient.connect(server.url(SESSION_ID))
    if not (await ws.next_text()).startswith(b'{"type":"session_update"'):
        ws.close()
        raise ConnectionError("the first frame is not the snapshot")
    return ws


async def burst(server: Server, ws: LightClient, size: int) -> dict[str, float]:
    """Ask for ``size`` frames; time them and read the server's CPU around; then parse them.

    Raises:
        ConnectionError: The frames are not the app's, in order.
    """
    expected = token_frames(SESSION_ID)[:size]
    length = len(encoded_frames(expected))
    cpu = await server.control.cpu()
    started = time.perf_counter()
    ws.send_text(f"burst {size}")
    data = await ws.receive_bytes(length)
    seconds = time.perf_counter() - started
    cpu = await server.control.cpu() - cpu
    if [bytes(frame.data).decode() for frame in ws.parse(data)] != expected:
        raise ConnectionError("frames differ")
    return {"frames": size, "seconds": seconds, "cpu": cpu}


async def run_round(number: int, options: PassthroughOptions, env: None) -> list[Row]:
    """One round on fresh servers: both cases, each after a short warm-up."""
    bursts: dict[tuple[str, str], list[dict[str, float]]] = {}
    errors: dict[tuple[str, str], Counter[str]] = {}

    async def timed(
        case: str, name: str, server: Server, ws: LightClient | None, size: int
    ) -> None:
        try:
            with anyio.fail_after(options.timeout):
                mine = ws or await connected(server)
                try:
                    bursts.setdefault((case, name), []).append(await burst(server, mine, size))
                finally:
                    if ws is None:
                        mine.close()
        except Exception as exc:
            errors.setdefault((case, name), Counter())[type(exc).__name__] += 1

    async with running_servers(list(SIDES)) as servers:
        settled: dict[str, list[LightClient]] = {name: [] for name in servers}
        try:
            for name, server in servers.items():
                for _ in range(options.settled_connections):
                    settled[name].append(await connected(server))
                    await burst(server, settled[name][-1], SETTLE_FRAMES)  # past the window
                for _ in range(5):  # warm-up
                    await timed("warm-up", name, server, None, FENCE_WINDOW)
                    await timed("warm-up", name, server, settled[name][0], options.burst)
            for turn in range(options.settled_bursts):
                for name in rotate(list(servers), turn + number):
                    ws = settled[name][turn % options.settled_connections]
                    await timed("settled", name, servers[name], ws, options.burst)
        finally:
            for ws in (ws for mine in settled.values() for ws in mine):
                ws.close()
        for turn in range(options.fence_connections):
            for name in rotate(list(servers), turn + number):
                await timed("fence window", name, servers[name], None, FENCE_WINDOW)
    rows = []
    for case in ("settled", "fence window"):
        for name in SIDES:
            mine, failed = bursts.get((case, name), []), errors.get((case, name), Counter())
            rates = [b["frames"] / b["seconds"] for b in mine]
            frames = sum(b["frames"] for b in mine)
            rows.append(
                {
                    "case": case,
                    "variant": name,
                    "round": number,
                    "samples": len(mine) + sum(failed.values()),
                    "errors": sum(failed.values()),
                    "error_kinds": dict(failed),
                    "frames_per_s_p50": percentile(rates, 50),
                    "frames_per_s_p1": percentile(rates, 1),
                    "frames_per_s_total": ratio(frames, sum(b["seconds"] for b in mine)),
                    "cpu_us_per_frame": ratio(sum(b["cpu"] for b in mine), frames) * 1e6,
                }
            )
    return rows


def report(rows: list[Row], options: PassthroughOptions, env: None) -> Report:
    """Per case: both variants and wrapped / by hand; a target on each case's p50 rate."""
    columns = [
        Column("frames/s p50", "frames_per_s_p50"),
        Column("frames/s p1 (slowest)", "frames_per_s_p1"),
        Column("frames/s overall", "frames_per_s_total"),
        Column("server CPU us/frame", "cpu_us_per_frame", ".2f"),
    ]
    table = Table("passthrough", columns, SIDES, ratios=[("wrapped", "by_hand")], by=("case",))
    goals = [
        Goal(
            f"{issue} pass-through {case}: frames/s p50 wrapped / by hand",
            "passthrough",
            "frames_per_s_p50",
            ("wrapped", "by_hand"),
            bound,
            at_most=False,
            group=case,
        )
        for issue, case, bound in (("10", "settled", 0.98), ("20.3", "fence window", 0.95))
    ]
    heading = [
        "pass-through: app -> client frames per second on one connection, by hand vs wrapped",
        f"token frames of {len(token_frames(SESSION_ID)[0])} bytes; settled: "
        f"{options.settled_bursts} bursts of {options.burst} frames over "
        f"{options.settled_connections} connection(s) past {SETTLE_FRAMES} settling frames; "
        f"fence window: {options.fence_connections} fresh connections x the first "
        f"{FENCE_WINDOW} frames after the snapshot; per variant per round; websockets' "
        "sans-I/O client reading bytes, parsed after the clock",
    ]
    return declared(rows, heading=heading, tables=[table], goals=goals)


PART = Part("passthrough", PassthroughOptions, run_round, report)

if __name__ == "__main__":
    sys.exit(run_alone(PART))
