"""How the benchmarks summarise and print what they measured: percentiles, spreads, tables.

Every benchmark reports a figure as the median across rounds with the min-max spread, and a
ratio against a baseline measured in the same round; these are the few functions they share.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "REPOSITORY",
    "PartResult",
    "Spread",
    "Target",
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
    "asgi-session-sync",
)


@dataclass(frozen=True)
class Target:
    """One target of the issue: what is compared, the bound, what was measured, whether met.

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
    """Median, min and max of one figure across rounds."""
    listed = list(values)
    return {"median": statistics.median(listed), "min": min(listed), "max": max(listed)}


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, or ``nan`` when ``denominator`` is zero."""
    return numerator / denominator if denominator else math.nan


def figure(fmt: str, suffix: str = "") -> Callable[[Spread], str]:
    """Formats a spread as ``median (min-max)``."""
    return lambda s: f"{s['median']:{fmt}}{suffix} ({s['min']:{fmt}}-{s['max']:{fmt}})"


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
