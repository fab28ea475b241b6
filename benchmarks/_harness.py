"""The one runner every benchmark part goes through: options, rounds, the report, the command line.

A part states only what differs (see :class:`Part`): its options, what one round measures, a
line of progress per round, and how its rows become tables and targets. The harness runs the
rounds inside one event loop (around the part's optional environment: a seeded database, a
broker), times them, adds the machine, and writes the one report schema::

    {"command": [...], "quick": bool, "machine": {...}, "elapsed_s": float,
     "targets": [{"figure", "bound", "measured", "met"}], "failures": [...],
     "parts": {name: {"config": {...}, "elapsed_s": float, "summary": {...}, "rounds": [...]}}}

Every part runs alone as ``python -m benchmarks.<part> [--quick] [--json PATH] [--<option> V]``,
its options being the fields of its options dataclass; ``python -m benchmarks`` runs them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import anyio

from ._report import PartResult, Row, Target, figure, machine_info, machine_line, table
from ._server import raise_open_files_limit

__all__ = ["RESULTS", "Options", "Part", "Report", "main", "measure", "run_alone", "write_report"]

RESULTS = Path(__file__).resolve().parent / "results"


class Options(Protocol):
    """What every part's options have: a frozen dataclass with ``rounds`` and ``QUICK``.

    ``QUICK`` (a ``ClassVar``) holds the overrides of a smoke run.
    """

    @property
    def rounds(self) -> int:
        """Rounds to run; each one measures every variant side by side."""


OptionsT = TypeVar("OptionsT", bound=Options)


@dataclass
class Report:
    """How a part presents its rows: the lines above its tables, the tables, the JSON summary."""

    heading: list[str]
    tables: list[str]
    summary: dict[str, Any]
    targets: list[Target] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)


@asynccontextmanager
async def no_environment(options: Any) -> AsyncIterator[None]:
    """The environment of a part that needs none."""
    yield None


@dataclass(frozen=True)
class Part(Generic[OptionsT]):
    """One benchmark part: only what differs from the others.

    Attributes:
        name: The part's name on the command line and in the report (``first_frame``).
        options: Its options, a frozen dataclass with defaults for a full run and ``QUICK``,
            the overrides of a smoke run.
        run_round: Measures round ``number`` (1-based) and returns its rows.
        progress: One line about a round's rows, printed to stderr as the rounds run.
        report: Turns every round's rows into the part's :class:`Report`.
        environment: An async context manager around all the rounds (a database, a broker);
            what it yields is passed to ``run_round`` and ``report``.
    """

    name: str
    options: type[OptionsT]
    run_round: Callable[[int, OptionsT, Any], Awaitable[list[Row]]]
    progress: Callable[[list[Row]], str]
    report: Callable[[list[Row], OptionsT, Any], Report]
    environment: Callable[[OptionsT], Any] = no_environment

    def configure(self, quick: bool = False, **overrides: Any) -> OptionsT:
        """The part's options: defaults, then ``QUICK`` when ``quick``, then ``overrides``."""
        options: Any = self.options()
        if quick:
            options = dataclasses.replace(options, **options.QUICK)
        configured: OptionsT = dataclasses.replace(options, **overrides)
        return configured


def measure(part: Part[OptionsT], options: OptionsT, machine: dict[str, Any]) -> PartResult:
    """Run every round of ``part``; return its tables, its figures and its targets."""
    started = time.perf_counter()
    rows, environment = anyio.run(_rounds, part, options)
    elapsed = time.perf_counter() - started
    report = part.report(rows, options, environment)
    text = "\n\n".join(
        [
            "\n".join(
                [
                    *report.heading,
                    machine_line(machine),
                    "figures: median (min-max) across rounds; ratios are taken within a round",
                ]
            ),
            *report.tables,
            f"{options.rounds} round(s) took {elapsed:.0f} s",
        ]
    )
    return PartResult(
        name=part.name,
        text=text,
        data={
            "config": dataclasses.asdict(options),  # type: ignore[call-overload]
            "elapsed_s": elapsed,
            "summary": report.summary,
            "rounds": rows,
        },
        failures=report.failures,
        targets=report.targets,
    )


async def _rounds(part: Part[OptionsT], options: OptionsT) -> tuple[list[Row], Any]:
    rows: list[Row] = []
    async with part.environment(options) as environment:
        for number in range(1, options.rounds + 1):
            mine = await part.run_round(number, options, environment)
            rows.extend(mine)
            print(
                f"  {part.name} round {number}: {part.progress(mine)}", file=sys.stderr, flush=True
            )
    return rows, environment


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


def write_report(
    path: Path,
    results: Sequence[PartResult],
    *,
    command: Sequence[str],
    quick: bool,
    machine: dict[str, Any],
    elapsed: float,
) -> None:
    """Write the one report schema (see the module's docstring) to ``path``."""
    report = {
        "command": list(command),
        "quick": quick,
        "machine": machine,
        "elapsed_s": elapsed,
        "targets": [dataclasses.asdict(t) for result in results for t in result.targets],
        "failures": [failure for result in results for failure in result.failures],
        "parts": {result.name: result.data for result in results},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def main(
    runs: Sequence[tuple[Part[Any], Any]],
    *,
    command: Sequence[str],
    quick: bool,
    path: Path,
) -> int:
    """Run ``runs`` in order, print every table and the targets, write the report.

    Returns the exit status: 1 if any connection failed or any frame was not the expected
    one, 130 if interrupted (the servers are stopped, nothing is written); a missed target is
    reported, not an error.
    """
    raise_open_files_limit()
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the servers and drop the data.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    machine = machine_info()
    print(f"benchmarks: {' '.join(p.name for p, _ in runs)}{' (quick)' if quick else ''}")
    print(machine_line(machine), flush=True)
    started = time.perf_counter()
    results: list[PartResult] = []
    try:
        for part, options in runs:
            print(f"running {part.name} ...", file=sys.stderr, flush=True)
            result = measure(part, options, machine)
            results.append(result)
            print(f"\n{result.text}\n", flush=True)
    except KeyboardInterrupt:
        print("interrupted: servers stopped, nothing written", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - started
    failures = [failure for result in results for failure in result.failures]
    if any(result.targets for result in results):
        print(f"targets\n{format_targets(results)}\n")
    print(f"took {elapsed:.0f} s; {len(failures)} failure(s)")
    for failure in failures:
        print(f"  {failure}")
    write_report(path, results, command=command, quick=quick, machine=machine, elapsed=elapsed)
    print(f"wrote {path}")
    return 1 if failures else 0


def run_alone(part: Part[Any], argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.<part>``: the part's options as flags, ``--quick``, ``--json``."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{part.name}")
    parser.add_argument("--quick", action="store_true", help="smoke run; its ratios are noise")
    parser.add_argument(
        "--json", type=Path, default=RESULTS / f"{part.name}.json", help="report path"
    )
    defaults = part.options()
    for option in dataclasses.fields(part.options):
        value = getattr(defaults, option.name)
        flag = "--" + option.name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, type=lambda v: v.lower() in ("1", "yes", "true", "on"))
        elif isinstance(value, int | float | str):
            parser.add_argument(flag, type=type(value), help=f"default {value}")
        elif isinstance(value, tuple):
            kind = type(value[0]) if value else str
            shown = " ".join(map(str, value))
            parser.add_argument(flag, type=kind, nargs="+", help=f"default {shown}")
    args = parser.parse_args(argv)
    overrides = {
        option.name: tuple(v) if isinstance(v, list) else v
        for option in dataclasses.fields(part.options)
        if (v := getattr(args, option.name, None)) is not None
    }
    options = part.configure(args.quick, **overrides)
    command = ["python", "-m", f"benchmarks.{part.name}", *(argv or sys.argv[1:])]
    return main([(part, options)], command=command, quick=args.quick, path=args.json)
