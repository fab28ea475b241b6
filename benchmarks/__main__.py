"""The benchmark suite: every part in one command, one table each, one JSON report.

``python -m benchmarks [--quick] [--parts P ...] [--json PATH] [--profile DIR]``; one part alone:
``python -m benchmarks.<part> [--quick] [--<option> V]``. ``benchmarks/README.md`` says what each
part measures and how. The exit status is 1 if a connection failed or a frame was not the
expected one; a missed target is reported, not an error.
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
    sse,
    token_cost,
)
from ._harness import RESULTS, Part, main
from ._server import PROFILE_ENV

MODULES = (first_frame, passthrough, snapshot_cost, idle_memory, mass_reconnect, sse)
MODULES += (token_cost, fanout, answer_load)
PARTS: dict[str, Part[Any]] = {module.PART.name: module.PART for module in MODULES}


def run(argv: Sequence[str] | None = None) -> int:
    """Run the chosen parts in order; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="smoke run; its ratios are noise")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--json", type=Path, default=RESULTS / "report.json")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="cProfile every server")
    args = parser.parse_args(argv)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        os.environ[PROFILE_ENV] = str(args.profile.resolve())  # inherited by every server
    runs = [(PARTS[name], PARTS[name].configure(args.quick)) for name in args.parts]
    command = ["python", "-m", "benchmarks", *(argv if argv is not None else sys.argv[1:])]
    return main(runs, command=command, quick=args.quick, path=args.json)


if __name__ == "__main__":
    sys.exit(run())
