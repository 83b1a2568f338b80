"""Shared test fixtures: the read-only shared data folder and a throwaway MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository (read-only; never copied into the repo)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite MLflow store for the whole session (creating one costs seconds)."""
    folder = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{folder}/mlflow.db"


@pytest.fixture(autouse=True)
def _isolated_mlflow(mlflow_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test logs into the session's temporary store, never into the project's mlflow/."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
