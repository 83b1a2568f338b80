"""What a test reads back of the figures a run logged to MLflow."""

from __future__ import annotations

from mlflow import MlflowClient

PNG = b"\x89PNG\r\n\x1a\n"
"""The first bytes of every PNG file."""


def plot_artifacts(run_id: str) -> list[str]:
    """The PNG files under `plots/` of a run, after checking that each is a real PNG image."""
    client = MlflowClient()
    paths = sorted(a.path for a in client.list_artifacts(run_id, "plots"))
    for path in paths:
        assert open(client.download_artifacts(run_id, path), "rb").read(8) == PNG, path
    return paths
