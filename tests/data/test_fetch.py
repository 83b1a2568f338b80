"""`fetch` verifies every file before writing any, and says clearly what is wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from recsys.cli import main
from recsys.config import FetchConfig
from recsys.data.fetch import SOURCES, fetch, file_digest
from recsys.errors import ChecksumError, MissingInputError


def test_fetch_from_folder_copies_verified_files(shared_data: Path, tmp_path: Path) -> None:
    folder = fetch(FetchConfig("microlens-50k", source=shared_data / "microlens", dest=tmp_path))
    assert sorted(p.name for p in folder.iterdir()) == [
        "MicroLens-50k_pairs.tsv", "MicroLens-50k_titles.csv", "videos",
    ]
    assert (folder / "videos/1002.mp4").stat().st_size == 3_475_614
    assert not list(folder.rglob("*.part"))


def test_corrupt_copy_is_rejected_and_nothing_is_written(shared_data: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(shared_data / "movielens/ml-100k", source)
    data = bytearray((source / "u.item").read_bytes())
    data[100] ^= 0x01
    (source / "u.item").write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="sha256 checksum mismatch for u.item"):
        fetch(FetchConfig("movielens-100k", source=source, dest=tmp_path / "raw"))
    assert not (tmp_path / "raw").exists()


def test_missing_required_file_is_named(shared_data: Path, tmp_path: Path) -> None:
    # the shared ml-1m copy lacks ratings.dat (see SOURCES.md)
    with pytest.raises(MissingInputError, match="required file ratings.dat not found"):
        fetch(FetchConfig("movielens-1m", source=shared_data / "movielens/ml-1m", dest=tmp_path))


def test_git_blob_digest_matches_git() -> None:
    # `printf 'hello\n' | git hash-object --stdin`
    assert file_digest(b"hello\n", "git-blob") == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert SOURCES["movielens-1m"].files[0].kind == "git-blob"


def test_cli_reports_checksum_errors_without_traceback(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "source"
    shutil.copytree(shared_data / "movielens/ml-100k", source)
    (source / "u.data").write_bytes(b"1\t1\t5\t1\n")
    status = main(["data", "fetch", "movielens-100k", "--from", str(source), "--dest", str(tmp_path / "raw")])
    assert status == 1
    assert "recsys: error:" in capsys.readouterr().err
