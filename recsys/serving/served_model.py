"""The one served model: the registered version that `recommend`, `similar`, `search --user-id`, notebook 02 and
`serve` load.

A version of `recsys-<dataset>` in the MLflow registry is named by its number (`--version 3`) or
by an alias (`--alias champion`, the default). Its bundle (`recsys.serving.pyfunc_model`) is
downloaded once per version into `<processed_dir>/<dataset>/served/v<N>/` (versions never change,
so the copy never goes stale) and answered by the same `Ranker` that the REST server runs: the CLI
and REST rank from the same files with the same code.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from recsys.data.paths import PreparedPaths
from recsys.serving.pyfunc_model import Ranker
from recsys.serving.registry import CHAMPION, model_name, registered_version

SERVED_DIR = "served"
"""Folder of a prepared dataset holding the downloaded bundles of registered versions."""
BUNDLE_ARTIFACT = "bundle"
"""Name of the bundle among the logged pyfunc model's artifacts (`artifacts/bundle`)."""


@dataclass(frozen=True)
class ServedModel:
    """A registered version and the local copy of its bundle."""

    dataset: str
    version: str
    bundle: Path


def served_model(dataset: str, processed_dir: Path, version: str | None = None, alias: str = CHAMPION
                 ) -> ServedModel:
    """The registered version's bundle, downloaded into `<processed_dir>/<dataset>/served/v<N>` the first time."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # CLI output stays the answer
    found = registered_version(dataset, version, alias)
    number = str(found.version)
    folder = PreparedPaths.of(processed_dir, dataset).root / SERVED_DIR / f"v{number}"
    if not (folder / BUNDLE_ARTIFACT).exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".v{number}-", dir=folder.parent) as tmp:
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name(dataset)}/{number}", dst_path=tmp)
            shutil.rmtree(folder, ignore_errors=True)
            Path(tmp, "artifacts").rename(folder)  # a whole download or none: the rename is the commit
    return ServedModel(dataset, number, folder / BUNDLE_ARTIFACT)


def load_ranker(dataset: str, processed_dir: Path, version: str | None = None, alias: str = CHAMPION,
                index_kind: str | None = None) -> Ranker:
    """The `Ranker` of a registered version, as the REST server loads it (`index_kind`: another item index)."""
    served = served_model(dataset, processed_dir, version, alias)
    ranker = Ranker(served.bundle, index_kind=index_kind)
    ranker.version = served.version
    return ranker
