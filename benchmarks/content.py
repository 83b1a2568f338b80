"""Content embeddings on the synthetic corpus: do they learn the latent topic, and what does extraction cost?

Corpus: `recsys data synth` (default preset, ~600 videos, 12 topics; --quick: 160 videos, 8 topics),
prepared and ingested as in the demo, then `recsys train content` with the default config.

- Linear probe (scikit-learn logistic regression, 5-fold CV over ingested items) from each
  embedding to the latent topic: the fused embedding must beat every single modality.
- Topics that differ only in motion (the synthetic corpus' paired topics: same look, sound and
  title words, opposite directions): for each such pair, a probe that tells its two topics apart,
  fitted and scored on that pair's items only, from the motion embedding of a GRU model against
  the same model trained with mean pooling (`--temporal mean`); accuracy averaged over the pairs
  (chance: 0.5), each probe averaged over five cross-validation shuffles. The GRU must win.
  (Reported beside it, not judged: the 4-way probe over all paired items that earlier runs used.
  Most of its accuracy is telling the two *groups* apart by look and sound, which mean pooling
  does as well as the GRU, so it did not measure motion; see `motion_only_topics_4way`.)
- Videos without sound: the probe is fitted on videos with sound and scored on the silent ones,
  so it asks whether their fused embedding still lands among videos of their topic.
- Extraction throughput: `extract_embeddings` over the memory-mapped store against bare
  forwards on the same tensors already in memory, one thread, CPU seconds (robust to other load
  on the machine), median of interleaved repeats. Target (`extraction_overhead`): extraction /
  bare forward of the same network (the content encoder) <= 1.2x, i.e. reading, batching and
  bookkeeping add at most 20%. Reported beside it: extraction / bare forward of the frame
  backbone alone, for the default small CNN (whose backbone is cheaper than the audio encoder,
  so the ratio mostly measures the other encoders) and for mobilenet_v3_small.

Quality figures are medians over seeds (three; one with --quick). Both runs train for a fixed
number of epochs (25; --quick: 20 on its smaller corpus, about 100 optimiser steps), as the
synthetic-corpus test does; the earlier quick run's 6 epochs (about 24 steps) left the arrow of
time barely learnt. The work folder (corpus, store, MLflow) lives under the system temp folder
and is reused by later runs with the same settings.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import parse_args, report

from recsys.config import ContentConfig, IngestConfig, PrepareConfig, SynthConfig
from recsys.content.datamodule import ContentArrays
from recsys.content.encoder import MODALITIES, ContentEncoder
from recsys.content.train import encoder_spec, extract_embeddings, topic_probe, train_content
from recsys.media.feature_store import FeatureStore
from recsys.synthetic.truth import SynthTruth
from recsys.threads import torch_threads

DATASET = "synth"
TARGET_OVERHEAD = 1.2
TRAIN_THREADS = 1
"""Torch threads of every content training run (one: seeds and models get equal CPU whatever the load)."""


def build_corpus(work: Path, quick: bool) -> Path:
    """Synthesize, prepare and ingest the corpus (each step skips work already done); the processed dir."""
    from recsys.data.prepare import prepare
    from recsys.media.ingest import ingest
    from recsys.synthetic.generator import synthesize

    raw, processed = work / "raw", work / "processed"
    sizes = dict(n_videos=160, n_users=240, events_per_user=30, n_topics=8) if quick else {}
    synthesize(SynthConfig(preset="default", raw_dir=raw, **sizes))  # type: ignore[arg-type]
    if not (processed / DATASET / "features" / "store.json").exists():
        prepare(PrepareConfig(dataset=DATASET, raw_dir=raw, processed_dir=processed))
        ingest(IngestConfig(dataset=DATASET, processed_dir=processed))
    return processed


def train(processed: Path, work: Path, temporal: str, seed: int, quick: bool) -> dict[str, Any]:
    """Train one content model; copies of its embeddings (the next run overwrites the store's files)."""
    config = ContentConfig(dataset=DATASET, processed_dir=processed, temporal=temporal, seed=seed,  # type: ignore[arg-type]
                           checkpoint_dir=work / "checkpoints", progress_bar=False, threads=TRAIN_THREADS,
                           max_epochs=20 if quick else 25, patience=20 if quick else 25)
    started = time.perf_counter()
    summary = train_content(config)
    store = FeatureStore.open(processed / DATASET / "features")
    embeddings = {"fused": np.array(store.array("content_embedding"))}
    embeddings.update({m: np.array(store.array(f"embedding_{m}")) for m in MODALITIES})
    return {"summary": summary, "embeddings": embeddings, "seconds": time.perf_counter() - started}


def pair_probe(embeddings: np.ndarray, topics: np.ndarray, ok: np.ndarray, n_pairs: int, repeats: int = 5
               ) -> float:
    """Mean over the motion-only topic pairs (topics 2g, 2g + 1) of a probe telling the pair's two topics apart.

    Fitted and scored on the pair's own items, so look, sound and title (shared by the two topics)
    cannot help: only what the embedding says about the direction of motion can. With a few dozen
    items per pair one 5-fold split is noisy, so each probe is averaged over `repeats` shuffles.
    """
    scores = []
    for g in range(n_pairs):
        rows = np.flatnonzero(ok & ((topics == 2 * g) | (topics == 2 * g + 1)))
        scores.append(statistics.mean(topic_probe(embeddings, topics, rows, seed=s) for s in range(repeats)))
    return float(statistics.mean(scores))


def probes(run: dict[str, Any], topics: np.ndarray, ok: np.ndarray, has_audio: np.ndarray, n_pairs: int,
           seed: int) -> dict[str, float]:
    emb = run["embeddings"]
    paired = topics < 2 * n_pairs
    out = {name: topic_probe(emb[name], topics, np.flatnonzero(ok & (np.abs(emb[name]).sum(1) > 0)), seed=seed)
           for name in ("fused", *MODALITIES)}
    for name in ("motion", "fused", "frames"):
        out[f"motion_only_pairs_{name}"] = pair_probe(emb[name], topics, ok, n_pairs)
    out["motion_only_topics_4way_motion"] = topic_probe(emb["motion"], topics, np.flatnonzero(ok & paired), seed=seed)
    out["no_audio_fused"] = topic_probe(emb["fused"], topics, np.flatnonzero(ok & has_audio),
                                        test_rows=np.flatnonzero(ok & ~has_audio))
    out["with_audio_fused"] = topic_probe(emb["fused"], topics, np.flatnonzero(ok & has_audio), seed=seed)
    return out


def throughput(processed: Path, backbone: str, repeats: int) -> dict[str, float]:
    """Extraction against bare forwards on the same in-memory tensors: CPU seconds, one thread, interleaved.

    - extract: `extract_embeddings` over the memory-mapped store (read rows, uint8 → float,
      every encoder, fusion, fusion-weight diagnostics), 128 items per batch;
    - bare encoder: the same `ContentEncoder` forward on the same batches, already read into memory;
    - bare backbone: the frame backbone alone on the same prepared frame tensors (the valid
      frames of each batch, standardised floats) made before the clock starts.
    Encoder weights are random: compute does not depend on them.
    """
    store = FeatureStore.open(processed / DATASET / "features")
    arrays = ContentArrays.of(store)
    spec = encoder_spec(ContentConfig(dataset=DATASET, backbone=backbone), n_mels=store.layout.n_mels)  # type: ignore[arg-type]
    encoder = ContentEncoder(spec).eval()
    batch_size = 128
    batches = [arrays.batch(np.arange(start, min(start + batch_size, len(arrays))))
               for start in range(0, len(arrays), batch_size)]
    frames = [encoder.frame_cnn.prepare(b.frames.flatten(0, 1)[b.frame_mask.flatten()]) for b in batches]
    backbone_net = encoder.frame_cnn.backbone

    def bare_backbone() -> None:
        with torch.inference_mode():
            for images in frames:
                backbone_net(images)

    def bare_encoder() -> None:
        with torch.inference_mode():
            for batch in batches:
                encoder(batch)

    def extract() -> None:
        extract_embeddings(encoder, arrays, batch_size=batch_size)

    work = {"extract": extract, "bare_encoder": bare_encoder, "bare_backbone": bare_backbone}
    with torch_threads(1):
        for run in work.values():
            run()  # warm-up: page in the memory maps, allocate
        times: dict[str, list[float]] = {name: [] for name in work}
        for _ in range(repeats):
            for name, run in work.items():
                started = time.process_time()
                run()
                times[name].append(time.process_time() - started)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    return {
        "backbone": backbone,
        "videos": len(arrays),
        "frames": int(sum(len(x) for x in frames)),
        "extract_videos_per_cpu_s": len(arrays) / seconds["extract"],
        "bare_encoder_videos_per_cpu_s": len(arrays) / seconds["bare_encoder"],
        "bare_backbone_videos_per_cpu_s": len(arrays) / seconds["bare_backbone"],
        "overhead_vs_encoder": seconds["extract"] / seconds["bare_encoder"],
        "overhead_vs_backbone": seconds["extract"] / seconds["bare_backbone"],
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    quick = args.quick
    work = Path(tempfile.gettempdir()) / f"recsys-bench-content-{'quick' if quick else 'full'}"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    processed = build_corpus(work, quick)
    store = FeatureStore.open(processed / DATASET / "features")
    truth = SynthTruth.load(work / "raw" / DATASET)
    rows = truth.item_index(store.manifest.get_column("item_id").to_list())
    topics = truth.item_topic[rows]
    n_pairs = truth.n_topics // 4  # the first K//4 groups hold two topics each, numbered first
    paired = topics < 2 * n_pairs
    ok = store.manifest.get_column("status").to_numpy() == "ok"
    has_audio = store.manifest.get_column("has_audio").to_numpy().astype(bool)

    seeds = (0,) if quick else (0, 1, 2)
    per_seed: dict[str, list[dict[str, float]]] = {"gru": [], "mean": []}
    train_seconds = []
    for seed in seeds:
        for temporal in ("gru", "mean"):
            run = train(processed, work, temporal, seed, quick)
            per_seed[temporal].append(probes(run, topics, ok, has_audio, n_pairs, seed))
            if temporal == "gru":
                train_seconds.append(run["seconds"])

    def med(temporal: str, key: str) -> float:
        return round(statistics.median(r[key] for r in per_seed[temporal]), 4)

    singles = {m: med("gru", m) for m in MODALITIES}
    best_single = max(singles, key=singles.get)  # type: ignore[arg-type]
    fused_margins = [r["fused"] - max(r[m] for m in MODALITIES) for r in per_seed["gru"]]
    motion_margins = [g["motion_only_pairs_motion"] - m["motion_only_pairs_motion"]
                      for g, m in zip(per_seed["gru"], per_seed["mean"], strict=True)]
    speed = throughput(processed, "small", repeats=3 if quick else 5)
    speed_mobilenet = throughput(processed, "mobilenet_v3_small", repeats=3 if quick else 5)

    fused_wins = min(fused_margins) > 0
    gru_wins = min(motion_margins) > 0
    overhead_ok = speed["overhead_vs_encoder"] <= TARGET_OVERHEAD
    report("content", {
        "fused_probe_accuracy": med("gru", "fused"),
        "best_single_modality": best_single,
        "best_single_probe_accuracy": singles[best_single],
        "fused_beats_every_single_modality": fused_wins,
        "fused_margin_min_over_seeds": round(min(fused_margins), 4),
        "gru_motion_only_topics_accuracy": med("gru", "motion_only_pairs_motion"),
        "mean_pool_motion_only_topics_accuracy": med("mean", "motion_only_pairs_motion"),
        "gru_beats_mean_pooling_on_motion_only_topics": gru_wins,
        "gru_margin_min_over_seeds": round(min(motion_margins), 4),
        "no_audio_fused_probe_accuracy": med("gru", "no_audio_fused"),
        "with_audio_fused_probe_accuracy": med("gru", "with_audio_fused"),
        "extraction_overhead": round(speed["overhead_vs_encoder"], 3),
        "target_overhead": TARGET_OVERHEAD,
        "extraction_videos_per_cpu_s": round(speed["extract_videos_per_cpu_s"], 1),
        "extraction_overhead_vs_frame_backbone": round(speed["overhead_vs_backbone"], 3),
        "extraction_overhead_vs_frame_backbone_mobilenet_v3_small": round(speed_mobilenet["overhead_vs_backbone"], 3),
        "target_met": bool(fused_wins and gru_wins and overhead_ok),
        "probe_accuracy": {"fused": med("gru", "fused"), **singles},
        "probe_accuracy_mean_pooling": {k: med("mean", k) for k in ("fused", *MODALITIES)},
        "motion_only_topics": {  # within-pair probes (chance 0.5) from each embedding of each model
            f"{name}_{temporal}": med(temporal, f"motion_only_pairs_{name}")
            for name in ("motion", "fused", "frames") for temporal in ("gru", "mean")},
        "motion_only_topics_4way": {  # the old figure: 4-way probe over all paired items (mostly look)
            temporal: med(temporal, "motion_only_topics_4way_motion") for temporal in ("gru", "mean")},
        "per_seed": per_seed,
        "throughput": [{k: round(v, 3) if isinstance(v, float) else v for k, v in x.items()}
                       for x in (speed, speed_mobilenet)],
        "items": int(len(store)), "ingested_ok": int(ok.sum()), "silent_items": int((ok & ~has_audio).sum()),
        "motion_only_topic_items": int((ok & paired).sum()), "topics": truth.n_topics, "seeds": list(seeds),
        "train_seconds_median": round(statistics.median(train_seconds), 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "quick": quick,
        "threads": TRAIN_THREADS,
        "cpu_count": os.cpu_count(),
    })


if __name__ == "__main__":
    main()
