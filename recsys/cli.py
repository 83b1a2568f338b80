"""The `recsys` command line: one subcommand per pipeline step, a thin layer over typed functions.

Parsed by jsonargparse (the parser LightningCLI is built on): every entry of `COMMANDS` is a
subcommand whose options are the fields of its config dataclass (`recsys.config.config_parser`:
the field's docstring is the help text, its type and default are shown). `--config FILE` reads a
JSON/YAML config and options after it override it; `--print_config` prints the resolved config
and exits; `--save-config FILE` writes it and runs the command.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jsonargparse import SUPPRESS, ArgumentError, ArgumentParser

from recsys import config as cfg
from recsys.errors import RecsysError

if TYPE_CHECKING:
    import polars as pl

    from recsys.serving.index import IndexKind
    from recsys.serving.recommend import Recommender


@dataclass(frozen=True)
class Command:
    """One subcommand: its words, its config class and the function that runs it."""

    words: tuple[str, ...]
    config: type
    run: Callable[[Any], None]
    help: str
    positional: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Subcommands. Heavy modules are imported inside each, so `recsys --help` stays fast.


def _data_fetch(config: cfg.FetchConfig) -> None:
    from recsys.data.fetch import fetch

    folder = fetch(config)
    print(f"{config.dataset}: files verified and written to {folder}")


def _data_prepare(config: cfg.PrepareConfig) -> None:
    from recsys.data.prepare import prepare

    meta = prepare(config)
    counts = meta["counts"]
    print(
        f"{config.dataset}: {counts['users']} users, {counts['items']} items, "
        f"train {counts['train']}, valid {counts['valid']}, test {counts['test']} "
        f"-> {meta['output_dir']} (MLflow run {meta['mlflow_run_id']})"
    )
    for reason, count in meta["rejected"].items():
        if count:
            print(f"  rejected {count} interaction(s): {reason}")


def _data_import(config: cfg.ImportConfig) -> None:
    from recsys.data.importers.files import import_dataset

    report = import_dataset(config)
    print(report.summary())


def _data_list(config: cfg.ListConfig) -> None:
    from recsys.data.datasets import format_datasets, list_datasets

    print(format_datasets(list_datasets(config.raw_dir, config.processed_dir)))


def _data_synth(config: cfg.SynthConfig) -> None:
    from recsys.files import read_json
    from recsys.synthetic.generator import synthesize

    folder = synthesize(config)
    counts = read_json(folder / "synth.json")["counts"]
    print(
        f"synth: {counts['videos']} videos ({counts['cold_videos']} cold-start, "
        f"{counts['videos_without_audio']} without audio), {counts['users']} users, "
        f"{counts['events']} watch events, {counts['topics']} topics -> {folder}"
    )


def _ingest(config: cfg.IngestConfig) -> None:
    from recsys.media.ingest import ingest

    summary = ingest(config)
    c = summary["counts"]
    print(
        f"{config.dataset}: {c['items']} items: {c['ok']} ok, {c['failed']} failed; "
        f"videos in {c['videos_in']} = {c['videos_ok']} ok + {c['videos_failed']} failed; "
        f"{c['with_audio']} with audio, {c['with_title']} with a title "
        f"({summary['store']}, {c['resumed_rows']} rows already done, {c['carried_over_rows']} carried over "
        f"from the previous store) -> {summary['folder']} "
        f"(MLflow run {summary['mlflow_run_id']})"
    )
    for reason, count in summary["failures"].items():
        print(f"  failed {count}: {reason}")


def _runs(config: cfg.RunsConfig) -> None:
    import polars as pl

    from recsys.tracking.runs import compare_runs, format_table, runs_table, summary

    if config.action == "compare":
        assert config.run_a is not None and config.run_b is not None  # checked by RunsConfig
        comparison = compare_runs(config.run_a, config.run_b)
        name_a, name_b = (f" ({name})" if name else "" for name in comparison.names)
        print(f"a = {comparison.run_a}{name_a}\nb = {comparison.run_b}{name_b}")
        print("params that differ:" if comparison.params.height else "params: identical")
        if comparison.params.height:
            print(format_table(comparison.params))
        if comparison.datasets.height:  # digests of the tables each run read (the UI's Dataset column)
            same = comparison.datasets.filter(pl.col("a") == pl.col("b")).height == comparison.datasets.height
            print("datasets: identical" if same else "datasets (digests):")
            if not same:
                print(format_table(comparison.datasets))
        print("metrics (delta = b - a):" if comparison.metrics.height else "metrics: none logged")
        if comparison.metrics.height:
            print(format_table(comparison.metrics))
        return
    table = runs_table(config.experiment, config.sort_by, config.ascending, config.limit, config.step)
    if table.is_empty():
        print("no runs match: run a pipeline step (e.g. `recsys demo`) first, or list without filters")
        return
    shown = list(config.metrics) or ([config.sort_by] if config.sort_by else None)
    print(format_table(summary(table, shown)))


def _export(config: cfg.ExportConfig) -> None:
    from recsys.serving.export import export

    result = export(config)
    print(f"{config.dataset}: exported {result.model_uri} as version {result.version} of recsys-{config.dataset} "
          f"(validation NDCG@10 {result.val_metrics['val_ndcg_10']:.4f}, MLflow run {result.run_id})")
    print(("champion moved: " if result.decision.promoted else "champion kept: ") + result.decision.reason)


def _catalogue_add(config: cfg.CatalogueAddConfig) -> None:
    from recsys.serving.live_catalogue import add_videos

    print(add_videos(config).summary())


def _views_add(config: cfg.ViewsAddConfig) -> None:
    from recsys.serving.live_catalogue import add_views

    print(add_views(config).summary())


def _serve(config: cfg.ServeConfig) -> None:
    from recsys.serving.serve import serve

    code = serve(config)
    if code not in (0, 130):
        raise SystemExit(code)


def _train_content(config: cfg.ContentConfig) -> None:
    from recsys.content.train import train_content

    result = train_content(config)
    probe = f", topic probe (fused) {result['probe_fused']:.3f}" if "probe_fused" in result else ""
    print(f"{config.dataset}: content encoders trained {result['epochs']} epoch(s), best validation loss "
          f"{result['best_val_loss']:.4f}{probe}; embeddings of every item -> {result['store']} "
          f"(MLflow run {result['run_id']})")


def _train_retrieval(config: cfg.RetrievalConfig) -> None:
    from recsys.twotower.train import train_retrieval

    result = train_retrieval(config)
    print(f"{config.dataset}: two-tower model (content: {result.content_source}) trained {result.epochs} epoch(s), "
          f"best validation NDCG@10 {result.best_val_ndcg:.4f} -> {result.model_dir} (MLflow run {result.run_id})")


@contextmanager
def _notes_to_stderr(category: type[Warning]) -> Iterator[None]:
    """Print warnings of `category` raised in the block as plain `recsys: ...` lines on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", category)
        yield
    for note in caught:
        if issubclass(note.category, category):
            print(f"recsys: {note.message}", file=sys.stderr)
        else:
            warnings.showwarning(note.message, note.category, note.filename, note.lineno)


def _evaluate(config: cfg.EvaluateConfig) -> None:
    from recsys.evaluation.evaluate import SkippedModelWarning, evaluate, format_results

    with _notes_to_stderr(SkippedModelWarning):  # e.g. no trained model yet: the baselines are still evaluated
        table = evaluate(config)
    print(format_results(table, config.ks))


def _model_recommender(config: cfg.RecommendConfig | cfg.SimilarConfig | cfg.SearchConfig,
                       index: IndexKind | None) -> Recommender:
    """The recommender of the registered version the config names (as `recsys serve` loads it), or of a
    trained model folder with --run-id; says on stderr which model ranks. `index`: its item index
    (None: the exported one)."""
    from recsys.serving.recommend import Recommender
    from recsys.serving.served_model import load_ranker

    if config.run_id is not None:
        print(f"recsys: model: trained run {config.run_id} (not from the registry)", file=sys.stderr)
        return Recommender.load(config.dataset, config.processed_dir, config.run_id, index or "auto")
    ranker = load_ranker(config.dataset, config.processed_dir, config.version, config.alias, index)
    chosen = f"version {config.version}" if config.version is not None else f"alias {config.alias}"
    print(f"recsys: model: models:/recsys-{config.dataset}/{ranker.version} ({chosen})", file=sys.stderr)
    return ranker.recommender


def _print_ranking(ranking: pl.DataFrame, style: str) -> None:
    from recsys.serving.recommend import format_ranking

    if style == "json":
        print(ranking.write_json())
    elif style == "csv":
        print(ranking.write_csv(), end="")
    else:
        print(format_ranking(ranking))


def _recommend(config: cfg.RecommendConfig) -> None:
    from recsys.serving.recommend import UnknownUserWarning, write_all_users

    recommender = _model_recommender(config, config.index)
    if config.all_users:
        assert config.out is not None  # checked by RecommendConfig
        rows, users = write_all_users(recommender, config.out, config.k, config.exclude_seen, config.batch_size)
        print(f"{config.dataset}: top-{config.k} of {users} users ({rows} rows) -> {config.out}")
        return
    with _notes_to_stderr(UnknownUserWarning):  # the fallback ranking still goes to stdout
        ranking = recommender.recommend(config.user_id, config.k, config.exclude_seen, config.history, config.explain)
    _print_ranking(ranking, config.format)


def _similar(config: cfg.SimilarConfig) -> None:
    assert config.item_id is not None  # checked by SimilarConfig
    _print_ranking(_model_recommender(config, config.index).similar(config.item_id, config.k), config.format)


def _search(config: cfg.SearchConfig) -> None:
    from recsys.serving.recommend import UnknownUserWarning
    from recsys.serving.search import SearchWarning, VideoSearch, format_matches

    engine = VideoSearch.load(config.dataset, config.processed_dir, config.lexical_weight)
    # The user's taste is the served model's score, as `recommend` and REST search rank with it.
    recommender = _model_recommender(config, None) if config.user_id is not None else None
    with _notes_to_stderr(SearchWarning), _notes_to_stderr(UnknownUserWarning):  # the fallback still goes to stdout
        ranking = engine.search(config.query, config.k, config.user_id, recommender, config.rerank_depth)
    print(ranking.write_json() if config.output == "json" else format_matches(ranking))


def _demo(config: cfg.DemoConfig) -> None:
    from recsys.demo import demo

    demo(config)


COMMANDS: list[Command] = [
    Command(("data", "fetch"), cfg.FetchConfig, _data_fetch,
            "Copy or download a dataset's raw files and verify their checksums", ("dataset",)),
    Command(("data", "import"), cfg.ImportConfig, _data_import,
            "Import your own watch log and catalogue (CSV, TSV, Parquet, JSON Lines) as a new dataset NAME",
            ("dataset",)),
    Command(("data", "list"), cfg.ListConfig, _data_list,
            "List the built-in and imported datasets with their counts"),
    Command(("data", "prepare"), cfg.PrepareConfig, _data_prepare,
            "Filter, index and split a dataset's interactions into parquet files", ("dataset",)),
    Command(("data", "synth"), cfg.SynthConfig, _data_synth,
            "Generate the synthetic video corpus (MP4s, titles, watch log, latent truth) into data/raw/synth"),
    Command(("ingest",), cfg.IngestConfig, _ingest,
            "Decode a prepared dataset's videos, audio and titles into the memory-mapped feature store",
            ("dataset",)),
    Command(("runs",), cfg.RunsConfig, _runs,
            "List MLflow runs with key params and metrics, or compare two: `recsys runs compare RUN_A RUN_B`",
            ("action", "run_a", "run_b")),
    Command(("train", "content"), cfg.ContentConfig, _train_content,
            "Train the multimodal content encoders and write every video's embeddings to the feature store",
            ("dataset",)),
    Command(("train", "retrieval"), cfg.RetrievalConfig, _train_retrieval,
            "Train the two-tower retrieval model (TorchRec) on a prepared dataset", ("dataset",)),
    Command(("export",), cfg.ExportConfig, _export,
            "Register a trained model as an MLflow pyfunc ranking model; `champion` moves only if it wins",
            ("dataset",)),
    Command(("catalogue", "add"), cfg.CatalogueAddConfig, _catalogue_add,
            "Add (or update) videos in the served model without retraining: decoded, embedded, a new version",
            ("dataset",)),
    Command(("views", "add"), cfg.ViewsAddConfig, _views_add,
            "Add watch events after training to the served model: histories and fresh popularity, a new version",
            ("dataset",)),
    Command(("serve",), cfg.ServeConfig, _serve,
            "Serve the champion ranking model (or --model URI) over REST with MLflow's model server"),
    Command(("demo",), cfg.DemoConfig, _demo,
            "The whole pipeline on the synthetic corpus: data, features, training, evaluation, registry, top-10"),
    Command(("evaluate",), cfg.EvaluateConfig, _evaluate,
            "Full-ranking HR/NDCG/MRR@K, coverage and cold-start slice of trained runs and baselines",
            ("dataset",)),
    Command(("recommend",), cfg.RecommendConfig, _recommend,
            "Top-k videos for a user (or a watch history), with titles and scores"),
    Command(("search",), cfg.SearchConfig, _search,
            "Videos matching a text query, by what they show and sound like and by their titles",
            ("dataset", "query")),
    Command(("similar",), cfg.SimilarConfig, _similar,
            "Videos nearest to a video in the item embedding space (cold-start videos included)"),
]


# --------------------------------------------------------------------------------------------
# Parsing: jsonargparse subcommands, one per command, each built from its config class


def build_parsers() -> dict[tuple[str, ...], ArgumentParser]:
    """The parser of every command and command group by its words; `()` is `recsys` itself.

    Each command's parser is `config_parser` of its config class (its options, `--config FILE`,
    `--print_config`) plus `--save-config FILE`; groups (`data`, `train`) nest as jsonargparse
    subcommands.
    """
    description = "Multimodal video recommendation: prepare data, train, evaluate, recommend."
    parsers = {(): ArgumentParser(prog="recsys", description=description, exit_on_error=False)}
    subcommands: dict[tuple[str, ...], Any] = {}

    def add(words: tuple[str, ...], parser: ArgumentParser, help: str) -> None:
        group = words[:-1]
        if group not in subcommands:  # a group's subcommands are added after the group joined its parent
            title = f"{' '.join(('recsys', *group))} commands"
            subcommands[group] = parsers[group].add_subcommands(required=False, title=title)
        subcommands[group].add_subcommand(words[-1], parser, help=help)
        parsers[words] = parser

    for command in COMMANDS:
        for depth in range(1, len(command.words)):
            group = command.words[:depth]
            if group not in parsers:
                add(group, ArgumentParser(description=f"{' '.join(group)} commands"), f"{group[-1]} commands")
        parser = cfg.config_parser(command.config, command.positional, description=command.help)
        parser.add_argument("--save-config", type=Path, default=SUPPRESS,
                            help="Write the resolved config to this file (JSON, or YAML by a .yaml suffix)")
        add(command.words, parser, command.help)
    return parsers


def parse(argv: Sequence[str] | None = None) -> tuple[Command, Any, Path | None]:
    """The command a command line names, its resolved and validated config, and where to save it;
    nothing is run.

    Raises ArgumentError for an option jsonargparse rejects and ConfigError for a value the config
    rejects; `--help` and `--print_config` exit 0, a group without its command (`recsys data`)
    prints the group's help and exits 2.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parsers = build_parsers()
    try:
        options = parsers[()].parse_args(argv)
    except ArgumentError as err:
        named = next((c.words for c in COMMANDS if tuple(argv[: len(c.words)]) == c.words), ())
        if len(named) > 1 and type(err.__cause__) is KeyError:
            # jsonargparse 4.53 trips (KeyError) over an unknown key in the --config file of a nested
            # subcommand (`data prepare`); the command's own parser names the key.
            parsers[named].parse_args(argv[len(named):])
        raise
    words: tuple[str, ...] = ()
    while options.get("subcommand"):
        words += (options.subcommand,)
        options = options[options.subcommand]
    command = next((c for c in COMMANDS if c.words == words), None)
    if command is None:
        parsers[words].print_help()
        raise SystemExit(2)
    return command, cfg.config_from(command.config, options), options.get("save_config")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `recsys` console script."""
    try:
        command, config, save_to = parse(argv)
    except (ArgumentError, cfg.ConfigError) as err:
        print("recsys: error: " + " ".join(str(err).split()), file=sys.stderr)  # one line, no usage dump
        raise SystemExit(2) from None
    if save_to is not None:
        cfg.save_config(config, save_to)
    try:
        command.run(config)
    except RecsysError as err:
        print(f"recsys: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
