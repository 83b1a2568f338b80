"""What every benchmark shares: `--quick`, median timing, and the JSON result file + last line.

Benchmarks run as scripts (`.venv/bin/python benchmarks/NAME.py`), so Python puts this folder at
the front of `sys.path` and `from _common import ...` finds this file; `recsys` is the installed package.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a smaller run that finishes in under two minutes")
    return parser.parse_args()


def median_seconds(work: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `repeats` calls of `work`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """Write benchmarks/results/NAME.json and print the same object as the last line of output."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, sort_keys=False, default=str)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(text)
    return result
