"""The benchmark harness: results, medians and ratios, tables, the JSON report, tool builds.

A benchmark is a module ``bench/bench_<name>.py`` with ``TITLE`` (one line) and
``run(ctx: BenchContext) -> BenchResult``. It measures a *baseline* and the *subject* (membrane)
in the same run, several times each, and reports each metric as the median of its runs and the
ratio subject/baseline. Benchmarks are reported, never passed or failed. A benchmark that cannot
run here raises :class:`Skip` with the reason.

Primitives: :class:`Metric`, :class:`BenchResult`, :class:`BenchContext`, :class:`Skip`,
:func:`median`, :func:`percentile`, :func:`render_table`, :func:`build_tool`, :func:`measure`.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, ParamSpec

BENCH_DIR = Path(__file__).resolve().parent
BUILD_DIR = BENCH_DIR / ".build"
RESULTS_DIR = BENCH_DIR / "results"
TOOLS_DIR = BENCH_DIR / "tools"

Status = Literal["ok", "skipped", "error"]
P = ParamSpec("P")


class Skip(Exception):
    """This benchmark cannot run here; the message says why (missing root, tool, component)."""


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): an actual sample, as latency reports use."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Metric:
    """One measured quantity: per-run values on each side, compared by their medians."""

    name: str
    unit: str
    baseline: tuple[float, ...]
    subject: tuple[float, ...]
    higher_is_better: bool = True

    @property
    def baseline_median(self) -> float:
        return median(self.baseline)

    @property
    def subject_median(self) -> float:
        return median(self.subject)

    @property
    def ratio(self) -> float:
        base = self.baseline_median
        return self.subject_median / base if base and not math.isnan(base) else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "baseline": {"median": _finite(self.baseline_median), "runs": list(self.baseline)},
            "subject": {"median": _finite(self.subject_median), "runs": list(self.subject)},
            "ratio": _finite(self.ratio),
        }


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


@dataclass(frozen=True)
class BenchResult:
    name: str
    title: str
    status: Status
    reason: str = ""
    baseline_label: str = "baseline"
    subject_label: str = "membrane"
    metrics: tuple[Metric, ...] = ()
    notes: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "status": self.status,
            "reason": self.reason,
            "baseline": self.baseline_label,
            "subject": self.subject_label,
            "metrics": [m.to_json() for m in self.metrics],
            "notes": self.notes,
            "seconds": round(self.seconds, 1),
        }


@dataclass(frozen=True)
class BenchContext:
    runs: int = 3
    duration: float = 3.0
    log: Callable[[str], None] = lambda line: print(f"  {line}", file=sys.stderr, flush=True)

    def tool(self, name: str) -> Path:
        return build_tool(name)


def _format(value: float) -> str:
    if math.isnan(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def render_table(result: BenchResult) -> str:
    head = f"== {result.name}: {result.title} =="
    if result.status != "ok":
        return f"{head}\n{result.status}: {result.reason}"
    rows = [["metric", "unit", result.baseline_label, result.subject_label, "ratio", "runs"]]
    for m in result.metrics:
        better = "" if math.isnan(m.ratio) else (" (higher is better)" if m.higher_is_better else " (lower is better)")
        ratio = "-" if math.isnan(m.ratio) else f"{m.ratio:.2f}{better}"
        runs = f"{len(m.baseline)}/{len(m.subject)}"
        rows.append([m.name, m.unit, _format(m.baseline_median), _format(m.subject_median), ratio, runs])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head, *("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)]
    lines += [f"{key}: {value}" for key, value in result.notes.items()]
    return "\n".join(lines)


def build_tool(name: str) -> Path:
    """Compile ``tools/<name>.c`` once per source version into ``.build/<name>-<hash>``."""
    source = TOOLS_DIR / f"{name}.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    binary = BUILD_DIR / f"{name}-{digest}"
    if binary.exists():
        return binary
    if shutil.which("gcc") is None:
        raise Skip("gcc is needed to build the benchmark tools")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = BUILD_DIR / f".{name}-{digest}.{os.getpid()}"
    result = subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-std=c11", "-o", str(tmp), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building {source.name} failed:\n{result.stderr}")
    tmp.replace(binary)  # atomic: a concurrent run sees the whole binary or none
    return binary


def measure(ctx: BenchContext, label: str, fn: Callable[P, float], *args: P.args, **kwargs: P.kwargs) -> float:
    """Run one measurement and log its value and how long it took."""
    started = time.monotonic()
    value = fn(*args, **kwargs)
    ctx.log(f"{label}: {_format(value)} ({time.monotonic() - started:.1f} s)")
    return value
