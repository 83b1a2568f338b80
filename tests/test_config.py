"""Configs validate themselves, every field is an option of its command, and configs round-trip
through files (`--save-config`, `--print_config`, `--config`)."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import docstring_parser
import pytest
import yaml

import recsys.config
from recsys.cli import COMMANDS, Command, main, parse
from recsys.config import ConfigError, EvaluateConfig, PrepareConfig, RecommendConfig, save_config

CONFIGS = [c for c in vars(recsys.config).values() if isinstance(c, type) and dataclasses.is_dataclass(c)]
REQUIRED = {"ExportConfig": {"dataset": "synth"}, "RecommendConfig": {"user_id": "7"},
            "SimilarConfig": {"item_id": "v1"},
            "ImportConfig": {"dataset": "mine", "interactions": Path("views.csv"), "items": Path("items.csv")},
            "CatalogueAddConfig": {"dataset": "mine", "items": Path("new.csv")},
            "ViewsAddConfig": {"dataset": "mine", "interactions": Path("views.csv")}}
"""What a config cannot do without: no default, or checked in __post_init__."""
README = Path(__file__).resolve().parents[1] / "README.md"


def command_of(config_class: type) -> Command:
    return next(c for c in COMMANDS if c.config is config_class)


def words(command: Command) -> str:
    return " ".join(command.words)


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_every_config_validates_its_defaults(config_class: type) -> None:
    config_class(**REQUIRED.get(config_class.__name__, {}))


def test_invalid_values_are_rejected_with_the_field_name() -> None:
    with pytest.raises(ConfigError, match="valid_fraction"):
        PrepareConfig(valid_fraction=1.5)
    with pytest.raises(ConfigError, match="min_user_interactions"):
        PrepareConfig(min_user_interactions=0)


@pytest.mark.parametrize("command", COMMANDS, ids=words)
def test_every_command_reads_its_saved_config_back(tmp_path: Path, command: Command) -> None:
    config = command.config(**REQUIRED.get(command.config.__name__, {}))
    path = save_config(config, tmp_path / "c.json")
    assert parse([*command.words, "--config", str(path)])[1] == config


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@pytest.mark.parametrize("config", [
    PrepareConfig("microlens-50k", min_weight=3.5, keep_unwatched_items=False, split="temporal", test_fraction=0.2),
    EvaluateConfig("synth", run_ids=("r1", "r2"), baselines=("mf",), oracle=False, ks=(5,), max_cases=100),
    RecommendConfig(user_id="u1", k=3, exclude_seen=False, history=("v1", "v2"), index="exact"),
], ids=lambda c: type(c).__name__)
def test_a_config_round_trips_through_a_file(tmp_path: Path, suffix: str, config: object) -> None:
    path = save_config(config, tmp_path / f"c{suffix}")
    assert parse([*command_of(type(config)).words, "--config", str(path)])[1] == config


@pytest.mark.parametrize("command", COMMANDS, ids=words)
def test_help_shows_every_field_with_its_docstring_and_default(command: Command,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command.words, "--help"])
    assert exit_info.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # help wraps lines, also at hyphens
    docs = {p.arg_name: p.description for cls in reversed(command.config.__mro__[:-1])  # fields of base classes too
            for p in docstring_parser.parse_from_object(cls).params}
    for f in dataclasses.fields(command.config):
        assert "".join(docs[f.name].split()) in text, f.name
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            assert "required" in text
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "null" if default is None else list(default) if isinstance(default, tuple) else default
        assert f.metadata.get("flag", "--" + f.name.replace("_", "-")) in text
        assert "default:" + "".join(str(shown).split()) in text, f.name


def test_help_of_prepare_spells_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "[DATASET]" in text and "--min-user-interactions MIN_USER_INTERACTIONS" in text
    assert "k-core: users with fewer interactions are removed, repeated until stable (type: int, default: 5)" in text
    assert "--split {leave-one-out,temporal}" in text and "default: leave-one-out" in text
    assert "--keep-unwatched-items, --no-keep-unwatched-items" in text
    assert "--config CONFIG" in text and "--print_config" in text and "--save-config SAVE_CONFIG" in text


def test_flags_keep_their_spellings() -> None:
    _, fetch, _ = parse(["data", "fetch", "movielens-1m", "--from", str(README.parent), "--dest", "raw"])
    assert (fetch.dataset, fetch.source, fetch.dest) == ("movielens-1m", README.parent, Path("raw"))
    _, recommend, _ = parse(["recommend", "--user-id", "3", "-k", "4", "--include-seen", "--history", "v1,v2", "v3"])
    assert (recommend.k, recommend.exclude_seen, recommend.history) == (4, False, ("v1", "v2", "v3"))
    _, evaluate, _ = parse(["evaluate", "synth", "--baselines", "popularity", "itemknn", "--ks", "10", "20",
                            "--no-oracle", "--max-cases", "7"])
    assert (evaluate.baselines, evaluate.ks, evaluate.oracle, evaluate.max_cases) == (
        ("popularity", "itemknn"), (10, 20), False, 7)
    _, retrieval, _ = parse(["train", "retrieval", "synth", "--no-ids", "--content", "fused", "--no-fresh-views"])
    assert (retrieval.ids, retrieval.fresh_views) == (False, False)
    _, runs, _ = parse(["runs", "compare", "run1", "run2"])
    assert (runs.action, runs.run_a, runs.run_b) == ("compare", "run1", "run2")


def test_dataset_names_are_open() -> None:
    for argv in (["data", "prepare", "my-videos"], ["train", "retrieval", "my-videos"], ["evaluate", "my-videos"],
                 ["recommend", "--dataset", "my-videos", "--user-id", "1"]):
        assert parse(argv)[1].dataset == "my-videos"


def test_command_line_overrides_a_saved_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_config(PrepareConfig("synth", min_item_interactions=7, min_user_interactions=9), tmp_path / "c.yaml")
    status = main([
        "data", "prepare", "--config", str(tmp_path / "c.yaml"), "--min-item-interactions", "3",
        "--raw-dir", str(tmp_path / "nowhere"), "--save-config", str(tmp_path / "resolved.json"),
    ])
    assert status == 1  # no raw data there: a clear error, but the config was resolved first
    assert "recsys data synth" in capsys.readouterr().err
    resolved = json.loads((tmp_path / "resolved.json").read_text())
    assert (resolved["dataset"], resolved["min_item_interactions"], resolved["min_user_interactions"]) == (
        "synth", 3, 9)
    _, config, _ = parse(["data", "prepare", "--config", str(tmp_path / "resolved.json")])
    assert (config.dataset, config.min_item_interactions, config.raw_dir) == ("synth", 3, tmp_path / "nowhere")


def test_print_config_writes_a_config_that_reads_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["evaluate", "synth", "--ks", "5", "10", "--no-oracle", "--baselines", "mf"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["ks"] == [5, 10]
    (tmp_path / "c.yaml").write_text(printed)
    assert parse(["evaluate", "--config", str(tmp_path / "c.yaml")])[1] == parse(argv)[1]


@pytest.mark.parametrize(("argv", "message"), [
    (["data", "prepare", "synth", "--valid-fraction", "2"], "recsys: error: valid_fraction must lie in (0, 1)"),
    (["data", "prepare", "--valid-fraction", "half"], 'Parser key "valid_fraction"'),
    (["data", "prepare", "--split", "random"], "leave-one-out"),
    (["evaluate", "--baselines", "popularity", "knn"], "knn"),
    (["data", "prepare", "--min-ratting", "3"], "unrecognized arguments: --min-ratting"),
    (["data", "fetch", "my-videos"], "movielens-100k"),  # only built-in datasets are fetched
    (["export"], "required"),
])
def test_bad_option_values_exit_with_one_line(argv: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("recsys: error: ") and err.count("\n") == 1 and message in err


@pytest.mark.parametrize("command", ["data prepare", "export"])
def test_unknown_field_in_a_saved_config_is_an_error(tmp_path: Path, command: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.json").write_text('{"dataset": "synth", "min_ratting": 3}')
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--config", str(tmp_path / "c.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("recsys: error: ") and "min_ratting" in err and err.count("\n") == 1


def test_a_group_without_its_command_shows_the_group(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["data"])
    assert exit_info.value.code == 2
    out = capsys.readouterr().out
    assert all(word in out for word in ("fetch", "import", "list", "prepare", "synth"))


def readme_examples() -> list[str]:
    """Every `recsys ...` in README.md, placeholders filled in; `recsys COMMAND --help` is the help test's."""
    spans = re.findall(r"`recsys ([^`]+)`", README.read_text())
    return sorted({re.sub(r"\b(NAME|DATASET)\b", "movielens-100k", s) for s in spans if "COMMAND" not in s})


@pytest.mark.parametrize("example", readme_examples())
def test_readme_examples_parse(example: str, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = shlex.split(example)
    if tuple(argv) in {c.words for c in COMMANDS}:
        return  # a command's name (the table's first column), not an example: `recsys recommend` needs a --user-id
    monkeypatch.chdir(README.parent)  # the examples' paths are relative to the repository
    command, config, _ = parse(argv)
    assert isinstance(config, command.config)


def test_help_does_not_import_the_heavy_modules() -> None:
    code = "import sys; from recsys.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n" \
           "print(sorted(m for m in ('torch', 'torchrec', 'mlflow', 'polars') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
