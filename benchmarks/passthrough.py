"""Pass-through: frames per second from the app to the client, settled and in the fence window.

``burst N`` makes the app send ``N`` token frames of 130 bytes after the snapshot. **settled**:
bursts on connections past the fence window; **fence window** (issue 20 point 3): the first 256
frames after the snapshot, each looked at by the fence. A :class:`~benchmarks._clients.LightClient`
reads each burst as bytes, parsed after the clock, so the server bounds the rate.
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

SIDES = {"by_hand": "by hand", "wrapped": "wrapped"}
WINDOW, SETTLE = 256, 300  # the middleware's default fence_max_frames; frames past it
SESSION = "s0000"


@dataclass(frozen=True)
class PassthroughOptions:
    """How much to measure, per variant per round."""

    QUICK: ClassVar[dict[str, Any]] = {"rounds": 1, "bursts": 4, "burst": 500, "fresh": 10}

    rounds: int = 5
    settled: int = 2  # connections
    bursts: int = 40
    burst: int = 2000
    fresh: int = 120  # connections, each timing the fence window
    timeout: float = 30.0


async def connected(server: Server) -> LightClient:
    """A connection whose first frame is the session's snapshot."""
    ws = await LightClient.connect(server.url(SESSION))
    if not (await ws.next_text()).startswith(b'{"type":"session_update"'):
        ws.close()
        raise ConnectionError("the first frame is not the snapshot")
    return ws


async def burst(server: Server, ws: LightClient, size: int) -> tuple[float, float]:
    """Ask for ``size`` frames: the seconds they took and the server's CPU seconds meanwhile.

    Raises:
        ConnectionError: The frames, parsed after the clock, are not the app's in order.
    """
    expected = token_frames(SESSION)[:size]
    length = len(encoded_frames(expected))
    cpu, started = await server.control.cpu(), time.perf_counter()
    ws.send_text(f"burst {size}")
    data = await ws.receive_bytes(length)
    seconds, cpu = time.perf_counter() - started, await server.control.cpu() - cpu
    if [frame.data.decode() for frame in ws.parse(data)] != expected:
        raise ConnectionError("frames differ")
    return seconds, cpu


async def run_round(number: int, options: PassthroughOptions, env: None) -> list[Row]:
    """One round on fresh servers: both cases, after a short warm-up of each."""
    got: dict[tuple[str, str], list[tuple[float, float]]] = {}
    errors: dict[tuple[str, str], Counter[str]] = {}

    async def timed(case: str, server: Server, ws: LightClient | None, size: int) -> None:
        try:
            with anyio.fail_after(options.timeout):
                mine = ws or await connected(server)
                try:
                    got.setdefault((case, server.variant), []).append(
                        await burst(server, mine, size)
                    )
                finally:
                    if ws is None:
                        mine.close()
        except Exception as exc:
            errors.setdefault((case, server.variant), Counter())[type(exc).__name__] += 1

    async with running_servers(list(SIDES)) as servers:
        settled = {
            name: [await connected(s) for _ in range(options.settled)]
            for name, s in servers.items()
        }
        try:
            for name, server in servers.items():
                for ws in settled[name]:
                    await timed("warm-up", server, ws, SETTLE)  # past the fence window
                for _ in range(5):
                    await timed("warm-up", server, None, WINDOW)
            for turn in range(options.bursts):
                for name in rotate(list(servers), turn + number):
                    ws = settled[name][turn % options.settled]
                    await timed("settled", servers[name], ws, options.burst)
        finally:
            for ws in (ws for mine in settled.values() for ws in mine):
                ws.close()
        for turn in range(options.fresh):
            for name in rotate(list(servers), turn + number):
                await timed("fence window", servers[name], None, WINDOW)
    rows = []
    for case, name in [(case, name) for case in ("settled", "fence window") for name in SIDES]:
        mine, failed = got.get((case, name), []), errors.get((case, name), Counter())
        rates = [(options.burst if case == "settled" else WINDOW) / s for s, _ in mine]
        frames = len(mine) * (options.burst if case == "settled" else WINDOW)
        rows.append(
            {
                "case": case,
                "variant": name,
                "round": number,
                "samples": len(mine) + failed.total(),
                "errors": failed.total(),
                "error_kinds": dict(failed),
                "frames_per_s_p50": percentile(rates, 50),
                "frames_per_s_p1": percentile(rates, 1),
                "frames_per_s_total": ratio(frames, sum(s for s, _ in mine)),
                "cpu_us_per_frame": ratio(sum(c for _, c in mine), frames) * 1e6,
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
    table = Table("passthrough", columns, SIDES, [("wrapped", "by_hand")], by=("case",))
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
        f"token frames of {len(token_frames(SESSION)[0])} bytes; settled: {options.bursts} bursts "
        f"of {options.burst} over {options.settled} connection(s) past {SETTLE} frames; fence "
        f"window: the first {WINDOW} frames of {options.fresh} fresh connections; per variant",
    ]
    return declared(rows, heading=heading, tables=[table], goals=goals)


PART = Part("passthrough", PassthroughOptions, run_round, report)

if __name__ == "__main__":
    sys.exit(run_alone(PART))
