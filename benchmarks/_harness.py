"""The one runner every part goes through: options, rounds, the report, the command line.

A part states only what differs (:class:`Part`): its options, what a round measures, and its
report, declared with :func:`declared`. The harness runs the rounds in one event loop inside the
part's environment, prints a line per round, and writes the one report schema (see
``benchmarks/README.md``); ``python -m benchmarks.<part> [--quick] [--<option> V]`` runs one part.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio

from ._report import Goal, Row, Table, Target, figure, machine_info, machine_line, table
from ._server import raise_open_files_limit

RESULTS = Path(__file__).resolve().parent / "results"
OptionsT = TypeVar("OptionsT")


@dataclass
class Report:
    """A part's report: the lines above its tables, the tables, the JSON summary, the targets
    and what failed (a connection, a frame that was not the expected one)."""

    heading: list[str]
    tables: list[str]
    summary: dict[str, Any]
    targets: list[Target] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def declared(
    rows: Sequence[Row],
    *,
    heading: Sequence[str],
    tables: Sequence[Table],
    goals: Sequence[Goal] = (),
    notes: Sequence[str] = (),
) -> Report:
    """The report of a part that declares its tables and goals; ``notes`` follow the tables.

    Every row with ``errors`` is a failure, named by its round, its side and group fields and
    its ``error_kinds``.
    """
    summaries = {t.name: t.summary(rows) for t in tables}
    rendered = [t.render(summaries[t.name]) for t in tables] + ["\n".join(notes)] * bool(notes)
    targets = [target for goal in goals if (target := goal.judge(summaries)) is not None]
    named = sorted({name for t in tables for name in (t.key, *t.by)})
    failures = [
        f"round {row['round']} {' '.join(f'{n}={row[n]}' for n in named if n in row)}: "
        f"{row['errors']} of {row.get('samples', '?')} failed"
        + (f" {row['error_kinds']}" if row.get("error_kinds") else "")
        for row in rows
        if row.get("errors")
    ]
    return Report(list(heading), rendered, summaries, targets, failures)


@asynccontextmanager
async def no_environment(options: Any) -> AsyncIterator[None]:
    """The environment of a part that needs none."""
    yield None


@dataclass(frozen=True)
class Part(Generic[OptionsT]):
    """One benchmark part: only what differs from the others.

    Attributes:
        name: The part's name on the command line and in the report.
        options: A frozen dataclass of its options with ``rounds``, their defaults for a full
            run, and ``QUICK`` (a ``ClassVar``), the overrides of a smoke run.
        run_round: Measures round ``number`` (from 1) and returns its rows.
        report: Turns rows into the part's :class:`Report` (see :func:`declared`).
        progress: One line about a round's rows; by default that round's own targets.
        environment: An async context manager around all the rounds; what it yields is
            passed to ``run_round`` and ``report``.
    """

    name: str
    options: type[OptionsT]
    run_round: Callable[[int, OptionsT, Any], Awaitable[list[Row]]]
    report: Callable[[list[Row], OptionsT, Any], Report]
    progress: Callable[[list[Row]], str] | None = None
    environment: Callable[[OptionsT], Any] = no_environment

    def configure(self, quick: bool = False, **overrides: Any) -> OptionsT:
        """The part's options: defaults, then ``QUICK`` when ``quick``, then ``overrides``."""
        options: Any = self.options()
        if quick:
            options = dataclasses.replace(options, **options.QUICK)
        configured: OptionsT = dataclasses.replace(options, **overrides)
        return configured


@dataclass
class PartResult:
    """What one part hands the suite: its printed text, its JSON, its failures and targets."""

    name: str
    text: str
    data: dict[str, Any]
    failures: list[str]
    targets: list[Target]


def measure(part: Part[Any], options: Any, machine: dict[str, Any]) -> PartResult:
    """Run every round of ``part``; return its tables, its figures and its targets."""
    started, load = time.perf_counter(), [os.getloadavg()]
    rows, environment = anyio.run(_rounds, part, options)
    elapsed = time.perf_counter() - started
    load.append(os.getloadavg())
    report = part.report(rows, options, environment)
    top = [*report.heading, machine_line(machine)]
    top.append("figures: median (min-max) of rounds; ratios and differences within a round")
    end = f"{options.rounds} round(s) took {elapsed:.0f} s; load average {load[0][0]:.2f} "
    end += f"before, {load[1][0]:.2f} after"
    text = "\n\n".join(["\n".join(top), *report.tables, end])
    data = {"config": dataclasses.asdict(options), "elapsed_s": elapsed, "load_average": load}
    data |= {"summary": report.summary, "rounds": rows}
    failures = [f"{part.name}: {failure}" for failure in report.failures]
    return PartResult(part.name, text, data, failures, report.targets)


async def _rounds(part: Part[Any], options: Any) -> tuple[list[Row], Any]:
    rows: list[Row] = []
    async with part.environment(options) as environment:
        for number in range(1, options.rounds + 1):
            mine = await part.run_round(number, options, environment)
            rows.extend(mine)
            if part.progress is not None:
                line = part.progress(mine)
            else:
                targets = part.report(mine, options, environment).targets
                line = "; ".join(f"{t.figure} {shown(t)}" for t in targets)
            print(f"  {part.name} round {number}: {line or 'done'}", file=sys.stderr, flush=True)
    return rows, environment


def shown(target: Target) -> str:
    """A target's measured figure, as the targets' table prints it."""
    return figure(".3f" if target.unit == "x" else ".3g", target.unit)(target.measured)


def main(
    runs: Sequence[tuple[Part[Any], Any]], *, command: Sequence[str], quick: bool, path: Path
) -> int:
    """Run ``runs`` in order, print every table and the targets, write the report to ``path``.

    Returns the exit status: 1 if any connection failed or any frame was not the expected
    one, 130 if interrupted (the servers are stopped, nothing is written); a missed target is
    reported, not an error.
    """
    raise_open_files_limit()
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the servers and drop the data.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    machine = machine_info()
    print(f"benchmarks: {' '.join(p.name for p, _ in runs)}{' (quick)' * quick}")
    print(machine_line(machine), flush=True)
    started = time.perf_counter()
    results: list[PartResult] = []
    try:
        for part, options in runs:
            print(f"running {part.name} ...", file=sys.stderr, flush=True)
            results.append(measure(part, options, machine))
            print(f"\n{results[-1].text}\n", flush=True)
    except KeyboardInterrupt:
        print("interrupted: servers stopped, nothing written", file=sys.stderr)
        return 130
    targets = [t for result in results for t in result.targets]
    failures = [failure for result in results for failure in result.failures]
    lines = [["target", "bound", "measured: median (min-max) of rounds", "met"]]
    lines += [[t.figure, t.bound, shown(t), "met" if t.met else "MISSED"] for t in targets]
    elapsed = time.perf_counter() - started
    print(f"targets\n{table(lines)}\n" * bool(targets), end="")
    load = os.getloadavg()[0]
    print(f"took {elapsed:.0f} s; load average now {load:.2f}; {len(failures)} failure(s)")
    print("".join(f"  {failure}\n" for failure in failures), end="")
    report = {"command": list(command), "quick": quick, "machine": machine, "elapsed_s": elapsed}
    report |= {"targets": [dataclasses.asdict(t) for t in targets], "failures": failures}
    report["parts"] = {result.name: result.data for result in results}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return 1 if failures else 0


def run_alone(part: Part[Any], argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.<part>``: the part's options as flags, ``--quick``, ``--json``."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{part.name}")
    parser.add_argument("--quick", action="store_true", help="smoke run; its ratios are noise")
    parser.add_argument("--json", type=Path, default=RESULTS / f"{part.name}.json")
    defaults = part.options()
    for option in dataclasses.fields(part.options):  # type: ignore[arg-type]
        value, flag = getattr(defaults, option.name), "--" + option.name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, type=lambda v: v.lower() in ("1", "yes", "true", "on"))
        elif isinstance(value, int | float | str):
            parser.add_argument(flag, type=type(value), help=f"default {value}")
        elif isinstance(value, tuple):
            kind, shown = type(value[0]) if value else str, " ".join(map(str, value))
            parser.add_argument(flag, type=kind, nargs="+", help=f"default {shown}")
    args = parser.parse_args(argv)
    overrides = {
        option.name: tuple(v) if isinstance(v, list) else v
        for option in dataclasses.fields(part.options)  # type: ignore[arg-type]
        if (v := getattr(args, option.name, None)) is not None
    }
    command = ["python", "-m", f"benchmarks.{part.name}", *(argv or sys.argv[1:])]
    runs = [(part, part.configure(args.quick, **overrides))]
    return main(runs, command=command, quick=args.quick, path=args.json)
