"""Faults an operator causes: killed trainings and ingestion, a stopped server, bad and heavy requests.

On the small synthetic corpus (`recsys data synth --preset small`, prepared), with its own MLflow
store in a temporary folder:

- training: an uninterrupted `train_retrieval` run is the reference. The same config is then
  trained in new processes that SIGKILL themselves at seeded random points: inside a training
  step of the first epoch (before the first checkpoint), inside a step of a later epoch
  (mid-epoch), and half-way through writing a checkpoint file. Each killed run is continued with
  `--resume RUN_ID` (or, when it has no checkpoint, refused, then `--resume-or-start`); a resume
  is exact when every epoch's validation NDCG@10 and training loss equal the reference's within
  1e-6 and the run is the killed one.
- ingestion: `recsys ingest --workers 2` is SIGKILLed once its decode workers have written their
  first batch; orphans are its processes still running 30 s later.
- serving: the reference model is exported and served by `recsys serve`. 200 malformed or
  oversized requests (bad JSON, wrong formats and types, k as float, bool or string, unknown
  videos, too many rows, too large bodies, wrong content types) must all get a 4xx; then 8
  clients send valid requests concurrently (p50/p99 latency, errors = anything but 200). Last,
  SIGTERM to `recsys serve`: orphans are its processes still running 5 s later, or a port
  still answering.

`target_met`: every resume exact, 0 orphans, 0 non-4xx answers to bad requests, 0 errors under
load. `--quick`: one kill of each kind and 25 requests per client (under two minutes on an idle
laptop); the full run kills twice at each kind of point and sends 100 requests per client.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.config import ExportConfig, PrepareConfig, RetrievalConfig, SynthConfig, save_config
from recsys.data.paths import PreparedPaths
from recsys.data.prepare import prepare
from recsys.errors import MissingInputError
from recsys.processes import descendants, is_running
from recsys.serving.export import export
from recsys.serving.serve import free_port
from recsys.synthetic.generator import synthesize
from recsys.tracking.store import OWNER_TAG, configure
from recsys.twotower.datamodule import RetrievalDataModule
from recsys.twotower.train import RetrievalResult, train_retrieval

RESULTS = Path(__file__).resolve().parent / "results"
DATASET = "synth"
TOLERANCE = 1e-6
CLIENTS = 8

KILLER = """
import json, os, signal, sys
from pathlib import Path
import torch
from recsys.config import RetrievalConfig
from recsys.twotower.module import RetrievalModule
from recsys.twotower.train import train_retrieval

where, epoch, number = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if where == "checkpoint_write":  # SIGKILL half-way through writing checkpoint file `number`
    save, calls = torch.save, []
    def torn_save(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            handle.write(b"the first bytes of a checkpoint")
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return save(obj, handle, *args, **kwargs)
    torch.save = torn_save
else:  # SIGKILL inside training step `number` of epoch `epoch`
    step = RetrievalModule.training_step
    def training_step(self, batch, batch_idx):
        if self.trainer.current_epoch == epoch and batch_idx == number:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, batch, batch_idx)
    RetrievalModule.training_step = training_step
train_retrieval(RetrievalConfig(**json.loads(Path(sys.argv[1]).read_text())))
"""


def recsys_bin() -> str:
    return str(Path(sys.executable).parent / "recsys")


# ------------------------------------------------------------------------------------------ training


def kill_points(rng: random.Random, epochs: int, batches: int, repeats: int) -> list[tuple[str, int, int]]:
    """(kind, epoch, step or checkpoint-file number) of each training kill."""
    points = []
    for _ in range(repeats):
        points.append(("before_first_checkpoint", 0, rng.randrange(batches)))
        points.append(("mid_epoch", rng.randrange(1, epochs), rng.randrange(1, batches)))
        # Epoch 0 writes best.ckpt and last.ckpt, each later epoch last.ckpt and maybe best.ckpt:
        # at least epochs + 1 writes. Write 2 is the first last.ckpt (then nothing can be continued).
        points.append(("checkpoint_write", 0, rng.randrange(2, epochs + 2)))
    return points


def start_kill(config: RetrievalConfig, work: Path, index: int, point: tuple[str, int, int]) -> subprocess.Popen:
    kind, epoch, number = point
    config_file = save_config(config, work / f"kill-{index}.json")
    return subprocess.Popen([sys.executable, "-c", KILLER, str(config_file), kind, str(epoch), str(number)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_of_process(pid: int) -> str | None:
    """The training run a (dead) process had opened: its owner tag names the PID."""
    import mlflow

    configure()
    found = mlflow.search_runs(search_all_experiments=True, output_format="list",
                               filter_string=f"tags.`{OWNER_TAG}` LIKE '%:{pid}:%'")
    return found[0].info.run_id if found else None


def curve_difference(resumed: RetrievalResult, reference: RetrievalResult) -> float:
    """Largest absolute difference of the per-epoch validation NDCG@10 and training loss (inf: other epochs)."""
    if [h["epoch"] for h in resumed.history] != [h["epoch"] for h in reference.history]:
        return float("inf")
    return max(abs(a[m] - b[m]) for a, b in zip(resumed.history, reference.history, strict=True)
               for m in ("val_ndcg_10", "train_loss"))


def resume_killed(config: RetrievalConfig, process: subprocess.Popen, point: tuple[str, int, int],
                  reference: RetrievalResult) -> dict[str, Any]:
    """Wait for a killed training, continue its run, compare with the reference."""
    _, stderr = process.communicate(timeout=900)
    row: dict[str, Any] = {"kind": point[0], "epoch": point[1], "at": point[2], "killed": process.returncode == -9}
    run_id = run_of_process(process.pid)
    row["run_id"] = run_id
    if not row["killed"] or run_id is None:
        row.update(exact=False, error=stderr[-500:])
        return row
    try:
        resumed = train_retrieval(replace(config, resume=run_id))
        row["refused_without_checkpoint"] = False
    except MissingInputError:
        row["refused_without_checkpoint"] = True
        resumed = train_retrieval(replace(config, resume=run_id, resume_or_start=True))
    difference = curve_difference(resumed, reference)
    row.update(max_abs_difference=difference, same_run=resumed.run_id == run_id,
               exact=difference <= TOLERANCE and resumed.run_id == run_id)
    return row


# ------------------------------------------------------------------------------------------ ingestion


def kill_ingest(processed: Path) -> dict[str, Any]:
    """SIGKILL `recsys ingest --workers 2` once its workers decode; how many of them still run 30 s later."""
    command = [recsys_bin(), "ingest", DATASET, "--processed-dir", str(processed), "--no-titles", "--workers", "2",
               "--overwrite"]
    journal = processed / DATASET / "features" / "progress.jsonl"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    deadline = time.monotonic() + 600
    while process.poll() is None and not (journal.exists() and journal.stat().st_size) and time.monotonic() < deadline:
        workers |= descendants(process.pid)
        time.sleep(0.02)
    workers |= descendants(process.pid)
    killed = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    started = time.monotonic()
    while any(is_running(w) for w in workers) and time.monotonic() - started < 30:
        time.sleep(0.05)
    exited_in = time.monotonic() - started
    left = [w for w in workers if is_running(w)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return {"killed_while_running": killed, "processes": len(workers), "orphans": len(left),
            "exited_in_s": round(exited_in, 2)}


# ------------------------------------------------------------------------------------------ serving


def post(url: str, body: bytes, content_type: str = "application/json", timeout: float = 60) -> tuple[int, str]:
    """(HTTP status, body) of a POST; status 0 when no answer came (connection error, timeout)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
        return 0, repr(err)


def records(rows: list[dict[str, Any]]) -> bytes:
    return json.dumps({"dataframe_records": rows}).encode()


def bad_requests(rng: random.Random, users: list[str], n: int) -> list[tuple[str, bytes, str]]:
    """`n` malformed or oversized requests: (what, body, content type), cycling through the kinds."""
    user = lambda: rng.choice(users)  # noqa: E731
    kinds: list[tuple[str, Any]] = [
        ("truncated JSON", lambda: records([{"user_id": user(), "k": 5}])[: rng.randrange(1, 30)]),
        ("not JSON", lambda: rng.choice([b"{user_id: 1}", b"\xff\xfe", b"", b"null", b"[1, 2"])),
        ("no format key", lambda: json.dumps({"rows": [{"user_id": user()}]}).encode()),
        ("records not a list", lambda: json.dumps({"dataframe_records": {"user_id": user()}}).encode()),
        ("split without data", lambda: json.dumps({"dataframe_split": {"columns": ["user_id"]}}).encode()),
        ("no user_id", lambda: records([{"k": rng.randrange(1, 10)}])),
        ("user_id not a string", lambda: records([{"user_id": rng.choice([12, 3.5, True, None, [1], {"a": 1}])}])),
        ("user_id empty", lambda: records([{"user_id": rng.choice(["", "   "])}])),
        ("k out of range", lambda: records([{"user_id": user(), "k": rng.choice([0, -1, 33, 10**6, 10**12])}])),
        ("k a fraction", lambda: records([{"user_id": user(), "k": rng.choice([2.5, 0.1, 1e20, -3.7])}])),
        ("k a whole float", lambda: records([{"user_id": user(), "k": float(rng.randrange(1, 10))}])),
        ("k a bool", lambda: records([{"user_id": user(), "k": rng.choice([True, False])}])),
        ("k a numeric string", lambda: records([{"user_id": user(), "k": str(rng.randrange(1, 10))}])),
        ("k a word, list or object", lambda: records([{"user_id": user(), "k": rng.choice(["ten", [5], {"k": 5}])}])),
        ("k bad in a later row", lambda: records([{"user_id": user(), "k": 3}, {"user_id": user(), "k": True}])),
        ("history not a list", lambda: records([{"user_id": user(), "history": rng.choice(["1,2", 7, {"a": 1}])}])),
        ("history of numbers", lambda: records([{"user_id": user(), "history": [1, 2, 3]}])),
        ("history of unknown videos", lambda: records([{"user_id": user(), "history": ["no-such-video"]}])),
        ("no rows", lambda: records([])),
        ("too many rows", lambda: records([{"user_id": user()} for _ in range(rng.randrange(1001, 3000))])),
        ("too large a body",
         lambda: records([{"user_id": user(), "history": ["v0"] * rng.randrange(250_000, 400_000)}])),
        ("CSV with a bad k", lambda: b"user_id,k\n1,ten\n"),
    ]
    requests = []
    for i in range(n):
        what, make = kinds[i % len(kinds)]
        content_type = "text/csv" if what.startswith("CSV") else "application/json"
        requests.append((what, make(), content_type))
    extra = [("wrong content type", records([{"user_id": users[0]}]), "text/plain"),
             ("unknown charset", records([{"user_id": users[0]}]), "application/json; charset=latin-1")]
    return requests[: n - len(extra)] + extra


def fuzz(url: str, requests: list[tuple[str, bytes, str]]) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    wrong: list[dict[str, Any]] = []
    for what, body, content_type in requests:
        status, answer = post(f"{url}/invocations", body, content_type)
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if not 400 <= status < 500:
            wrong.append({"what": what, "status": status, "answer": answer[:200]})
    return {"requests": len(requests), "statuses": dict(sorted(statuses.items())), "non_4xx": len(wrong),
            "non_4xx_examples": wrong[:5]}


def load(url: str, users: list[str], items: list[str], per_client: int, seed: int) -> dict[str, Any]:
    """CLIENTS threads sending valid requests (4 rows each) one after another; latency and errors."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        for _ in range(per_client):
            rows = [{"user_id": rng.choice(users), "k": rng.randrange(1, 21)} for _ in range(3)]
            rows.append({"user_id": "someone-new", "k": 10, "history": rng.sample(items, 3)})
            started = time.perf_counter()
            status, answer = post(f"{url}/invocations", records(rows))
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                if status != 200:
                    errors.append(f"{status}: {answer[:200]}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"clients": CLIENTS, "requests": len(latencies), "errors": len(errors), "error_examples": errors[:5],
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "requests_per_s": round(len(latencies) / wall, 1)}


def wait_ready(process: subprocess.Popen, url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"recsys serve exited with code {process.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"recsys serve did not answer {url}/ping within {timeout:.0f} s")


def stop_server(process: subprocess.Popen, port: int) -> dict[str, Any]:
    """SIGTERM to recsys serve's PID; its processes and the port 5 s later."""
    children = descendants(process.pid)
    process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    while any(is_running(c) for c in children) and time.monotonic() - started < 5:
        time.sleep(0.02)
    stopped_in = time.monotonic() - started
    left = [c for c in children if is_running(c)]
    with socket.socket() as sock:
        port_answers = sock.connect_ex(("127.0.0.1", port)) == 0
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    process.wait(timeout=60)
    return {"processes": len(children), "stopped_in_s": round(stopped_in, 2), "orphans": len(left),
            "port_still_answers": port_answers}


# ------------------------------------------------------------------------------------------ the run


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run that finishes in under two minutes")
    quick = parser.parse_args().quick
    began = time.perf_counter()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        phases[name] = round(time.perf_counter() - began - sum(phases.values()), 1)

    rng = random.Random(0)
    work = Path(tempfile.mkdtemp(prefix=f"recsys-bench-faults-{'quick' if quick else 'full'}-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"  # the subprocesses use it too
    raw, processed = work / "raw", work / "processed"
    synthesize(SynthConfig(preset="small", raw_dir=raw, workers=1))
    prepare(PrepareConfig(dataset=DATASET, raw_dir=raw, processed_dir=processed))
    phase("corpus")
    epochs = 3 if quick else 4
    config = RetrievalConfig(dataset=DATASET, processed_dir=processed, content="none", dim=32, max_epochs=epochs,
                             patience=epochs, uniform_negatives=8, threads=1, progress_bar=False)
    reference = train_retrieval(config)
    phase("reference_training")
    export(ExportConfig(dataset=DATASET, processed_dir=processed, raw_dir=raw))
    phase("export")
    data = RetrievalDataModule(PreparedPaths.of(processed, DATASET), max_history=config.max_history,
                               batch_size=config.batch_size, seed=config.seed)
    data.setup("fit")
    batches = len(data.train_dataloader())
    users = pl.read_parquet(data.paths.user_map).get_column("user_id").cast(pl.String).to_list()
    items = pl.read_parquet(data.paths.items).get_column("item_id").cast(pl.String).to_list()

    # Everything that starts a process starts now: the imports overlap.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [recsys_bin(), "serve", "--dataset", DATASET, "--port", str(port), "--workers", "1" if quick else "2"]
    server = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    points = kill_points(rng, epochs, batches, repeats=1 if quick else 2)
    kills = [start_kill(config, work, i, point) for i, point in enumerate(points)]
    ingest = kill_ingest(processed)
    phase("ingest_kill")
    resumes = [resume_killed(config, process, point, reference) for process, point in zip(kills, points, strict=True)]
    phase("training_kills_and_resumes")

    try:
        wait_ready(server, url)
        phase("server_start")
        fuzzed = fuzz(url, bad_requests(rng, users, 200))
        phase("bad_requests")
        loaded = load(url, users, items, per_client=25 if quick else 100, seed=0)
        phase("load")
    finally:
        stopped = stop_server(server, port)

    exact = sum(r["exact"] for r in resumes)
    orphans = ingest["orphans"] + stopped["orphans"] + int(stopped["port_still_answers"])
    result = {
        "quick": quick,
        "resumes": len(resumes),
        "resumes_exact": exact,
        "orphaned_processes": orphans,
        "non_4xx_answers": fuzzed["non_4xx"],
        "errors_under_load": loaded["errors"],
        "p50_ms": loaded["p50_ms"],
        "p99_ms": loaded["p99_ms"],
        "target_met": exact == len(resumes) and orphans == 0 and fuzzed["non_4xx"] == 0 and loaded["errors"] == 0,
        "reference_val_ndcg_10": [round(h["val_ndcg_10"], 6) for h in reference.history],
        "resume_details": resumes,
        "ingest_kill": ingest,
        "server_stop": stopped,
        "bad_requests": fuzzed,
        "load": loaded,
        "seconds": round(time.perf_counter() - began, 1),
        "phase_seconds": phases,
        "cpu_count": os.cpu_count(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "faults.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    main()
