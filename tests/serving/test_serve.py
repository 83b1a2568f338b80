"""`recsys serve`: MLflow's model server on loopback answers like the in-process model, and rejects bad requests."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import polars as pl
import pytest

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


@pytest.mark.slow
def test_served_rankings_equal_in_process_and_bad_requests_get_400(
    tmp_path: Path, mlflow_store: str, exported_tiny_model: ExportResult
) -> None:
    bundle = Path(mlflow.artifacts.download_artifacts(champion_uri(DATASET))) / "artifacts" / "bundle"
    in_process = Ranker(bundle)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).parent / "recsys"), "serve", "--dataset", DATASET, "--port", str(port)]
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

        bad = {
            "missing user_id": (_records([{"k": 3}]), "missing inputs ['user_id']"),
            "k = 0": (_records([{"user_id": "1", "k": 0}]), "k must be a whole number from 1 to 48"),
            "huge k": (_records([{"user_id": "1", "k": 10**12}]), "k must be a whole number from 1 to 48"),
            "user_id a number": (_records([{"user_id": 12}]), "user_id"),
            "k a string": (_records([{"user_id": "1", "k": "ten"}]), "column k"),
            "history a string": (_records([{"user_id": "1", "history": "1,2"}]), "history"),
            "not JSON": (b"{user_id: 1", "Invalid input"),
        }
        for case, (payload, message) in bad.items():
            status, body = _post(f"{url}/invocations", payload)
            assert 400 <= status < 500, (case, status, body)
            assert message in body.get("message", ""), (case, body)
        # still serving after the bad requests
        status, body = _post(f"{url}/invocations", _records(rows[:1]))
        assert status == 200 and len(body["predictions"]) == 5
    assert server.process is not None and server.process.poll() is not None
