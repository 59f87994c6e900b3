"""``python -m bench [NAME ...]``: run the benchmarks, print a table each, save a JSON report.

Benchmarks are the ``bench/bench_<name>.py`` modules (``TITLE`` and ``run(ctx)``); with no name
every one runs. The report goes to ``bench/results/<UTC time>.json``. Nothing here passes or
fails: a benchmark that cannot run says why ("skipped: …"), one that breaks says how ("error: …"),
and the exit status is 0 unless the command line was wrong.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness import BENCH_DIR, RESULTS_DIR, BenchContext, BenchResult, Skip, render_table

PREFIX = "bench_"


def discover() -> list[str]:
    return sorted(
        m.name.removeprefix(PREFIX) for m in pkgutil.iter_modules([str(BENCH_DIR)]) if m.name.startswith(PREFIX)
    )


def run_one(name: str, ctx: BenchContext) -> BenchResult:
    module = importlib.import_module(f"bench.{PREFIX}{name}")
    title: str = module.TITLE
    started = time.monotonic()
    try:
        result: BenchResult = module.run(ctx)
        return result
    except Skip as skip:
        return BenchResult(name, title, "skipped", str(skip), seconds=time.monotonic() - started)
    except Exception as exc:  # a broken benchmark is reported, and the others still run
        traceback.print_exc(file=sys.stderr)
        return BenchResult(name, title, "error", f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - started)


def environment() -> dict[str, Any]:
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    available = discover()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (of: {', '.join(available)})")
    parser.add_argument("--runs", type=int, default=3, help="runs per side; results are medians (default 3)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per traffic measurement (default 3)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name in available:
            print(f"{name}: {importlib.import_module(f'bench.{PREFIX}{name}').TITLE}")
        return 0
    unknown = [n for n in args.names if n not in available]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; there are: {', '.join(available)}")
    if args.runs < 1 or args.duration <= 0:
        parser.error("--runs must be at least 1 and --duration positive")

    ctx = BenchContext(runs=args.runs, duration=args.duration)
    started = datetime.now(UTC)
    results = []
    for name in args.names or available:
        print(f"running {name} …", file=sys.stderr, flush=True)
        result = run_one(name, ctx)
        results.append(result)
        print(render_table(result) + "\n", flush=True)

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    report = {
        "started": started.isoformat(timespec="seconds"),
        "runs": ctx.runs,
        "duration": ctx.duration,
        "environment": environment(),
        "benchmarks": [r.to_json() for r in results],
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
