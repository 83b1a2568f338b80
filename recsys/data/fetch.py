"""`recsys data fetch`: get a dataset's raw files, verified against published checksums.

Files come from the official address (a zip or single files) or from a local folder given with
`--from`. Every file is verified before anything is written, and each is written to a temporary
name and renamed, so a failed fetch leaves no half-written or unverified file behind.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from recsys.config import FetchConfig
from recsys.errors import ChecksumError, MissingInputError
from recsys.files import atomic_path


@dataclass(frozen=True)
class RemoteFile:
    """One raw file of a dataset and the checksum it must have."""

    name: str
    digest: str
    kind: str = "sha256"
    """"sha256", or "git-blob" (git's SHA-1 object ID, the only published fingerprint of ml-1m's ratings)."""
    required: bool = True


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset is published and which files recsys needs from it."""

    url: str
    """A zip archive (members under `zip_folder/`) or a folder URL the file names are appended to."""
    files: tuple[RemoteFile, ...]
    zip_folder: str | None = None
    optional_folder: str | None = None
    """A subfolder copied along (with checksums checked where known) when fetching from a local folder."""


SOURCES: dict[str, DatasetSource] = {
    "movielens-100k": DatasetSource(
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        zip_folder="ml-100k",
        files=(
            RemoteFile("u.data", "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490"),
            RemoteFile("u.item", "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701"),
            RemoteFile("u.genre", "9757e0d3e6b298159a80dd48eaf938114690e911e39af97a76949ef1663610bb"),
            RemoteFile("u.user", "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c"),
            RemoteFile("README", "4883b8cf340ed0059971b33f56ad3adc88a40792108ebca3d24aafc4c82e8b52", required=False),
        ),
    ),
    "movielens-1m": DatasetSource(
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        zip_folder="ml-1m",
        files=(
            RemoteFile("ratings.dat", "77a7c4b150f588c23bb9e1f068aa996c0b413695", kind="git-blob"),
            RemoteFile("movies.dat", "0140fc2356357c1a851d0f52e893a1e4d3696df632c4141cea8d5bc3d621f0b9"),
            RemoteFile("users.dat", "1dc3a95300cb19f7c10e027daf29b8cdf1d908dab65b5edfb45950aa389a10a3"),
            RemoteFile("README", "2d5ddce86ccbd247207456165827b4b9ddf27282bca93807d4c763e28414f133", required=False),
        ),
    ),
    "microlens-50k": DatasetSource(
        url="https://recsys.westlake.edu.cn/MicroLens-50k-Dataset/",
        files=(
            RemoteFile(
                "MicroLens-50k_pairs.tsv", "46be22f478aa891b9c2a4b357c1df2ac2478793a99d58d07336e6277b6bf426d"
            ),
            RemoteFile(
                "MicroLens-50k_titles.csv", "244aad5380cbbe0fb43458cfcda5ebe820f534384602f80a64dbbcd07dd30e49"
            ),
        ),
        optional_folder="videos",
    ),
}

KNOWN_VIDEO_SHA256 = {
    "1002.mp4": "daa45173832b87deeff80bf4398dfb0edfb8b816a68127af9b45e60a4e8294fb",
    "10034.mp4": "a551c7d6369bbaea9402c296ad465b46b8021542ad1dd41dab0302071e1c75d1",
    "10040.mp4": "02be5c7fd2f26f89c6b432b89a10c143c47005a170dd0f2ca43b31b6bcb24467",
}
"""MicroLens raw videos whose checksums are known (the few small enough to ship for tests)."""


def file_digest(data: bytes, kind: str) -> str:
    """sha256 of the bytes, or git's blob object ID (sha1 over `blob <size>\\0` + bytes)."""
    if kind == "git-blob":
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return hashlib.sha256(data).hexdigest()


def verify(name: str, data: bytes, expected: RemoteFile | str, origin: str) -> None:
    """Raise a ChecksumError unless the bytes have the published checksum."""
    spec = expected if isinstance(expected, RemoteFile) else RemoteFile(name, expected)
    actual = file_digest(data, spec.kind)
    if actual != spec.digest:
        raise ChecksumError(
            f"{origin}: {spec.kind} checksum mismatch for {name}: expected {spec.digest}, got {actual}; "
            "the file is corrupt or a different version, nothing was written"
        )


def fetch(config: FetchConfig) -> Path:
    """Fetch and verify a dataset's raw files into `dest/<dataset>/`; returns that folder."""
    source = SOURCES[config.dataset]
    if config.source is not None:
        payload = _from_folder(Path(config.source), source)
    else:
        payload = _download(source)
    target = Path(config.dest) / config.dataset
    for relative, data in payload.items():
        with atomic_path(target / relative) as tmp:
            tmp.write_bytes(data)
    return target


def _find(folder: Path, name: str) -> Path | None:
    direct = folder / name
    if direct.is_file():
        return direct
    return next((p for p in sorted(folder.rglob(name)) if p.is_file()), None)


def _from_folder(folder: Path, source: DatasetSource) -> dict[str, bytes]:
    payload: dict[str, bytes] = {}
    for spec in source.files:
        path = _find(folder, spec.name)
        if path is None:
            if spec.required:
                raise MissingInputError(f"{folder}: required file {spec.name} not found (searched subfolders too)")
            continue
        data = path.read_bytes()
        verify(spec.name, data, spec, str(path))
        payload[spec.name] = data
    if source.optional_folder:
        anchor = _find(folder, source.files[0].name)
        extra = anchor.parent / source.optional_folder if anchor else None
        if extra is not None and extra.is_dir():
            for path in sorted(extra.iterdir()):
                if not path.is_file():
                    continue
                data = path.read_bytes()
                if path.name in KNOWN_VIDEO_SHA256:
                    verify(path.name, data, KNOWN_VIDEO_SHA256[path.name], str(path))
                payload[f"{source.optional_folder}/{path.name}"] = data
    return payload


def _download(source: DatasetSource) -> dict[str, bytes]:
    payload: dict[str, bytes] = {}
    if source.zip_folder is not None:
        archive = zipfile.ZipFile(io.BytesIO(_get(source.url)))
        for spec in source.files:
            member = f"{source.zip_folder}/{spec.name}"
            if member not in archive.namelist():
                if spec.required:
                    raise MissingInputError(f"{source.url}: archive has no {member}")
                continue
            data = archive.read(member)
            verify(spec.name, data, spec, source.url)
            payload[spec.name] = data
        return payload
    for spec in source.files:
        url = source.url + spec.name
        data = _get(url)
        verify(spec.name, data, spec, url)
        payload[spec.name] = data
    return payload


def _get(url: str) -> bytes:
    """Download a URL to memory through a temporary file (datasets here are at most a few hundred MB)."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, tempfile.TemporaryFile() as tmp:
            shutil.copyfileobj(response, tmp)
            tmp.seek(0)
            return tmp.read()
    except OSError as err:
        raise MissingInputError(
            f"could not download {url}: {err}; download it by hand and use `recsys data fetch --from DIR`"
        ) from err
