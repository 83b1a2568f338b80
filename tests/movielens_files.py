"""Raw MovieLens-100k files for tests that build small datasets of known structure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

GENRE_FLAGS = "|".join(["0"] * 19)
"""u.item's 19 genre columns, all off."""


def write_ml100k(folder: Path, events: Iterable[tuple[int, int, int, int]], titles: Mapping[int, str],
                 release_date: str = "01-Jan-1995") -> Path:
    """u.data from (user, item, rating, timestamp) events and u.item from {item: title}, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in events))
    (folder / "u.item").write_bytes(
        "".join(f"{item}|{title}|{release_date}||http://x|{GENRE_FLAGS}\n" for item, title in titles.items())
        .encode("latin-1")
    )
    return folder
