"""A live catalogue: new videos and new views reach the served model without retraining.

`recsys catalogue add NAME --items FILE` and `recsys views add NAME --interactions FILE` each take
the registered version (alias `champion` unless told), change a copy of its bundle and register
that as the next version, which takes the alias when the version it updates held it. The previous
version stays in the registry, loadable by its number. No gradient step is taken:

- **videos** (`add_videos`): the items file is read as `recsys data import` reads a catalogue
  (same columns, same checks; a bad row changes nothing). Only these videos are decoded, into a
  feature store of their own under `<processed_dir>/<dataset>/additions/<batch>/` with the
  dataset's decoding settings (a rerun of the same batch resumes it), embedded by the trained
  content encoder and the champion's item tower (`recsys.twotower.catalogue_update.with_videos`)
  and appended to the catalogue; an ID already in it gets its new title and video.
- **views** (`add_views`): the file is read as `data import` reads a watch log. Views of videos
  the served catalogue lacks are counted and skipped (`--strict`: an error). The views extend
  their users' histories, which the user tower reads; those after the training cut-off (the last
  training view) become fresh views, and a video without training views is folded in from its
  viewers (`recsys.twotower.catalogue_update.with_views`). A user the model never trained on is
  ranked from their added views instead of by popularity.

The updated bundle carries the added views (`PreparedPaths.added_views`: user_id, item_idx,
timestamp), so `recommend`, `similar`, the notebooks and `recsys serve` answer from the same state.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import torch

from recsys.config import CatalogueAddConfig, IngestConfig, ViewsAddConfig, to_dict
from recsys.data.histories import UNKNOWN_USER
from recsys.data.paths import PreparedPaths
from recsys.errors import DataFormatError, MissingInputError
from recsys.files import read_json, write_json
from recsys.media.feature_store import write_array
from recsys.serving.pyfunc_model import RANKER_FILE, Ranker
from recsys.serving.served_model import ServedModel, served_model

if TYPE_CHECKING:
    from recsys.media.feature_store import FeatureStore

POPULATION_USERS = 4096
"""Users sampled to stand for every viewer when a new video's embedding is fitted to its views."""
ADDITIONS_DIR = "additions"
"""Folder of a prepared dataset where `catalogue add` decodes each batch of new videos."""


@dataclass
class UpdateResult:
    """What an update registered, and what it read."""

    dataset: str
    kind: str
    """"videos" (catalogue add) or "views" (views add)"""
    base_version: str
    rows_read: int
    added: int
    """Videos added (catalogue add) or views added (views add)"""
    updated: int = 0
    """Videos already in the catalogue whose title or video changed (catalogue add)"""
    fresh: int = 0
    """Added views after the training cut-off, which count towards fresh popularity (views add)"""
    skipped: dict[str, int] = field(default_factory=dict)
    """Rows not used, by reason"""
    version: str = ""
    """The registered version holding the update"""
    promoted: bool = False
    """Whether the version took the alias (it does when the version it updates held it)"""
    reason: str = ""
    seconds: float = 0.0
    run_id: str = ""

    def summary(self) -> str:
        what = "video(s)" if self.kind == "videos" else "view(s)"
        skipped = ", ".join(f"{n:,} {reason}" for reason, n in self.skipped.items() if n) or "none"
        alias = "champion moved to it" if self.promoted else "champion unchanged"
        return (f"{self.dataset}: {self.rows_read:,} rows read, {self.added:,} {what} added"
                + (f", {self.updated:,} updated" if self.updated else "")
                + (f" ({self.fresh:,} after the training cut-off)" if self.kind == "views" else "")
                + f", skipped: {skipped}; "
                f"registered version {self.version} (update of v{self.base_version}; {alias}) in {self.seconds:.1f} s")


# --------------------------------------------------------------------------------------------
# The bundle being updated


class EditableBundle:
    """A copy of a served version's bundle in a temporary folder, to change and register."""

    def __init__(self, served: ServedModel, folder: Path) -> None:
        shutil.copytree(served.bundle, folder)
        self.served = served
        self.folder = folder
        self.info = read_json(folder / RANKER_FILE)
        self.dataset = str(self.info["dataset"])
        self.paths = PreparedPaths.of(folder, self.dataset)
        self.run_id = str(self.info["train_run_id"])

    def scorer(self) -> Any:
        from recsys.twotower.trained_model import load_trained

        return load_trained(self.folder, self.dataset, self.run_id)

    def save_model(self, model: Any, scorer_info: dict[str, Any]) -> None:
        from recsys.twotower.trained_model import save_trained

        save_trained(model, self.folder, self.dataset, self.run_id, scorer_info)

    def note(self, update: dict[str, Any]) -> None:
        """Record the update in ranker.json (what the version is: its base and every change since training)."""
        self.info.setdefault("updates", []).append(update)
        write_json(self.folder / RANKER_FILE, self.info)


def _publish(bundle: EditableBundle, step: str, config: Any, result: UpdateResult, description: str) -> None:
    """Log the changed bundle as a pyfunc model in an MLflow run of `step`, register it as the next version."""
    import mlflow

    from recsys.serving.export import input_example, log_ranker, validation_metrics
    from recsys.serving.registry import register
    from recsys.tracking.store import start_run

    ranker = Ranker(bundle.folder)
    val = validation_metrics(ranker, bundle.paths)
    inputs = {"base_version": bundle.served.version, "train_retrieval": bundle.run_id}
    with start_run(bundle.dataset, step, to_dict(config), inputs, f"{step} v{bundle.served.version}") as run:
        mlflow.log_metrics({**val, "count.rows_read": result.rows_read, "count.added": result.added,
                            "count.updated": result.updated, "count.skipped": sum(result.skipped.values())})
        logged = log_ranker(bundle.folder, input_example(bundle.paths))
        decision = register(logged.model_uri, bundle.dataset, val["val_ndcg_10"], bundle.run_id, run.info.run_id,
                            description, update_of=bundle.served.version)
        mlflow.set_tags({"recsys.model_version": decision.version, "recsys.champion.reason": decision.reason})
    result.version, result.promoted, result.reason, result.run_id = (decision.version, decision.promoted,
                                                                     decision.reason, run.info.run_id)


# --------------------------------------------------------------------------------------------
# catalogue add


def add_videos(config: CatalogueAddConfig) -> UpdateResult:
    """Decode, embed and add the videos of `config.items` to the served model; see the module docstring."""
    from recsys.content.embed_items import embed_store
    from recsys.data.importers.files import read_catalogue
    from recsys.twotower.catalogue_update import with_videos

    started = time.perf_counter()
    served = served_model(config.dataset, config.processed_dir, config.version, config.alias)
    catalogue = read_catalogue(config)  # the catalogue options of `data import`
    if catalogue.items.is_empty():
        raise DataFormatError(f"{config.items}: no video is left to add ({catalogue.skipped})")
    with tempfile.TemporaryDirectory(prefix="recsys-catalogue-") as tmp:
        bundle = EditableBundle(served, Path(tmp) / "bundle")
        items = pl.read_parquet(bundle.paths.items).sort("item_idx")
        lookup = dict(zip(items["item_id"].to_list(), items["item_idx"].to_list(), strict=True))
        new = catalogue.items.with_columns(
            pl.col("item_id").replace_strict(lookup, default=None, return_dtype=pl.Int64).alias("item_idx"))
        fresh = new["item_idx"].is_null()
        new = new.with_columns(pl.when(fresh).then(len(items) + fresh.cum_sum() - 1).otherwise(pl.col("item_idx"))
                               .alias("item_idx"))
        media_root = None if config.media_root is None else config.media_root.resolve()
        new = new.with_columns(pl.col("video_path").map_elements(
            lambda p: str(media_root / p) if media_root is not None else p, return_dtype=pl.String))
        scorer = bundle.scorer()
        source = scorer.spec.content_source
        store = _decode_new(config, new, source)
        features = PreparedPaths.of(config.processed_dir, config.dataset).features
        content = embed_store(store, source, features)  # (M, C)
        try:
            grown = with_videos(scorer.model, content, new["item_idx"].to_numpy())
        except ValueError as err:
            raise DataFormatError(f"{config.dataset} v{served.version}: {err}") from None
        _write_items(bundle, items, new)
        _write_search_content(bundle, new["item_idx"].to_numpy(), content if source == "fused" else None, store,
                              features)
        bundle.save_model(grown, scorer.info)
        added, updated = int(fresh.sum()), int((~fresh).sum())
        bundle.note({"kind": "videos", "added": added, "updated": updated, "source": str(config.items)})
        result = UpdateResult(config.dataset, "videos", served.version, catalogue.rows_read, added, updated=updated,
                              skipped=dict(catalogue.skipped))
        assert result.rows_read == added + updated + sum(result.skipped.values())
        _publish(bundle, "catalogue_add", config, result,
                 f"Update of v{served.version}: {added} video(s) added and {updated} updated from {config.items}, "
                 "embedded from their content without retraining.")
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def _write_items(bundle: EditableBundle, items: pl.DataFrame, new: pl.DataFrame) -> None:
    """The bundle's catalogue with the new rows appended and the updated ones replaced (training counts kept)."""
    columns = [c for c in items.columns if c in new.columns]
    counts = items.select("item_idx", *(c for c in items.columns if c not in new.columns))
    merged = (pl.concat([items.filter(~pl.col("item_idx").is_in(new["item_idx"].implode())).select(columns),
                         new.select(columns).cast(items.select(columns).schema)])
              .join(counts, on="item_idx", how="left").sort("item_idx"))
    fill = {c: pl.col(c).fill_null(0) for c in counts.columns if c != "item_idx" and items.schema[c].is_integer()}
    merged = merged.with_columns(**fill).select(items.columns)
    merged.write_parquet(bundle.paths.items)
    popularity = pl.read_parquet(bundle.paths.popularity)
    extra = pl.DataFrame({"item_idx": np.arange(len(popularity), merged.height)}).with_columns(
        pl.lit(0).cast(popularity.schema["count"]).alias("count")).cast(popularity.schema)
    pl.concat([popularity, extra]).write_parquet(bundle.paths.popularity)
    meta = read_json(bundle.paths.meta)
    meta["n_items"] = merged.height
    write_json(bundle.paths.meta, meta)


def _write_search_content(bundle: EditableBundle, rows: np.ndarray, fused: np.ndarray | None, store: FeatureStore,
                          features: Path) -> None:
    """Give the new `rows` (item_idx) their fused content embedding (and their windows and length) in the
    bundle's search files, if it has them.

    `fused` (M, C): already computed (a model that reads fused content), else embedded from `store`.
    """
    from recsys.content.embed_items import embed_store, trained_encoder
    from recsys.content.windows import ClipWindows, embed_windows, read_windows, write_windows
    from recsys.serving.search import CONTENT_EMBEDDING_FILE

    folder = bundle.paths.features
    path = folder / CONTENT_EMBEDDING_FILE
    if not path.exists():  # exported without a content model: the version cannot search anyway
        return
    if fused is None:
        fused = embed_store(store, "fused", features)  # (M, C)
    old = np.load(path)  # (N, C)
    n = int(pl.read_parquet(bundle.paths.items, columns=["item_idx"]).height)
    grown = np.zeros((n, old.shape[1]), dtype=np.float32)  # (N', C)
    grown[: len(old)] = old
    grown[rows] = fused
    write_array(folder, CONTENT_EMBEDDING_FILE.removesuffix(".npy"), grown)
    windows = read_windows(folder)
    if windows is None:  # a bundle of a content model trained before windows were written
        return
    new = embed_windows(trained_encoder(features), store)  # item_idx: rows of `store`
    kept = ~np.isin(windows.item_idx, rows)  # an updated video's old windows go
    seconds = np.full(n, np.nan, dtype=np.float32)
    seconds[: len(windows.seconds)] = windows.seconds
    seconds[rows] = new.seconds
    write_windows(folder, ClipWindows(
        item_idx=np.concatenate([windows.item_idx[kept], rows[new.item_idx]]),
        start_s=np.concatenate([windows.start_s[kept], new.start_s]),
        end_s=np.concatenate([windows.end_s[kept], new.end_s]),
        vectors=np.concatenate([windows.vectors[kept], new.vectors]), seconds=seconds))


def _decode_new(config: CatalogueAddConfig, new: pl.DataFrame, source: str) -> FeatureStore:
    """The new rows decoded in a feature store of their own, with the dataset's decoding settings."""
    from recsys.media.feature_store import FeatureStore
    from recsys.media.ingest import ingest

    if source not in ("title", "fused"):
        raise DataFormatError(f"{config.dataset}: the served model reads no content (content {source!r}), so it "
                              "cannot embed videos it never trained on; retrain with `--content auto` to add videos")
    dataset_paths = PreparedPaths.of(config.processed_dir, config.dataset)
    features = dataset_paths.features
    if not (features / "store.json").exists():
        raise MissingInputError(f"{features} holds no feature store: `recsys catalogue add` decodes new videos "
                                f"with the dataset's settings; run `recsys ingest {config.dataset}` first")
    store_info = read_json(features / "store.json")
    batch = hashlib.sha256(new.select("item_id", "title", "text", "video_path").write_csv().encode()).hexdigest()[:16]
    delta_dir = dataset_paths.root / ADDITIONS_DIR / batch
    delta = PreparedPaths.of(delta_dir, config.dataset)
    delta.root.mkdir(parents=True, exist_ok=True)
    rows = new.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("item_idx"))
    rows.select("item_idx", "item_id", "title", "text", "video_path").write_parquet(delta.items)
    write_json(delta.meta, {"dataset": config.dataset, "n_items": rows.height, "kind": "catalogue addition"})
    identity, layout = store_info["identity"], store_info["identity"]["layout"]
    decoding = {name: layout[name] for name in ("frames", "fps", "frame_size", "sample_rate", "n_mels", "n_fft",
                                                "hop_length", "audio_seconds")}
    if "max_pixels" in identity:
        decoding["max_pixels"] = identity["max_pixels"]
    # As the dataset's store: with titles unless it was ingested without them (title_model None).
    titles = "title_model" not in store_info or store_info["title_model"] is not None
    ingest(IngestConfig(dataset=config.dataset, processed_dir=delta_dir, titles=titles, workers=config.workers,
                        title_cache=config.processed_dir / ".cache" / "titles", **decoding))
    return FeatureStore.open(delta.features)


# --------------------------------------------------------------------------------------------
# views add


def add_views(config: ViewsAddConfig) -> UpdateResult:
    """Append the watch events of `config.interactions` to the served model; see the module docstring."""
    from recsys.data.importers.files import check_skips, scan_table, table_format, watch_log

    started = time.perf_counter()
    served = served_model(config.dataset, config.processed_dir, config.version, config.alias)
    assert config.interactions is not None  # checked by ViewsAddConfig
    with tempfile.TemporaryDirectory(prefix="recsys-views-") as tmp:
        bundle = EditableBundle(served, Path(tmp) / "bundle")
        items = pl.read_parquet(bundle.paths.items, columns=["item_idx", "item_id"]).sort("item_idx")
        log = scan_table(config.interactions, table_format(config.interactions, config.format))
        rows = watch_log(config, log, items["item_id"]).collect()
        if rows.is_empty():
            raise DataFormatError(f"{config.interactions}: holds no views (only a header?)")
        counts = {reason: n for reason, n in rows.group_by("_skip").len().iter_rows()}
        check_skips(config, log, rows.lazy().filter(pl.col("_skip").is_not_null()), counts)
        kept = rows.filter(pl.col("_skip").is_null())
        if kept.is_empty():
            raise DataFormatError(f"{config.interactions}: no view is left to add "
                                  f"({', '.join(f'{n:,} {r}' for r, n in counts.items())})")
        views = kept.join(items, on="item_id").select("user_id", "item_idx", "timestamp").sort("timestamp")
        fresh = _apply_views(bundle, views)
        skipped = {str(reason): n for reason, n in counts.items() if reason is not None}
        bundle.note({"kind": "views", "added": views.height, "fresh": fresh, "source": str(config.interactions)})
        result = UpdateResult(config.dataset, "views", served.version, rows.height, views.height, skipped=skipped,
                              fresh=fresh)
        assert result.rows_read == result.added + sum(skipped.values())
        _publish(bundle, "views_add", config, result,
                 f"Update of v{served.version}: {views.height} views added from {config.interactions} "
                 "(histories and fresh popularity, no retraining).")
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def training_cutoff(paths: PreparedPaths) -> int:
    """The time of the last training view: added views after it are fresh (what people watch now)."""
    return int(pl.scan_parquet(paths.train).select(pl.col("timestamp").max()).collect().item())


def _population(recommender: Any, scorer: Any, new_views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, D) embeddings of a sample of users and (S,) the views each stands for: together, every view of the
    log and of `new_views` more (`recsys.twotower.catalogue_update.fit_fold_in`). Each user's share is
    their history's length."""
    histories = recommender.histories
    sample = np.random.default_rng(0).permutation(len(histories))[:POPULATION_USERS]
    lengths = np.array([len(histories[u]) for u in sample], np.float64)
    total = sum(len(h) for h in histories) + new_views
    weights = lengths * total / max(lengths.sum(), 1.0)
    embeddings = scorer.user_embeddings(sample, [histories[u] for u in sample])  # (S, D)
    return torch.from_numpy(embeddings), torch.from_numpy(weights.astype(np.float32))


def _apply_views(bundle: EditableBundle, views: pl.DataFrame) -> int:
    """Append `views` (user_id, item_idx, timestamp; time order) to the bundle's added views and its model;
    the number of them that are fresh (after the training cut-off)."""
    from recsys.serving.recommend import ADDED_VIEWS_SCHEMA, Recommender
    from recsys.twotower.catalogue_update import with_views

    scorer = bundle.scorer()
    recommender = Recommender(bundle.paths, model=scorer)
    users = np.array([recommender.user_lookup.get(u, UNKNOWN_USER) for u in views["user_id"].to_list()], np.int64)
    # Each viewer's history before each view: what they had watched, then their earlier added views.
    histories, so_far = [], {}
    for user_id, item in zip(views["user_id"].to_list(), views["item_idx"].to_list(), strict=True):
        before = so_far.get(user_id)
        if before is None:
            before = recommender.watched_by(user_id)
        histories.append(before)
        so_far[user_id] = np.append(before, item)
    population, population_views = _population(recommender, scorer, len(views))
    fresh = views["timestamp"].to_numpy() > training_cutoff(bundle.paths)
    grown = with_views(scorer.model, users, views["item_idx"].to_numpy(), histories, population, population_views,
                       views["timestamp"].to_numpy(), fresh)
    bundle.save_model(grown, scorer.info)
    file = bundle.paths.added_views
    earlier = pl.read_parquet(file) if file.exists() else pl.DataFrame(schema=ADDED_VIEWS_SCHEMA)
    pl.concat([earlier, views.cast(ADDED_VIEWS_SCHEMA)]).write_parquet(file)
    return int(fresh.sum())

