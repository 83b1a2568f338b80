"""Read any known dataset's raw files into the common `RawDataset` schema."""

from __future__ import annotations

from pathlib import Path

from recsys.data.schema import BadLines, RawDataset
from recsys.errors import MissingInputError


def load_raw(dataset: str, raw_dir: Path, on_bad_lines: BadLines = "error") -> RawDataset:
    """Load `raw_dir/<dataset>/` (as written by `recsys data fetch` or `recsys data synth`)."""
    folder = Path(raw_dir) / dataset
    if not folder.is_dir():
        how = "recsys data synth" if dataset == "synth" else f"recsys data fetch {dataset}"
        raise MissingInputError(f"{folder}: dataset {dataset!r} not found; run `{how}` first")
    if dataset == "movielens-100k":
        from recsys.data.movielens import load_movielens_100k

        return load_movielens_100k(folder, on_bad_lines)
    if dataset == "movielens-1m":
        from recsys.data.movielens import load_movielens_1m

        return load_movielens_1m(folder, on_bad_lines)
    if dataset == "microlens-50k":
        from recsys.data.microlens import load_microlens_50k

        return load_microlens_50k(folder, on_bad_lines)
    if dataset == "synth":
        from recsys.synthetic.generator import load_synth

        return load_synth(folder, on_bad_lines)
    raise MissingInputError(f"unknown dataset {dataset!r}")
