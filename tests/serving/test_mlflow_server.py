"""An MLflow tracking server over a store the test made answers its REST API with our runs and models."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient

from recsys.serving.serve import ServerProcess, free_port, tracking_server_command
from recsys.tracking.store import start_run


def _get(base: str, endpoint: str, **query: str) -> dict[str, Any]:
    url = f"{base}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _post(base: str, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_tracking_server_serves_runs_metrics_and_registered_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    with start_run("synth", "train-retrieval", {"lr": 0.001, "dim": 64}, inputs={"prepare": "p1"}) as run:
        for epoch, ndcg in enumerate([0.10, 0.18, 0.25]):
            mlflow.log_metric("val_ndcg_10", ndcg, step=epoch)
        run_id = run.info.run_id
    client = MlflowClient()
    client.create_registered_model("recsys-synth")
    version = client.create_model_version("recsys-synth", source=f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias("recsys-synth", "champion", version.version)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = tracking_server_command(store, (tmp_path / "artifacts").as_uri(), "127.0.0.1", port)
    with ServerProcess(command, tmp_path / "server.log") as server:
        server.wait_ready(f"{base}/health", timeout=180)

        experiment = _get(base, "experiments/get-by-name", experiment_name="synth")["experiment"]
        runs = _post(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        assert [r["info"]["run_id"] for r in runs] == [run_id]
        tags = {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}
        assert tags["recsys.step"] == "train-retrieval" and tags["recsys.input.prepare"] == "p1"
        params = {p["key"]: p["value"] for p in runs[0]["data"]["params"]}
        assert params == {"lr": "0.001", "dim": "64"}

        history = _get(base, "metrics/get-history", run_id=run_id, metric_key="val_ndcg_10")["metrics"]
        assert [(m["step"], m["value"]) for m in history] == [(0, 0.10), (1, 0.18), (2, 0.25)]

        model = _get(base, "registered-models/get", name="recsys-synth")["registered_model"]
        assert model["aliases"] == [{"alias": "champion", "version": str(version.version)}]
        champion = _get(base, "registered-models/alias", name="recsys-synth", alias="champion")
        assert champion["model_version"]["run_id"] == run_id
    assert server.process is not None and server.process.poll() is not None  # stopped
