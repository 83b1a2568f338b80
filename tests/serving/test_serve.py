"""`recsys serve`: MLflow's model server on loopback answers like the in-process model, and rejects bad requests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import polars as pl
import pytest

from recsys.processes import descendants, is_running
from recsys.serving.export import ExportResult
from recsys.serving.pyfunc_model import Ranker
from recsys.serving.registry import champion_uri
from recsys.serving.serve import ServerProcess, free_port, venv_env
from tests import tiny_model

DATASET = tiny_model.DATASET


def _post(url: str, body: bytes) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _records(rows: list[dict[str, Any]]) -> bytes:
    return json.dumps({"dataframe_records": rows}).encode()


@pytest.fixture
def champion(exported_tiny_model: ExportResult) -> Path:
    """The bundle folder of the session's tiny model, exported as the champion of DATASET."""
    return Path(mlflow.artifacts.download_artifacts(champion_uri(DATASET))) / "artifacts" / "bundle"


def _serve_command(port: int, *options: str) -> list[str]:
    return [str(Path(sys.executable).parent / "recsys"), "serve", "--dataset", DATASET, "--port", str(port), *options]


@pytest.mark.slow
def test_served_rankings_equal_in_process_and_bad_requests_get_4xx(
    champion: Path, tmp_path: Path, mlflow_store: str
) -> None:
    in_process = Ranker(champion)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = _serve_command(port, "--max-request-rows", "50", "--max-request-bytes", "20000")
    with ServerProcess(command, tmp_path / "serve.log", env=venv_env({"MLFLOW_TRACKING_URI": mlflow_store})) as server:
        server.wait_ready(f"{url}/ping", timeout=240)
        rows = [{"user_id": "1", "k": 5}, {"user_id": "2", "k": 3}, {"user_id": "someone-new", "k": 4}]
        status, body = _post(f"{url}/invocations", _records(rows))
        assert status == 200, body
        served = pl.DataFrame(body["predictions"])
        expected = in_process.rank(pd.DataFrame(rows))
        assert served.select("user_id", "rank", "item_id", "title").rows() == expected.select(
            "user_id", "rank", "item_id", "title").rows()
        assert served.get_column("score").to_list() == pytest.approx(expected.get_column("score").to_list(),
                                                                     rel=1e-5)
        history = [{"user_id": "someone-new", "k": 3, "history": ["1", "2", "3"]}]
        status, body = _post(f"{url}/invocations", _records(history))
        assert status == 200
        assert [r["item_id"] for r in body["predictions"]] == in_process.rank(
            pd.DataFrame(history)).get_column("item_id").to_list()
        # rows with and without k and history in one request; a missing k is the default, 10
        mixed = [{"user_id": "1", "k": 5}, {"user_id": "someone-new", "k": 3, "history": ["1", "2"]}, {"user_id": "2"}]
        status, body = _post(f"{url}/invocations", _records(mixed))
        assert status == 200 and len(body["predictions"]) == 5 + 3 + 10, body

        bad = {
            "missing user_id": (_records([{"k": 3}]), 400, "no user_id column (nor a query column"),
            "k = 0": (_records([{"user_id": "1", "k": 0}]), 400, "k must be a whole number from 1 to 48"),
            "huge k": (_records([{"user_id": "1", "k": 10**12}]), 400, "k must be a whole number from 1 to 48"),
            "k a fraction": (_records([{"user_id": "1", "k": 2.5}]), 400, "got 2.5"),
            "k a float": (_records([{"user_id": "1", "k": 3.0}]), 400, "got 3.0"),
            "k true": (_records([{"user_id": "1", "k": True}]), 400, "got True"),
            "k a numeric string": (_records([{"user_id": "1", "k": "5"}]), 400, "got '5'"),
            "k true beside an integer": (_records([{"user_id": "1", "k": 2}, {"user_id": "2", "k": True}]), 400,
                                         "row 1: k must be a whole number"),
            "user_id a number": (_records([{"user_id": 12}]), 400, "user_id"),
            "k a string": (_records([{"user_id": "1", "k": "ten"}]), 400, "got 'ten'"),
            "history a string": (_records([{"user_id": "1", "history": "1,2"}]), 400, "history"),
            "a query to a model without content": (_records([{"query": "group 1"}]), 400,
                                                   "this movielens-100k model was exported without a trained"),
            "an empty query": (_records([{"user_id": "1", "query": " "}]), 400, "the search query is empty"),
            "not JSON": (b"{user_id: 1", 400, "Invalid input"),
            "too many rows": (_records([{"user_id": str(u)} for u in range(51)]), 413,
                              "the request has 51 rows; at most 50 rows"),
            "too large a body": (_records([{"user_id": "1", "history": ["1"] * 5000}]), 413,
                                 "more than the limit of 20000 bytes"),
        }
        for case, (payload, expected_status, message) in bad.items():
            status, body = _post(f"{url}/invocations", payload)
            assert status == expected_status, (case, status, body)
            assert message in body.get("message", ""), (case, body)
        # still serving after the bad requests
        status, body = _post(f"{url}/invocations", _records(rows[:1]))
        assert status == 200 and len(body["predictions"]) == 5
    assert server.process is not None and server.process.poll() is not None


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_recsys_serve_stops_every_server_process_and_frees_the_port(
    champion: Path, tmp_path: Path, mlflow_store: str, stop: signal.Signals
) -> None:
    port = free_port()
    with (tmp_path / "serve.log").open("wb") as log:
        wrapper = subprocess.Popen(_serve_command(port, "--workers", "2"), stdout=log, stderr=subprocess.STDOUT,
                                   env=venv_env({"MLFLOW_TRACKING_URI": mlflow_store}))
    server = ServerProcess([], tmp_path / "serve.log")
    server.process = wrapper  # wait_ready watches the wrapper
    children: set[int] = set()
    try:
        server.wait_ready(f"http://127.0.0.1:{port}/ping", timeout=240)
        children = descendants(wrapper.pid)
        assert len(children) >= 3  # uvicorn's supervisor and its two workers
        os.kill(wrapper.pid, stop)  # to the PID only, as `kill PID` does
        started = time.monotonic()
        while any(is_running(c) for c in children) and time.monotonic() - started < 5:
            time.sleep(0.05)
        assert not [c for c in children if is_running(c)], f"left running 5 s after {stop.name}"
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))  # the port is free for the next server
        # recsys serve itself exits once its server is gone (the interpreter's own exit takes a moment):
        # Ctrl+C is the ordinary way to stop it (exit code 0), SIGTERM exits as a shell reports it
        assert wrapper.wait(timeout=60) == (0 if stop == signal.SIGINT else 128 + stop)
    finally:
        for pid in [wrapper.pid, *children]:
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
        wrapper.wait(timeout=10)
