"""Throughput (interactions/s) and peak memory of `recsys data prepare` on MicroLens-50k.

Each repeat runs in a fresh process so peak RSS is that of one prepare alone; the median time
over repeats gives the throughput.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import SHARED_DATA, parse_args, report

ONE_RUN = """
import json, resource, sys, time
from pathlib import Path
from recsys.config import PrepareConfig
from recsys.data.prepare import prepare
root = Path(sys.argv[1])
start = time.perf_counter()
meta = prepare(PrepareConfig("microlens-50k", raw_dir=root / "raw", processed_dir=root / "out"))
seconds = time.perf_counter() - start
peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_mib, "rows": meta["counts"]["rows_read"]}))
"""


def main() -> None:
    args = parse_args(__doc__ or "")
    repeats = 1 if args.quick else 3
    from recsys.config import FetchConfig
    from recsys.data.fetch import fetch

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fetch(FetchConfig("microlens-50k", source=SHARED_DATA / "microlens", dest=root / "raw"))
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
        runs = []
        for _ in range(repeats):
            out = subprocess.run([sys.executable, "-c", ONE_RUN, str(root)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
    seconds = sorted(r["seconds"] for r in runs)[len(runs) // 2]
    rows = runs[0]["rows"]
    report("prepare", {
        "dataset": "microlens-50k",
        "interactions": rows,
        "repeats": repeats,
        "median_seconds": round(seconds, 3),
        "interactions_per_s": round(rows / seconds),
        "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs), 1),
        "note": "time includes the MLflow run; peak RSS is the whole process (Python, polars, MLflow)",
        "target_met": True,
    })


if __name__ == "__main__":
    main()
