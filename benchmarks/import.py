"""Throughput and peak memory of `recsys data import` + `recsys data prepare` on a generated watch log.

The log is a CSV of 10M views (--quick: 1M) by 1M users (--quick: 100k) of 100k videos, with
Zipf-like video popularity (p ~ rank^-0.9), log-normal user activity, ISO-8601 times with a zone
(`2024-05-01T12:30:00Z`, in time order, as a service exports them) and columns named
`viewer,video,watched_at`, so the column mapping is exercised; the catalogue is `item_id,title`.

In each repeat four fresh processes run side by side on the same file: a bare
`polars.scan_csv(...).collect()`, a bare `scan_csv(...).sink_parquet(...)` (reading the CSV and
writing it as parquet: the floor under any import), then `import_dataset`, then `prepare` with
the PrepareConfig defaults (what a user gets: k-core 5/5, leave-one-out). Each process times its
own step after its imports (polars, torch, MLflow: a fixed start-up cost, not per view) and
reports its own peak RSS, so neither the generator nor the bare reads count towards the import +
prepare memory.
Times are medians over the repeats (for two, their mean).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_ROWS_PER_S = 1_000_000
TARGET_PEAK_RSS_GB = 3.0

ONE_STEP = """
import json, resource, sys, time
from pathlib import Path
step, root = sys.argv[1], Path(sys.argv[2])
import polars as pl
if "bare" not in step:
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (imports outside the timing: MLflow's store,
    import recsys.tracking.store as tracking
    tracking.system_info()  # and torch)
    from recsys.config import ImportConfig, PrepareConfig
    from recsys.data.importers.files import import_dataset
    from recsys.data.prepare import prepare
start = time.perf_counter()
if step == "bare":
    rows = pl.scan_csv(root / "views.csv").collect().height
elif step == "bare_sink":
    pl.scan_csv(root / "views.csv").sink_parquet(root / "bare.parquet")
    rows = pl.scan_parquet(root / "bare.parquet").select(pl.len()).collect().item()
elif step == "import":
    report = import_dataset(ImportConfig("bench", interactions=root / "views.csv", items=root / "items.csv",
                                         user_column="viewer", item_column="video", time_column="watched_at",
                                         raw_dir=root / "raw", overwrite=True))
    rows = report.rows_read
    extra = {"rows_kept": report.rows_kept, "users": report.users}
else:
    meta = prepare(PrepareConfig("bench", raw_dir=root / "raw", processed_dir=root / "processed"))
    rows = meta["counts"]["rows_read"]
    extra = {"interactions": meta["counts"]["interactions"], "users": meta["counts"]["users"],
             "items": meta["counts"]["items"], "k_core_rounds": meta["k_core_rounds"]}
seconds = time.perf_counter() - start
peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
print(json.dumps({"seconds": seconds, "peak_rss_gb": peak_gb, "rows": rows, **(extra if "bare" not in step else {})}))
"""


def generate(root: Path, rows: int, users: int, items: int, seed: int = 0) -> None:
    """views.csv (viewer, video, watched_at) and items.csv (item_id, title), vectorised."""
    rng = np.random.default_rng(seed)
    popularity = np.arange(1, items + 1, dtype=np.float64) ** -0.9
    item_rank = rng.choice(items, size=rows, p=popularity / popularity.sum())
    item_of_rank = rng.permutation(items)  # popular videos are not the low IDs
    activity = rng.lognormal(0.0, 1.0, size=users)
    user = rng.choice(users, size=rows, p=activity / activity.sum())
    start = 1_704_067_200  # 2024-01-01T00:00:00Z
    seconds = np.sort(rng.integers(start, start + 365 * 86_400, size=rows))
    pl.DataFrame({
        "viewer": user,
        "video": item_of_rank[item_rank],
        "watched_at": pl.Series(seconds * 1000, dtype=pl.Int64).cast(pl.Datetime("ms")),
    }).write_csv(root / "views.csv", datetime_format="%Y-%m-%dT%H:%M:%SZ")
    pl.select(pl.int_range(items).alias("item_id")).with_columns(
        pl.format("video {}", pl.col("item_id")).alias("title")).write_csv(root / "items.csv")


def run_step(step: str, root: Path, env: dict[str, str]) -> dict[str, Any]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", ONE_STEP, step, str(root)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{step} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1M views, 100k users: finishes in under two minutes")
    parser.add_argument("--repeats", type=int, default=None,
                        help="repeats of the four steps, medians reported (default 3; --quick: 2, as each import and "
                             "prepare process spends 10-20 s importing torch and MLflow on the shared 2 cores)")
    args = parser.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 3)
    rows, users, items = (1_000_000, 100_000, 100_000) if args.quick else (10_000_000, 1_000_000, 100_000)

    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="recsys-import-bench-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        generate(root, rows, users, items)
        generate_s = time.perf_counter() - start
        csv_mb = (root / "views.csv").stat().st_size / 1e6
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow/mlflow.db"}
        runs: dict[str, list[dict[str, Any]]] = {"bare": [], "bare_sink": [], "import": [], "prepare": []}
        for _ in range(args.repeats):
            for step in runs:
                runs[step].append(run_step(step, root, env))

    def median(step: str, key: str = "seconds") -> float:
        return statistics.median(r[key] for r in runs[step])

    assert all(r["rows"] == rows for step in runs for r in runs[step])
    bare_s, import_s, prepare_s = median("bare"), median("import"), median("prepare")
    total_s = import_s + prepare_s
    peak_gb = max(r["peak_rss_gb"] for step in ("import", "prepare") for r in runs[step])
    rows_per_s = rows / total_s
    result = {
        "rows": rows,
        "import_prepare_rows_per_s": round(rows_per_s),
        "ratio_to_bare_read": round(total_s / bare_s, 2),
        "peak_rss_gb": round(peak_gb, 3),
        "target_rows_per_s": TARGET_ROWS_PER_S,
        "target_peak_rss_gb": TARGET_PEAK_RSS_GB,
        "target_met": rows_per_s >= TARGET_ROWS_PER_S and peak_gb <= TARGET_PEAK_RSS_GB,
        "quick": args.quick,
        "users": users,
        "items": items,
        "csv_mb": round(csv_mb, 1),
        "repeats": args.repeats,
        "median_seconds": {"bare_read": round(bare_s, 3), "bare_csv_to_parquet": round(median("bare_sink"), 3),
                           "import": round(import_s, 3),
                           "prepare": round(prepare_s, 3), "import_prepare": round(total_s, 3)},
        "bare_read_rows_per_s": round(rows / bare_s),
        "peak_rss_gb_by_step": {step: round(max(r["peak_rss_gb"] for r in runs[step]), 3) for step in runs},
        "process_seconds": {step: round(median(step, "process_seconds"), 3) for step in runs},
        "kept": {k: v for k, v in runs["prepare"][0].items() if k in ("interactions", "users", "items",
                                                                       "k_core_rounds")},
        "import_rows_kept": runs["import"][0]["rows_kept"],
        "generate_seconds": round(generate_s, 1),
        "cpu_count": os.cpu_count(),
        "load_average_1min_at_start": round(load_at_start, 2),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "polars": pl.__version__,
        "note": ("prepare uses the PrepareConfig defaults (k-core 5/5, leave-one-out): what a user gets; "
                 "ratio_to_bare_read = (import + prepare seconds) / bare scan_csv().collect() seconds; "
                 "times exclude each process's imports (process_seconds include them); peak RSS is the "
                 "larger of the import and prepare processes (Python, polars, torch and MLflow included); the log "
                 "is in time order, as exports usually are (prepare then skips its time sort); the 2 cores are "
                 "shared with other jobs (see the load average), so wall times are noisy"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "import.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
