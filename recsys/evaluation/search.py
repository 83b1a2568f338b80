"""Quality of text → video search where the truth is known: ranking metrics and the synthetic query set.

A query is relevant to every video of its topic group (the synthetic corpus' title words belong
to a group; the two topics of a paired group differ only in motion, which no word names). Query
sets (`synthetic_queries`):

- validation: the first two title words of each group, which the blend weight is fitted on;
- test: the other two title words of each group, and a paraphrase of the group made of words
  that appear in no title (`PARAPHRASES`), which only the content path can match.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recsys.metrics import top_k
from recsys.synthetic.generator import FILLER, WORDS

PARAPHRASES: dict[str, str] = {
    "ocean": "seaside swimming coast",
    "mountain": "climbing rocky peaks",
    "cooking": "preparing food for dinner",
    "football": "soccer players scoring",
    "guitar": "acoustic strumming musician",
    "cat": "feline pet meowing",
    "racing": "fast cars on a track",
    "rocket": "space launch spaceship",
    "dance": "dancers moving gracefully",
    "gaming": "playing computer games",
    "garden": "growing plants in the backyard",
    "chess": "board game strategy pieces",
    "chemistry": "scientist mixing chemicals",
    "travel": "holiday trip abroad",
    "workout": "gym exercise training",
    "painting": "artist drawing pictures",
    "puppy": "playful pet hound",
    "stocks": "money and the financial market",
    "storm": "severe weather lightning",
    "history": "civilizations of the distant past",
    "programming": "writing software code",
    "fashion": "clothing style models",
    "birds": "flying feathered animals",
    "train": "commuters riding the metro",
}
"""A description of each title-word group (keyed by its first word) sharing no word with any title."""


@dataclass(frozen=True)
class Query:
    """A search query and the topic group whose videos are relevant to it."""

    text: str
    group: int
    kind: str
    """"word" (a title word) or "paraphrase" (words in no title)"""


def synthetic_queries(n_groups: int, split: str) -> list[Query]:
    """The validation or test queries of a corpus with `n_groups` title-word groups (see the module docstring)."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be valid or test, got {split!r}")
    queries = []
    for group in range(n_groups):
        words = WORDS[group]
        chosen = words[:2] if split == "valid" else words[2:]
        queries += [Query(word, group, "word") for word in chosen]
        if split == "test":
            queries.append(Query(PARAPHRASES[words[0]], group, "paraphrase"))
    return queries


def title_vocabulary() -> set[str]:
    """Every lower-case word a synthetic title can hold (topic words and filler)."""
    return {token for phrase in (*FILLER, *(w for words in WORDS for w in words)) for token in phrase.lower().split()}


def search_metrics(scores: np.ndarray, relevant: np.ndarray, k: int = 10) -> dict[str, float]:
    """Mean NDCG@k and recall@k of rankings by `scores` (Q, N) against boolean `relevant` (Q, N).

    Binary gains; the ideal DCG puts min(k, #relevant) relevant videos first; recall@k is the
    share of a query's relevant videos in its top k (out of at most k). Ties go to the lower index.
    """
    k = min(k, scores.shape[1])
    top = top_k(torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)), k).numpy()  # (Q, k)
    hits = np.take_along_axis(relevant, top, axis=1).astype(np.float64)  # (Q, k)
    discount = 1.0 / np.log2(np.arange(2, k + 2))  # (k,)
    n_relevant = relevant.sum(1)  # (Q,)
    ideal = np.array([discount[: min(k, int(n))].sum() for n in n_relevant])  # (Q,)
    ndcg = np.divide(hits @ discount, ideal, out=np.zeros(len(ideal)), where=ideal > 0)
    recall = np.divide(hits.sum(1), np.minimum(n_relevant, k), out=np.zeros(len(ideal)), where=n_relevant > 0)
    return {f"ndcg_{k}": float(ndcg.mean()), f"recall_{k}": float(recall.mean())}


def chance_metrics(relevant: np.ndarray, k: int = 10, repeats: int = 50, seed: int = 0) -> dict[str, float]:
    """`search_metrics` of random rankings (mean over `repeats` seeded shuffles): what no signal gets."""
    rng = np.random.default_rng(seed)
    runs = [search_metrics(rng.random(relevant.shape), relevant, k) for _ in range(repeats)]
    return {name: float(np.mean([run[name] for run in runs])) for name in runs[0]}
