"""Configs validate themselves, round-trip through files, and every field is a CLI option."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import recsys.config
from recsys.cli import build_parser, main
from recsys.config import ConfigError, PrepareConfig, load_config, save_config

CONFIGS = [c for c in vars(recsys.config).values() if isinstance(c, type) and dataclasses.is_dataclass(c)]
REQUIRED = {"ExportConfig": {"dataset": "synth"}, "RecommendConfig": {"user_id": "7"},
            "SimilarConfig": {"item_id": "v1"},
            "ImportConfig": {"dataset": "mine", "interactions": Path("views.csv"), "items": Path("items.csv")}}
"""What a config cannot do without: no default, or checked in __post_init__."""


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_round_trips_through_a_file(tmp_path: Path, suffix: str) -> None:
    config = PrepareConfig("microlens-50k", min_weight=3.5, split="temporal", test_fraction=0.2)
    assert load_config(PrepareConfig, save_config(config, tmp_path / f"c{suffix}")) == config


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_every_config_validates_its_defaults(tmp_path: Path, config_class: type) -> None:
    config = config_class(**REQUIRED.get(config_class.__name__, {}))
    assert load_config(config_class, save_config(config, tmp_path / "c.json")) == config


def test_invalid_values_are_rejected_with_the_field_name() -> None:
    with pytest.raises(ConfigError, match="valid_fraction"):
        PrepareConfig(valid_fraction=1.5)
    with pytest.raises(ConfigError, match="min_user_interactions"):
        PrepareConfig(min_user_interactions=0)


def test_unknown_field_in_a_saved_config_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text('{"dataset": "synth", "min_ratting": 3}')
    with pytest.raises(ConfigError, match="unknown field.*min_ratting"):
        load_config(PrepareConfig, tmp_path / "c.json")


def test_help_lists_every_field_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["data", "prepare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--min-weight", "--min-user-interactions", "--split", "--on-bad-lines"):
        assert flag in text
    assert "(default: 5)" in text and "(default: leave-one-out)" in text


def test_command_line_overrides_a_saved_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_config(PrepareConfig("synth", min_item_interactions=7, min_user_interactions=9), tmp_path / "c.yaml")
    status = main([
        "data", "prepare", "--config", str(tmp_path / "c.yaml"), "--min-item-interactions", "3",
        "--raw-dir", str(tmp_path / "nowhere"), "--save-config", str(tmp_path / "resolved.json"),
    ])
    assert status == 1  # no raw data there: a clear error, but the config was resolved first
    resolved = load_config(PrepareConfig, tmp_path / "resolved.json")
    assert (resolved.dataset, resolved.min_item_interactions, resolved.min_user_interactions) == ("synth", 3, 9)
    assert "recsys data synth" in capsys.readouterr().err


def test_bad_option_value_exits_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "prepare", "movielens-100k", "--valid-fraction", "2"])
    assert exit_info.value.code == 2
    assert "valid_fraction must lie in (0, 1)" in capsys.readouterr().err
