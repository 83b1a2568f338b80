"""Wall time of each step of `recsys demo` on a fresh folder and store (target: all under 10 minutes).

The full run is the demo a user gets (`make demo`: default preset); `--quick` runs the small
preset, which exercises every step in a few minutes. The step times come from the demo's own step
log; the total includes the final summary. CPU seconds per step are recorded too: on a shared
machine they show what a step costs, where wall time depends on the neighbours (the 1-minute
load average at the end is in the result).
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

from _common import parse_args, report

TARGET_SECONDS = 600.0
"""`make demo` after install must finish in under 10 minutes on 2 cores."""


def main() -> None:
    args = parse_args(__doc__ or "")
    from recsys.config import DemoConfig
    from recsys.demo import demo

    preset = "small" if args.quick else "default"
    with tempfile.TemporaryDirectory(prefix="recsys-demo-bench-") as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
        log = io.StringIO()
        start = time.perf_counter()
        result = demo(DemoConfig(preset=preset, raw_dir=root / "raw", processed_dir=root / "processed"), out=log)
        total = time.perf_counter() - start
    print(log.getvalue())
    two_tower = result.quality.filter(result.quality["model"].str.starts_with("two-tower"))
    report("demo", {
        "preset": preset,
        "cpu_count": os.cpu_count(),
        "total_seconds": round(total, 1),
        "target_seconds": TARGET_SECONDS,
        "step_seconds": {name: round(seconds, 1) for name, seconds in result.seconds.items()},
        "step_cpu_seconds": {name: round(seconds, 1) for name, seconds in result.cpu_seconds.items()},
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "two_tower_test_ndcg_10": round(float(two_tower["ndcg@10"][0]), 4) if two_tower.height else None,
        "champion_version": result.export.decision.version if result.export.decision.promoted else None,
        "target_met": total < TARGET_SECONDS,
    })


if __name__ == "__main__":
    main()
