"""The evaluation protocol: full ranking of the whole catalogue for each held-out interaction.

Follows the standard time-ordered leave-one-out protocol on the split written by `data prepare`:

- validation: each valid interaction is a target; the user's history is every train interaction;
- test: each test interaction is a target; the history is every train and valid interaction.

Every item of the history is excluded from the ranking (a re-watched target itself stays
rankable), every other item of the catalogue competes, including videos nobody watched in
training. The cold-start slice is the targets whose item has no train interaction at all.
A model that also reads other users' recent views (the two-tower model's fresh views: every
validation interaction) ranks each case, validation or test, as of its target's time (`ScoresBefore`), so
it never reads a view that came after the event it is asked to predict.
Any model that can score all items for a batch of users (`Scorer`) is evaluated by the same code;
a NaN or infinite score is an error, never the top (or bottom) of a ranking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import polars as pl
import torch

from recsys.data.histories import split_lists, train_counts, user_histories
from recsys.data.paths import PreparedPaths
from recsys.errors import MissingInputError, check_finite
from recsys.files import read_json
from recsys.metrics import KS, CoverageCounter, mask_excluded, metrics_from_ranks, target_ranks

Split = Literal["valid", "test"]


class Scorer(Protocol):
    """Anything that scores every catalogue item for a batch of users."""

    def score(self, user_idx: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        """Finite scores (B, n_items), higher is better (a NaN or infinite one is an `InvalidScoreError`).

        user_idx: (B,) int64 internal user indices (-1 for a user unknown to the model);
        histories: B arrays of item_idx, each the user's whole history oldest first (a scorer
        that reads only the recent past truncates it itself).
        """
        ...


@runtime_checkable
class ScoresBefore(Protocol):
    """A scorer that reads other users' views besides the history: it ranks as of a time, from the views before it."""

    def score_before(self, user_idx: np.ndarray, histories: Sequence[np.ndarray], before: np.ndarray | None
                     ) -> np.ndarray:
        """As `Scorer.score`, each row reading only other users' views before `before` (B,) (None: all)."""
        ...


@dataclass
class EvalCases:
    """The held-out targets of one split, with what a model may see and what it must not rank."""

    split: Split
    user_idx: np.ndarray
    """(U,) int64: the user of each case."""
    targets: np.ndarray
    """(U,) int64: the held-out item of each case."""
    histories: list[np.ndarray]
    """U arrays of item_idx, oldest first: everything the user did before the split; also the exclusions."""
    cold: np.ndarray
    """(U,) bool: the target was never interacted with in train (the cold-start slice)."""
    n_items: int
    """Catalogue size: every item is ranked."""
    times: np.ndarray | None = None
    """(U,) int64: when each target happened (a `ScoresBefore` scorer reads only views before it); None: unknown."""

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, rows: np.ndarray) -> EvalCases:
        """The cases at `rows` (e.g. a sample for a quick evaluation)."""
        return EvalCases(
            self.split,
            self.user_idx[rows],
            self.targets[rows],
            [self.histories[i] for i in rows],
            self.cold[rows],
            self.n_items,
            None if self.times is None else self.times[rows],
        )


def load_cases(paths: PreparedPaths, split: Split = "test") -> EvalCases:
    """The evaluation cases of a prepared dataset's valid or test split."""
    paths.require()
    n_items = int(read_json(paths.meta)["n_items"])
    target_path = paths.valid if split == "valid" else paths.test
    before = [paths.train] if split == "valid" else [paths.train, paths.valid]
    for path in [target_path, *before]:
        if not path.exists():
            raise MissingInputError(f"{path} is missing; run `recsys data prepare {paths.root.name}` again")
    histories = user_histories([pl.scan_parquet(p) for p in before])
    cases = (
        pl.scan_parquet(target_path)
        .with_row_index("_row")
        .join(histories, on="user_idx", how="left")
        .sort("_row")
        .collect()
    )
    targets = cases["item_idx"].to_numpy().astype(np.int64)
    return EvalCases(
        split=split,
        user_idx=cases["user_idx"].to_numpy().astype(np.int64),
        targets=targets,
        histories=split_lists(cases["history"]),
        cold=train_counts(paths)[targets] == 0,
        n_items=n_items,
        times=cases["timestamp"].to_numpy().astype(np.int64),
    )


def evaluate_scorer(
    scorer: Scorer,
    cases: EvalCases,
    ks: Sequence[int] = KS,
    batch_size: int = 256,
    name: str | None = None,
) -> dict[str, float]:
    """Mean HR/NDCG/MRR@K over all cases and over the cold-start slice, plus catalogue coverage@K.

    Keys: `hr@10`, `ndcg@10`, `mrr@10`, ... for all cases, the same prefixed `cold_` for the
    cold-start slice (absent when the slice is empty), `coverage@K`, and the counts `cases`
    and `cold_cases`. A NaN or infinite score raises `InvalidScoreError` naming the scorer
    (`name`, else its class): sorted, NaN would rank first and +inf above every real score.
    """
    sums: dict[str, float] = {}
    cold_sums: dict[str, float] = {}
    coverage = CoverageCounter(cases.n_items, ks)
    for start in range(0, len(cases), batch_size):
        rows = slice(start, start + batch_size)
        histories = cases.histories[rows]
        # A copy (B, N): it is masked in place below and must never write into a scorer's cache.
        if cases.times is not None and isinstance(scorer, ScoresBefore):
            raw = scorer.score_before(cases.user_idx[rows], histories, cases.times[rows])
        else:
            raw = scorer.score(cases.user_idx[rows], histories)
        scores = torch.tensor(np.asarray(raw), dtype=torch.float32)
        if scores.shape != (len(histories), cases.n_items):
            raise ValueError(f"scorer returned shape {tuple(scores.shape)}, expected ({len(histories)}, "
                             f"{cases.n_items})")
        check_finite(scores, f"scorer {name or type(scorer).__name__!r} scored a batch", cases.user_idx[rows],
                     "user_idx", "a ranking is never made from them")
        targets = torch.from_numpy(cases.targets[rows])  # (B,)
        mask_excluded(scores, histories, keep=targets)
        per_case = metrics_from_ranks(target_ranks(scores, targets), ks)
        cold = torch.from_numpy(cases.cold[rows])  # (B,)
        for name, values in per_case.items():
            sums[name] = sums.get(name, 0.0) + float(values.sum())
            cold_sums[name] = cold_sums.get(name, 0.0) + float(values[cold].sum())
        coverage.update(scores)
    n, n_cold = len(cases), int(cases.cold.sum())
    result = {name: total / max(n, 1) for name, total in sums.items()}
    if n_cold:
        result.update({f"cold_{name}": total / n_cold for name, total in cold_sums.items()})
    result.update(coverage.result())
    result.update({"cases": float(n), "cold_cases": float(n_cold)})
    return result


def chance_metrics(cases: EvalCases, ks: Sequence[int] = KS) -> dict[str, float]:
    """The exact expected HR/NDCG/MRR@K of a uniformly random ranking, over all cases and the cold-start slice.

    A case's candidates are the catalogue less its history (a re-watched target stays one), and a
    random ranking puts the target at each of their n ranks with probability 1/n, so e.g.
    E[NDCG@K] = (1/n) sum over r < min(K, n) of 1/log2(r + 2). This is the floor a ranker that knows
    nothing about an item reaches; popularity ranks never-trained videos below it, last.
    Keys as `evaluate_scorer` (`hr@10`, ..., `cold_hr@10`, ..., `cases`, `cold_cases`) without coverage.
    """
    candidates = np.array([
        cases.n_items - len(np.setdiff1d(history, [target]))
        for history, target in zip(cases.histories, cases.targets, strict=True)
    ], dtype=np.int64)  # (U,)
    # Each metric at each rank that can count; summed up to a case's last candidate, over n.
    at_rank = metrics_from_ranks(torch.arange(max(ks)), ks)  # name → (max K,)
    last = np.minimum(max(ks), candidates) - 1  # (U,)
    n, n_cold = len(cases), int(cases.cold.sum())
    result: dict[str, float] = {}
    cold: dict[str, float] = {}
    for name, values in at_rank.items():
        expected = np.cumsum(values.double().numpy())[last] / candidates  # (U,)
        result[name] = float(expected.mean()) if n else 0.0
        if n_cold:
            cold[f"cold_{name}"] = float(expected[cases.cold].mean())
    return {**result, **cold, "cases": float(n), "cold_cases": float(n_cold)}
