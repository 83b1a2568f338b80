"""Shared test fixtures: the read-only shared data folder, the session's MLflow store, the tiny trained model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from recsys.serving.export import ExportResult
    from tests.tiny_model import TinyModel

REPOSITORY = Path(__file__).resolve().parents[1]
SHARED_DATA = REPOSITORY.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository (read-only; never copied into the repo)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def nothing_logged_into_the_repository() -> Iterator[None]:
    """Fail the session if a test left MLflow artifacts in the repository (./mlruns: where a run of the store's
    Default experiment keeps them); tests log under their own temporary folders."""
    stray = REPOSITORY / "mlruns"
    existed = stray.exists()
    yield
    assert existed or not stray.exists(), f"a test wrote MLflow artifacts into {stray}: give its run an experiment " \
        "whose artifact_location is under tmp_path"


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One sqlite MLflow store for the whole session (creating one costs seconds), in MLFLOW_TRACKING_URI
    before any other fixture runs: every test, fixture and child process (torchrun, the model server,
    notebook kernels) logs there, never into the project's mlflow/."""
    store = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        yield store


@pytest.fixture(scope="session")
def trained_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """`tests.tiny_model` trained once per session: the export, serving, evaluation, content distillation and
    plot tests share it (read-only: a test that writes into its dataset works on a copy)."""
    from tests.tiny_model import TinyModel, build

    processed_dir, result = build(tmp_path_factory.mktemp("tiny"))
    return TinyModel(processed_dir, result)


@pytest.fixture(scope="session")
def exported_tiny_model(trained_tiny_model: TinyModel) -> ExportResult:
    """The tiny model exported once per session: the first (champion) version of its registered model."""
    from recsys.config import ExportConfig
    from recsys.serving.export import export
    from tests.tiny_model import DATASET

    return export(ExportConfig(dataset=DATASET, processed_dir=trained_tiny_model.processed_dir))
