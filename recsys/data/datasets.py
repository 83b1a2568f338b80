"""The datasets recsys knows: built-in ones (fetched or generated) and those imported from your own files.

Every dataset lives in `<raw_dir>/<name>/`. A built-in one holds its source's own files, read onto
the canonical tables by its importer in `recsys.data.importers`; an imported one holds the
canonical tables themselves (`recsys.data.canonical`), written by `recsys data import`. Either
way `load_raw` returns the same `RawDataset`, the one way into `recsys data prepare`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import polars as pl

from recsys.config import BUILTIN_DATASETS
from recsys.data.canonical import CanonicalFolder
from recsys.data.importers.microlens import load_microlens_50k
from recsys.data.importers.movielens import load_movielens_1m, load_movielens_100k
from recsys.data.importers.synth import load_synth
from recsys.data.schema import BadLines, RawDataset
from recsys.errors import MissingInputError
from recsys.files import read_json

BUILTIN_IMPORTERS: dict[str, Callable[[Path, BadLines], RawDataset]] = {
    "movielens-100k": load_movielens_100k,
    "movielens-1m": load_movielens_1m,
    "microlens-50k": load_microlens_50k,
    "synth": load_synth,
}
assert set(BUILTIN_IMPORTERS) == set(BUILTIN_DATASETS)


def load_raw(dataset: str, raw_dir: Path, on_bad_lines: BadLines = "error") -> RawDataset:
    """The canonical tables of `raw_dir/<dataset>/`, imported, fetched or generated."""
    folder = Path(raw_dir) / dataset
    canonical = CanonicalFolder(folder)
    if canonical.exists():
        return canonical.read(dataset)
    if dataset in BUILTIN_IMPORTERS and folder.is_dir():
        return BUILTIN_IMPORTERS[dataset](folder, on_bad_lines)
    if dataset == "synth":
        how = "run `recsys data synth` first"
    elif dataset in BUILTIN_IMPORTERS:
        how = f"run `recsys data fetch {dataset}` first"
    else:
        how = (f"import it with `recsys data import {dataset} --interactions FILE --items FILE` "
               "(`recsys data list` shows the datasets there are)")
    raise MissingInputError(f"{folder}: dataset {dataset!r} not found; {how}")


def list_datasets(raw_dir: Path, processed_dir: Path) -> pl.DataFrame:
    """One row per dataset, built-in (present or not) and imported: where it is and what it holds.

    Columns: dataset, kind (built-in / imported), raw (whether its files are there), prepared,
    users, items, interactions (from the prepared meta when prepared, else from the import report).
    """
    raw_dir, processed_dir = Path(raw_dir), Path(processed_dir)
    imported = sorted(
        folder.name for folder in raw_dir.glob("*")
        if not folder.name.startswith(".") and CanonicalFolder(folder).exists() and folder.name not in BUILTIN_DATASETS
    ) if raw_dir.is_dir() else []
    rows = []
    for name in [*BUILTIN_DATASETS, *imported]:
        folder = raw_dir / name
        meta_file = processed_dir / name / "meta.json"
        counts: dict[str, int | None] = {"users": None, "items": None, "interactions": None}
        if meta_file.exists():
            meta = read_json(meta_file)["counts"]
            counts = {"users": meta["users"], "items": meta["items"], "interactions": meta["interactions"]}
        elif CanonicalFolder(folder).exists():
            report = CanonicalFolder(folder).manifest()["report"]
            counts = {"users": report["users"], "items": report["items"], "interactions": report["rows_kept"]}
        rows.append({
            "dataset": name,
            "kind": "built-in" if name in BUILTIN_DATASETS else "imported",
            "raw": folder.is_dir(),
            "prepared": meta_file.exists(),
            **counts,
        })
    schema = {"dataset": pl.String, "kind": pl.String, "raw": pl.Boolean, "prepared": pl.Boolean,
              "users": pl.Int64, "items": pl.Int64, "interactions": pl.Int64}
    return pl.DataFrame(rows, schema=schema)


def format_datasets(table: pl.DataFrame) -> str:
    """The dataset list as an aligned text table (– where a count is not known yet)."""
    header = ["dataset", "kind", "raw", "prepared", "users", "items", "interactions"]
    lines = [[
        row["dataset"], row["kind"], "yes" if row["raw"] else "no", "yes" if row["prepared"] else "no",
        *("–" if row[c] is None else f"{row[c]:,}" for c in ("users", "items", "interactions")),
    ] for row in table.iter_rows(named=True)]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=True)]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths, strict=True))
                     for line in [header, *lines])
