"""The `recsys` command line: one subcommand per pipeline step, a thin layer over typed functions.

Every option comes from a field of the step's config dataclass (its docstring is the help text,
its default is shown); `--config FILE` loads a saved config and options given on the command
line override it; `--save-config FILE` writes the resolved config.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from recsys import config as cfg
from recsys.errors import RecsysError


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
        f"({summary['store']}, {c['resumed_rows']} rows already done) -> {summary['folder']} "
        f"(MLflow run {summary['mlflow_run_id']})"
    )
    for reason, count in summary["failures"].items():
        print(f"  failed {count}: {reason}")


def _runs(config: cfg.RunsConfig) -> None:
    from recsys.tracking.runs import compare_runs, format_table, runs_table, summary

    if config.action == "compare":
        assert config.run_a is not None and config.run_b is not None  # checked by RunsConfig
        comparison = compare_runs(config.run_a, config.run_b)
        print(f"a = {comparison.run_a}\nb = {comparison.run_b}")
        print("params that differ:" if comparison.params.height else "params: identical")
        if comparison.params.height:
            print(format_table(comparison.params))
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


def _recommend(config: cfg.RecommendConfig) -> None:
    from recsys.serving.recommend import Recommender, UnknownUserWarning, format_ranking

    recommender = Recommender.load(config.dataset, config.processed_dir, config.run_id, config.index)
    with _notes_to_stderr(UnknownUserWarning):  # the fallback ranking still goes to stdout
        ranking = recommender.recommend(config.user_id, config.k, config.exclude_seen, config.history)
    print(format_ranking(ranking))


def _similar(config: cfg.SimilarConfig) -> None:
    from recsys.serving.recommend import Recommender, format_ranking

    assert config.item_id is not None  # checked by SimilarConfig
    recommender = Recommender.load(config.dataset, config.processed_dir, config.run_id, config.index)
    print(format_ranking(recommender.similar(config.item_id, config.k)))


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
    Command(("serve",), cfg.ServeConfig, _serve,
            "Serve the champion ranking model (or --model URI) over REST with MLflow's model server"),
    Command(("demo",), cfg.DemoConfig, _demo,
            "The whole pipeline on the synthetic corpus: data, features, training, evaluation, registry, top-10"),
    Command(("evaluate",), cfg.EvaluateConfig, _evaluate,
            "Full-ranking HR/NDCG/MRR@K, coverage and cold-start slice of trained runs and baselines",
            ("dataset",)),
    Command(("recommend",), cfg.RecommendConfig, _recommend,
            "Top-k videos for a user (or a watch history), with titles and scores"),
    Command(("similar",), cfg.SimilarConfig, _similar,
            "Videos nearest to a video in the item embedding space (cold-start videos included)"),
]


# --------------------------------------------------------------------------------------------
# Building argparse from config dataclasses


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, positional: Sequence[str] = ()) -> None:
    """Add one argument per config field; defaults stay unset so a `--config` file can fill them."""
    docs, hints = cfg.field_docs(cls), cfg.field_types(cls)
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        default = cfg.default_of(f)
        help_text = docs.get(f.name, "")
        if default is not dataclasses.MISSING:
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
        choices = _choices(annotation)
        optional_positional = f.name in positional and default is not dataclasses.MISSING
        if choices and not optional_positional:  # argparse would check the unset default against them
            kwargs["choices"] = choices
        elif choices:
            kwargs["help"] = f"one of {', '.join(map(str, choices))}; {help_text}"
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "const" in f.metadata:  # `--flag` alone means the const, `--flag VALUE` that value
            kwargs.update(nargs="?", const=f.metadata["const"])
        elif typing.get_origin(annotation) is tuple:
            kwargs["nargs"] = "+"
        if f.name in positional:
            parser.add_argument(f.name, metavar=f.name.upper(), nargs="?" if optional_positional else None, **kwargs)
        elif annotation is bool and "negative_flag" in f.metadata:
            # A named pair such as --exclude-seen / --include-seen instead of --x / --no-x.
            del kwargs["action"]
            pair = parser.add_mutually_exclusive_group()
            pair.add_argument(_flag(f), dest=f.name, action="store_true", **kwargs)
            pair.add_argument(f.metadata["negative_flag"], dest=f.name, action="store_false",
                              default=argparse.SUPPRESS, help=f"the opposite of {_flag(f)}")
        else:
            parser.add_argument(_flag(f), *f.metadata.get("aliases", ()), dest=f.name, **kwargs)


def _choices(annotation: Any) -> tuple | None:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if len(args) == 1 and typing.get_origin(args[0]) is Literal:
        return typing.get_args(args[0])
    return None


def config_from_args(cls: type, namespace: argparse.Namespace) -> Any:
    """Build the config: saved file (if any), then the options given on the command line."""
    given = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)}
    if namespace.config is not None:
        return cfg.load_config(cls, namespace.config, **_coerced(cls, given))
    return cfg.from_dict(cls, given, source="command line")


def _coerced(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    hints = cfg.field_types(cls)
    return {name: cfg.coerce(value, hints[name], name) for name, value in values.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys",
        description="Multimodal video recommendation: prepare data, train, evaluate, recommend.",
    )
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {(): parser.add_subparsers(title="commands")}
    for command in COMMANDS:
        for depth in range(1, len(command.words)):
            prefix = command.words[:depth]
            if prefix not in groups:
                group_parser = groups[prefix[:-1]].add_parser(prefix[-1], help=f"{prefix[-1]} commands")
                groups[prefix] = group_parser.add_subparsers(title=f"{' '.join(prefix)} commands")
                group_parser.set_defaults(command=None, group_parser=group_parser)
        sub = groups[command.words[:-1]].add_parser(
            command.words[-1], help=command.help, description=command.help
        )
        add_config_arguments(sub, command.config, command.positional)
        sub.add_argument("--config", type=Path, default=None, help="Load the config from a saved JSON/YAML file")
        sub.add_argument("--save-config", type=Path, default=None, help="Write the resolved config to this file")
        sub.set_defaults(command=command)
    parser.set_defaults(command=None, group_parser=parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `recsys` console script."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    command: Command | None = namespace.command
    if command is None:
        namespace.group_parser.print_help()
        return 2
    try:
        config = config_from_args(command.config, namespace)
    except cfg.ConfigError as err:
        parser.exit(2, f"recsys: error: {err}\n")
    if namespace.save_config is not None:
        cfg.save_config(config, namespace.save_config)
    try:
        command.run(config)
    except RecsysError as err:
        print(f"recsys: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
