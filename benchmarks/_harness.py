"""The one runner every benchmark part goes through: options, rounds, the report, the command line.

A part states only what differs (see :class:`Part`): its options, what one round measures, and
its report, which most parts declare with :func:`declared` (a heading, :class:`Table` s and
:class:`Goal` s). The harness runs the rounds inside one event loop (around the part's optional
environment: a seeded database, a broker), prints a progress line per round, times them, adds
the machine and the load average, and writes the one report schema::

    {"command": [...], "quick": bool, "machine": {...}, "elapsed_s": float,
     "targets": [{"figure", "bound", "measured", "met", "unit"}], "failures": [...],
     "parts": {name: {"config": {...}, "elapsed_s": float, "load_average": [before, after],
                      "summary": {...}, "rounds": [...]}}}

Every part runs alone as ``python -m benchmarks.<part> [--quick] [--json PATH] [--<option> V]``,
its options being the fields of its options dataclass; ``python -m benchmarks`` runs them all.
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
from typing import Any, Generic, Protocol, TypeVar

import anyio

from ._report import Goal, Row, Table, Target, figure, machine_info, machine_line, table
from ._server import raise_open_files_limit

__all__ = ["RESULTS", "Part", "Report", "declared", "main", "measure", "run_alone"]

RESULTS = Path(__file__).resolve().parent / "results"


class Options(Protocol):
    """What every part's options have: a frozen dataclass with ``rounds`` and ``QUICK`` (a
    ``ClassVar`` of the overrides of a smoke run)."""

    @property
    def rounds(self) -> int:
        """Rounds to run; each one measures every side of the part."""


OptionsT = TypeVar("OptionsT", bound=Options)


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
    """The report of a part that declares its tables and goals.

    Every row with ``errors`` is a failure, named by its part of the table (the ``variant``
    and the fields of each table's groups) and its ``error_kinds``.
    """
    summaries = {t.name: t.summary(rows) for t in tables}
    rendered = [t.render(summaries[t.name]) for t in tables]
    targets = [target for goal in goals if (target := goal.judge(summaries)) is not None]
    named = sorted({name for t in tables for name in (t.key, *t.by)})
    failures = [
        f"round {row['round']} "
        + " ".join(f"{name}={row[name]}" for name in named if name in row)
        + f": {row['errors']} of {row.get('samples', '?')} failed"
        + (f" {row['error_kinds']}" if row.get("error_kinds") else "")
        for row in rows
        if row.get("errors")
    ]
    return Report(
        list(heading), rendered + ["\n".join(notes)] * bool(notes), summaries, targets, failures
    )


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
        report: Turns rows into the part's :class:`Report` (most parts: :func:`declared`).
        progress: One line about a round's rows; by default the round's own targets.
        environment: An async context manager around all the rounds (a database, a broker);
            what it yields is passed to ``run_round`` and ``report``.
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


def measure(part: Part[OptionsT], options: OptionsT, machine: dict[str, Any]) -> PartResult:
    """Run every round of ``part``; return its tables, its figures and its targets."""
    started, load_before = time.perf_counter(), os.getloadavg()
    rows, environment = anyio.run(_rounds, part, options)
    elapsed, load_after = time.perf_counter() - started, os.getloadavg()
    report = part.report(rows, options, environment)
    load = f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    top = [
        *report.heading,
        machine_line(machine),
        "figures: median (min-max) across rounds; ratios and differences are taken within a round",
    ]
    text = "\n\n".join(
        ["\n".join(top), *report.tables, f"{options.rounds} round(s) took {elapsed:.0f} s; {load}"]
    )
    data = {
        "config": dataclasses.asdict(options),  # type: ignore[call-overload]
        "elapsed_s": elapsed,
        "load_average": [load_before, load_after],
        "summary": report.summary,
        "rounds": rows,
    }
    failures = [f"{part.name}: {failure}" for failure in report.failures]
    return PartResult(part.name, text, data, failures, report.targets)


async def _rounds(part: Part[OptionsT], options: OptionsT) -> tuple[list[Row], Any]:
    rows: list[Row] = []
    async with part.environment(options) as environment:
        for number in range(1, options.rounds + 1):
            mine = await part.run_round(number, options, environment)
            rows.extend(mine)
            if part.progress is not None:
                line = part.progress(mine)
            else:
                targets = part.report(mine, options, environment).targets
                line = "; ".join(f"{t.figure} {t.measured['median']:.3f}{t.unit}" for t in targets)
            print(f"  {part.name} round {number}: {line or 'done'}", file=sys.stderr, flush=True)
    return rows, environment


def format_targets(results: Sequence[PartResult]) -> str:
    """Every target of the parts that ran: the bound, the measured figure, met or missed."""
    rows = [["target", "bound", "measured: median (min-max) of rounds", "met"]]
    for result in results:
        for t in result.targets:
            shown = figure(".3f" if t.unit == "x" else ".3g", t.unit)(t.measured)
            rows.append([t.figure, t.bound, shown, "met" if t.met else "MISSED"])
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
    runs: Sequence[tuple[Part[Any], Any]], *, command: Sequence[str], quick: bool, path: Path
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
            results.append(measure(part, options, machine))
            print(f"\n{results[-1].text}\n", flush=True)
    except KeyboardInterrupt:
        print("interrupted: servers stopped, nothing written", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - started
    failures = [failure for result in results for failure in result.failures]
    if any(result.targets for result in results):
        print(f"targets\n{format_targets(results)}\n")
    print(
        f"took {elapsed:.0f} s; load average now {os.getloadavg()[0]:.2f}; "
        f"{len(failures)} failure(s)"
    )
    for failure in failures:
        print(f"  {failure}")
    write_report(path, results, command=command, quick=quick, machine=machine, elapsed=elapsed)
    print(f"wrote {path}")
    return 1 if failures else 0


def run_alone(part: Part[Any], argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.<part>``: the part's options as flags, ``--quick``, ``--json``."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{part.name}")
    parser.add_argument("--quick", action="store_true", help="smoke run; its ratios are noise")
    parser.add_argument("--json", type=Path, default=RESULTS / f"{part.name}.json")
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
            parser.add_argument(
                flag, type=kind, nargs="+", help=f"default {' '.join(map(str, value))}"
            )
    args = parser.parse_args(argv)
    overrides = {
        option.name: tuple(v) if isinstance(v, list) else v
        for option in dataclasses.fields(part.options)
        if (v := getattr(args, option.name, None)) is not None
    }
    options = part.configure(args.quick, **overrides)
    command = ["python", "-m", f"benchmarks.{part.name}", *(argv or sys.argv[1:])]
    return main([(part, options)], command=command, quick=args.quick, path=args.json)
