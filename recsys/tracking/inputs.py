"""A run's data as MLflow datasets: the interaction splits and the catalogue it read, with digest and source.

`log_tables` logs parquet files (a split, the catalogue) into the active run with `mlflow.log_input`;
the UI shows them in the runs table's Dataset column and on the run page, and runs that read the
same data show the same digest. The digest (`digest`) hashes the table's columns, length and rows,
so it does not depend on the file's path or encoding; `input_digests` reads them back.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

CONTEXTS = {"train": "training", "valid": "validation", "test": "test", "catalogue": "catalogue"}
"""MLflow's `mlflow.data.context` of each table role (what the UI shows beside a dataset's name)."""


def dataset_name(dataset: str, role: str) -> str:
    """The MLflow dataset name of one table of a dataset: `<dataset>/<role>` (e.g. `synth/train`)."""
    return f"{dataset}/{role}"


def digest(frame: pl.DataFrame) -> str:
    """12 hex digits identifying a table's content: its schema, its length and the sum of its row hashes.

    Equal for equal rows in any order (a split is a set of interactions), whatever file holds them.
    MLflow's own digest for polars is the bare row-hash sum: a 20-digit number, too long to read in the UI.
    """
    rows = int(frame.hash_rows(seed=0).sum()) if frame.height else 0
    return hashlib.sha256(f"{frame.schema}|{frame.height}|{rows}".encode()).hexdigest()[:12]


def log_frame(frame: pl.DataFrame, dataset: str, role: str, source: Path) -> Any:
    """Log one table (already in memory) as an input of the active run; returns the MLflow dataset."""
    import mlflow

    with warnings.catch_warnings():
        # MLflow registers its local-file source for both the '' and 'file' schemes and warns that a
        # path matches both; either resolves it the same way.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        data = mlflow.data.from_polars(frame, source=str(Path(source).resolve()), name=dataset_name(dataset, role),
                                       digest=digest(frame))
    mlflow.log_input(data, context=CONTEXTS.get(role, role))
    return data


def log_tables(dataset: str, tables: Mapping[str, Path]) -> dict[str, str]:
    """Log parquet tables by role (`train`, `valid`, `test`, `catalogue`, ...) as inputs of the active run.

    Returns each role's digest.
    """
    digests = {}
    for role, path in tables.items():
        try:
            frame = pl.read_parquet(path)
        except pl.exceptions.ComputeError as err:
            # e.g. titles that are not valid UTF-8: the step itself reports them, the run just lacks this dataset
            warnings.warn(f"{path}: not logged as the run's {role} dataset ({str(err).splitlines()[0]})", stacklevel=2)
            continue
        digests[role] = log_frame(frame, dataset, role, path).digest
    return digests


def input_digests(run: Any) -> dict[str, str]:
    """A run's logged datasets as {role: digest} (the role is the part of the name after `<dataset>/`)."""
    inputs = getattr(run, "inputs", None)
    found: dict[str, str] = {}
    for item in getattr(inputs, "dataset_inputs", None) or []:
        found[item.dataset.name.rsplit("/", 1)[-1]] = item.dataset.digest
    return found
