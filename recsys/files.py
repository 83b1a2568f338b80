"""Atomic file writes: a reader never sees a half-written output, even after a crash."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write a small JSON document atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return Path(path)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def write_parquet(frame: pl.DataFrame, path: Path) -> Path:
    """Write a polars DataFrame to parquet atomically."""
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp)
    return Path(path)
