"""Errors that recsys reports to its users as a plain message (no traceback)."""

from __future__ import annotations

from typing import Any

import numpy as np


class RecsysError(Exception):
    """Base class: a problem with the user's input, data or environment, explained in the message."""


class DataFormatError(RecsysError, ValueError):
    """An input file does not have the promised format; the message names the file and line."""


class ChecksumError(RecsysError):
    """A file's checksum differs from the published one."""


class MissingInputError(RecsysError, FileNotFoundError):
    """A step's input (a raw file, a prepared dataset, a model) does not exist yet."""


class InvalidScoreError(RecsysError, ValueError):
    """A model returned a score that is NaN or infinite: no ranking is made from it; the message names the model."""


def check_finite(values: Any, what: str, rows: np.ndarray, row_name: str, consequence: str) -> None:
    """Raise `InvalidScoreError` if `values` (B, C) (an array or a CPU tensor) hold NaN or ±inf.

    The one check of evaluation (a scorer's scores) and serving (a model's user and item vectors):
    the message says what held them, how many of how many, the first one (row `rows[r]`, named
    `row_name`; its column and value), and `consequence`, what is not done with them.
    """
    array = np.asarray(values)
    bad = ~np.isfinite(array)  # (B, C)
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        raise InvalidScoreError(
            f"{what}: {int(bad.sum())} NaN or infinite values in {array.shape[0]} rows x {array.shape[1]} "
            f"(the first: {row_name} {rows[row]}, column {column}, value {array[row, column]}); {consequence}")
