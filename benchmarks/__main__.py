"""The benchmark suite: every part in one command, one table each, one JSON report.

::

    python -m benchmarks                        # every part, a few minutes on 2 cores
    python -m benchmarks --quick                # a smoke run, about half a minute; ratios are noise
    python -m benchmarks --parts first_frame passthrough
    python -m benchmarks --parts first_frame --profile /tmp/prof   # cProfile every server
    python -m benchmarks.token_cost --quick     # one part alone, with its own options

Parts (see each module's docstring for the method):

1. ``first_frame``: connect -> first frame, bare app vs the same app wrapped;
2. ``passthrough``: app -> client frames per second, settled and with the fence active;
3. ``snapshot_cost``: load + serialise + send on SQLite and PostgreSQL, serialisation alone;
4. ``idle_memory``: server RSS per idle connection at 1,000 connections;
5. ``mass_reconnect``: 2,000 clients at once, single-flight off vs on;
6. ``token_cost``: bytes and server CPU per streamed token as the session grows, full-state
   publishing vs patch publishing through the NATS bridge; and as the answer grows (50 to
   10,000 tokens), AnswerStream's coalesced appends vs a commit and a replace of the whole
   text per token;
7. ``fanout``: server CPU per update delivered to each of 20 and 100 sockets of one session,
   the NATS bridge vs a hand-written forwarder (a nats-py subscription per socket);
8. ``answer_load``: 20 answers streaming at once at 50 tokens/s, 5 tabs each: delivered
   tokens/s, latency, DB commits/s and server CPU per delivered token, the bridge vs the same
   forwarder.

The report goes to ``benchmarks/results/report.json`` (see :mod:`benchmarks._harness` for its
schema). The exit status is 1 if any connection failed or any frame was not the expected one;
a missed target is reported, not an error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import (
    answer_load,
    fanout,
    first_frame,
    idle_memory,
    mass_reconnect,
    passthrough,
    snapshot_cost,
    token_cost,
)
from ._harness import RESULTS, Part, main
from ._server import PROFILE_ENV

PARTS: dict[str, Part[Any]] = {
    part.name: part
    for part in (
        first_frame.PART,
        passthrough.PART,
        snapshot_cost.PART,
        idle_memory.PART,
        mass_reconnect.PART,
        token_cost.PART,
        fanout.PART,
        answer_load.PART,
    )
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The suite's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="What SessionSyncMiddleware and its bridge cost, against side-by-side "
        "baselines.",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run; its ratios are noise")
    parser.add_argument(
        "--parts", nargs="+", choices=list(PARTS), default=list(PARTS), help="parts to run"
    )
    parser.add_argument(
        "--json", type=Path, default=RESULTS / "report.json", help="where to write the report"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run every server under cProfile; write their stats in DIR",
    )
    return parser.parse_args(argv)


def run(argv: Sequence[str] | None = None) -> int:
    """Run the chosen parts in order; return the exit status."""
    args = parse_args(argv)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        os.environ[PROFILE_ENV] = str(args.profile.resolve())  # inherited by every server
    runs = [(PARTS[name], PARTS[name].configure(args.quick)) for name in args.parts]
    command = ["python", "-m", "benchmarks", *(argv if argv is not None else sys.argv[1:])]
    return main(runs, command=command, quick=args.quick, path=args.json)


if __name__ == "__main__":
    sys.exit(run())
