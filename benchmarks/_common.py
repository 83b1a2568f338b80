"""What every benchmark shares: `--quick`, median timing, the JSON result file + last line, the commit a
result was measured at, and the finished seeds of a long run (`SeedStore`).

Benchmarks run as scripts (`.venv/bin/python benchmarks/NAME.py`), so Python puts this folder at
the front of `sys.path` and `from _common import ...` finds this file; `recsys` is the installed package.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "benchmarks" / "results"
SHARED_DATA = REPOSITORY.parent / "shared" / "data"


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


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPOSITORY, capture_output=True, text=True, check=True).stdout.strip()


def git_commit() -> str:
    """The checked-out commit (with '+changes' when the work tree differs from it), or 'unknown'."""
    try:
        commit, dirty = _git("rev-parse", "--short", "HEAD"), _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def code_version(paths: Sequence[str]) -> str | None:
    """Git object ids of `paths` (relative to the repository) at HEAD; None when the work tree changes any of
    them (or without git), so that results measured on uncommitted code are never taken for a version's."""
    try:
        dirty = _git("status", "--porcelain", "--", *paths)
        ids = _git("rev-parse", *(f"HEAD:{path}" for path in paths)).split()
    except (OSError, subprocess.CalledProcessError):
        return None
    return None if dirty else "-".join(object_id[:12] for object_id in ids)


class SeedStore:
    """The finished seeds of a benchmark's full runs, one file each (results/NAME-seeds/DATASET-SEED.json), kept with
    the version of the code that measured them (`code_version` of `measured_code`). A later full run of the same
    code reads a stored seed back instead of measuring it again, so a run stopped part-way loses only its
    unfinished seed; any change to that code measures every seed anew. `keep` False (a --quick run) neither
    reads nor writes the store."""

    def __init__(self, name: str, measured_code: Sequence[str], keep: bool = True) -> None:
        self.folder = RESULTS / f"{name}-seeds"
        self.code = code_version(measured_code) if keep else None

    def _file(self, dataset: str, seed: int) -> Path:
        return self.folder / f"{dataset.replace(' ', '_')}-{seed}.json"

    def load(self, dataset: str, seed: int) -> Any | None:
        """What `save` kept of this dataset and seed with the same code, or None."""
        file = self._file(dataset, seed)
        if self.code is None or not file.exists():
            return None
        stored = json.loads(file.read_text())
        return stored["measured"] if stored.get("code") == self.code else None

    def save(self, dataset: str, seed: int, measured: Any, seconds: float) -> None:
        """Keep a finished seed (atomically: a run stopped while writing leaves no file); nothing without a code
        version (uncommitted changes, or `keep` False)."""
        if self.code is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        file = self._file(dataset, seed)
        partial = file.with_suffix(".json.partial")
        record = {"code": self.code, "commit": git_commit(), "seconds": round(seconds, 1), "measured": measured}
        partial.write_text(json.dumps(record, indent=2, default=str) + "\n")
        partial.replace(file)

    def measure(self, dataset: str, seed: int, work: Callable[..., Any], *args: Any) -> Any:
        """The stored result of this dataset and seed, else `work(*args)`, stored."""
        stored = self.load(dataset, seed)
        if stored is not None:
            print(f"{dataset} seed {seed}: stored by a run of the same code, not measured again", flush=True)
            return stored
        started = time.perf_counter()
        measured = work(*args)
        self.save(dataset, seed, measured, time.perf_counter() - started)
        return measured
