"""The benchmark suite: the middleware's overhead against a bare app, and the mass reconnect.

One command runs every part, prints one table per part and a summary of the targets, and
writes every figure with the machine it ran on to ``benchmarks/results/report.json``::

    python -m benchmarks                        # the full suite, about 2 minutes on 2 cores
    python -m benchmarks --quick                # a smoke run, under a minute; ratios are noise
    python -m benchmarks --parts first_frame passthrough
    python -m benchmarks --parts first_frame --profile /tmp/prof   # cProfile both servers

Parts (see each module's docstring for the method):

1. ``first_frame``: connect -> first frame, bare app vs the same app wrapped;
2. ``passthrough``: app -> client frames per second, settled and with the fence active;
3. ``snapshot_cost``: load + serialise + send on SQLite and PostgreSQL, serialisation alone;
4. ``idle_memory``: server RSS per idle connection at 1,000 connections;
5. ``mass_reconnect``: 2,000 clients at once, single-flight off vs on.

The exit status is 1 if any connection failed or any frame was not the expected one; a missed
target is reported, not an error.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import first_frame, idle_memory, mass_reconnect, passthrough, snapshot_cost
from ._overhead_server import PROFILE_ENV
from ._report import PartResult, figure, machine_info, machine_line, table
from ._serving import raise_open_files_limit

RESULTS = Path(__file__).resolve().parent / "results" / "report.json"


def run_first_frame(quick: bool, machine: dict[str, Any]) -> PartResult:
    options = first_frame.FirstFrameOptions()
    if quick:
        options = first_frame.FirstFrameOptions(rounds=2, connections=200, block=50, warmup=50)
    return first_frame.measure(options, machine)


def run_passthrough(quick: bool, machine: dict[str, Any]) -> PartResult:
    options = passthrough.PassthroughOptions()
    if quick:
        options = passthrough.PassthroughOptions(rounds=2, settled_bursts=6, fence_connections=20)
    return passthrough.measure(options, machine)


def run_snapshot_cost(quick: bool, machine: dict[str, Any]) -> PartResult:
    options = snapshot_cost.SnapshotCostOptions()
    if quick:
        options = snapshot_cost.SnapshotCostOptions(
            rounds=1,
            connections={10: 20, 100: 10, 1000: 4},
            block=2,
            loads={10: 5, 100: 3, 1000: 2},
            serialise_rounds=2,
            serialise_calls={10: 200, 100: 50, 1000: 10},
        )
    return snapshot_cost.measure(options, machine)


def run_idle_memory(quick: bool, machine: dict[str, Any]) -> PartResult:
    options = idle_memory.IdleMemoryOptions(rounds=1 if quick else 3)
    return idle_memory.measure(options, machine)


def run_mass_reconnect(quick: bool, machine: dict[str, Any]) -> PartResult:
    return mass_reconnect.measure(mass_reconnect.parse_args(["--quick"] if quick else []), machine)


PARTS: dict[str, Callable[[bool, dict[str, Any]], PartResult]] = {
    "first_frame": run_first_frame,
    "passthrough": run_passthrough,
    "snapshot_cost": run_snapshot_cost,
    "idle_memory": run_idle_memory,
    "mass_reconnect": run_mass_reconnect,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The suite's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Overhead of SessionSyncMiddleware against a bare app, and mass reconnect.",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    parser.add_argument(
        "--parts", nargs="+", choices=list(PARTS), default=list(PARTS), help="parts to run"
    )
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write the report")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run the bare and wrapped servers under cProfile; write their stats in DIR",
    )
    return parser.parse_args(argv)


def format_targets(results: Sequence[PartResult]) -> str:
    """Every target of the parts that ran: the bound, the measured ratio, met or missed."""
    times = figure(".3f", "x")
    rows = [["target", "bound", "measured: median (min-max) of rounds", "met"]]
    for result in results:
        for target in result.targets:
            rows.append(
                [target.figure, target.bound, times(target.measured), "yes" if target.met else "NO"]
            )
    return table(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen parts in order, print their tables, write the report; return the status."""
    args = parse_args(argv)
    raise_open_files_limit()
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the servers and drop the data.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        os.environ[PROFILE_ENV] = str(args.profile.resolve())  # inherited by every server
    machine = machine_info()
    print(f"benchmarks: {' '.join(args.parts)}{' (quick)' if args.quick else ''}")
    print(machine_line(machine), flush=True)
    started = time.perf_counter()
    results: list[PartResult] = []
    try:
        for name in args.parts:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            result = PARTS[name](args.quick, machine)
            results.append(result)
            print(f"\n{result.text}\n", flush=True)
    except KeyboardInterrupt:
        print("interrupted: servers stopped, nothing written", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - started
    failures = [failure for result in results for failure in result.failures]
    if any(result.targets for result in results):
        print(f"targets\n{format_targets(results)}\n")
    print(f"suite took {elapsed:.0f} s; {len(failures)} failure(s)")
    for failure in failures:
        print(f"  {failure}")
    report = {
        "command": ["python", "-m", "benchmarks", *(argv if argv is not None else sys.argv[1:])],
        "quick": args.quick,
        "machine": machine,
        "elapsed_s": elapsed,
        "targets": [
            {
                "figure": target.figure,
                "bound": target.bound,
                "measured": target.measured,
                "met": target.met,
            }
            for result in results
            for target in result.targets
        ],
        "failures": failures,
        "parts": {result.name: result.data for result in results},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
