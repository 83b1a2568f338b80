"""Baseline rankers evaluated through the same protocol as the two-tower model.

- `Popularity`: the same ranking for everyone, by train interaction count.
- `ItemKNN`: cosine similarity between items' user sets (co-occurrence in train), each item
  keeping its strongest neighbours; a user's score for an item sums its similarity to the
  user's history.
- `ImplicitALS`: matrix factorisation of the binary train matrix with confidence weights
  (Hu, Koren & Volinsky 2008), solved by alternating least squares in torch. A user's vector is
  folded in from the history given at scoring time (one exact least-squares step), so users
  are scored from everything they did before the evaluated split, and users never seen in
  training are scored too.
- `EASE`: a linear item-to-item model with a closed form (Steck 2019): the weights that best
  reconstruct each item's column of the train matrix from the other items' columns, L2-regularised.
- `Transitions`: next-video counts, how often video j directly followed video i in a train
  history; a user is scored by the rows of their last few videos, popularity breaking ties.

- `OracleScorer`: on the synthetic corpus only, the generator's own choice weights at the
  time of each held-out event: the best possible ranking in expectation, the ceiling that
  model/oracle ratios are measured against.

All fit from the train split only (the oracle reads the latent truth) and satisfy
`recsys.evaluation.protocol.Scorer`; their settings are picked on the validation split
(`recsys.evaluation.tuning`). Each scores a user from the history it is given, so at test time it
reads every event before the test event, as the two-tower model does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch
from sklearn.metrics.pairwise import cosine_similarity

from recsys.config import EvaluateConfig
from recsys.data.histories import in_watch_order, train_counts
from recsys.data.paths import PreparedPaths
from recsys.errors import DataFormatError
from recsys.evaluation.protocol import Split
from recsys.synthetic.truth import SynthTruth


def history_matrix(histories: Sequence[np.ndarray], n_items: int) -> sp.csr_matrix:
    """(B, n_items) binary CSR matrix: row b marks the items of histories[b] (repeats count once)."""
    lengths = np.array([len(h) for h in histories], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories]) if len(histories) else []
    matrix = sp.csr_matrix(
        (np.ones(int(lengths.sum()), dtype=np.float32), indices, indptr), shape=(len(histories), n_items)
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def train_matrix(paths: PreparedPaths, n_users: int, n_items: int) -> sp.csr_matrix:
    """(n_users, n_items) binary CSR matrix of the train interactions."""
    train = pl.read_parquet(paths.train, columns=["user_idx", "item_idx"])
    matrix = sp.csr_matrix(
        (
            np.ones(train.height, dtype=np.float32),
            (train["user_idx"].to_numpy(), train["item_idx"].to_numpy()),
        ),
        shape=(n_users, n_items),
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


class Popularity:
    """Most-popular: every user gets the items ranked by train interaction count."""

    def __init__(self, counts: np.ndarray) -> None:
        self.counts = np.asarray(counts, dtype=np.float32)  # (N,)

    @classmethod
    def fit(cls, paths: PreparedPaths) -> Popularity:
        return cls(train_counts(paths))

    def score(self, user_idx: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(user_idx), len(self.counts)))  # (B, N)


class ItemKNN:
    """Item-based nearest neighbours over cosine similarity of train co-occurrence."""

    def __init__(self, similarity: sp.csr_matrix) -> None:
        self.similarity = similarity.tocsr()  # (N, N): row i holds the kept neighbours of item i

    @classmethod
    def fit(cls, interactions: sp.csr_matrix, neighbours: int = 100) -> ItemKNN:
        """Cosine between item columns of a binary (users, items) matrix, `neighbours` kept per item."""
        return cls.from_similarity(item_cosine(interactions), neighbours)

    @classmethod
    def from_similarity(cls, similarity: sp.csr_matrix, neighbours: int) -> ItemKNN:
        """The model keeping the `neighbours` most similar items of each row of an `item_cosine` matrix."""
        return cls(keep_top_per_row(similarity, neighbours))

    def score(self, user_idx: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        seen = history_matrix(histories, self.similarity.shape[0])  # (B, N)
        return np.asarray((seen @ self.similarity).todense(), dtype=np.float32)  # (B, N)


def item_cosine(interactions: sp.csr_matrix) -> sp.csr_matrix:
    """(N, N) cosine similarity between the item columns of a binary (users, items) matrix, diagonal zero."""
    similarity = cosine_similarity(interactions.T.tocsr(), dense_output=False).tocsr()  # (N, N)
    similarity.setdiag(0.0)
    similarity.eliminate_zeros()
    return similarity


def keep_top_per_row(matrix: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """The CSR matrix with only the k largest entries of each row kept."""
    matrix = matrix.tocsr()
    keep = np.zeros(matrix.nnz, dtype=bool)
    for row in range(matrix.shape[0]):
        start, end = matrix.indptr[row], matrix.indptr[row + 1]
        if end - start <= k:
            keep[start:end] = True
        else:
            best = np.argpartition(matrix.data[start:end], -k)[-k:]
            keep[start + best] = True
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    return sp.csr_matrix(
        (matrix.data[keep], (rows[keep], matrix.indices[keep])), shape=matrix.shape, dtype=np.float32
    )


def _config_default(name: str) -> Any:
    """The default of an `EvaluateConfig` field: settings made without it get what `recsys evaluate` uses."""
    return {f.name: f.default for f in fields(EvaluateConfig)}[name]


@dataclass
class ALSSettings:
    """Hyperparameters of implicit ALS: `EvaluateConfig`'s mf_* fields (documented there).

    `recsys evaluate` picks reg and alpha from the config's grids on validation (`grid`); the
    defaults here are for fits made without a config.
    """

    factors: int = _config_default("mf_factors")
    reg: float = 10.0
    alpha: float = 3.0
    """Confidence of an observed interaction: weight 1 + alpha against 1 for unobserved pairs"""
    iterations: int = _config_default("mf_iterations")
    seed: int = _config_default("seed")

    @classmethod
    def grid(cls, config: EvaluateConfig) -> list[ALSSettings]:
        """Every (reg, alpha) of the config's grids, with its factors, iterations and seed."""
        return [cls(config.mf_factors, reg, alpha, config.mf_iterations, config.seed)
                for reg in config.mf_reg for alpha in config.mf_alpha]

    def label(self) -> str:
        """The tuned part of the settings, as reported: `reg=10 alpha=3`."""
        return f"reg={self.reg:g} alpha={self.alpha:g}"


class ImplicitALS:
    """Matrix factorisation of implicit feedback by weighted alternating least squares."""

    def __init__(self, item_factors: torch.Tensor, settings: ALSSettings) -> None:
        self.item_factors = item_factors  # (N, F)
        self.settings = settings

    @classmethod
    def fit(cls, interactions: sp.csr_matrix, settings: ALSSettings | None = None) -> ImplicitALS:
        """Alternate exact least-squares solves for user and item factors of a binary (users, items) matrix."""
        settings = settings or ALSSettings()
        generator = torch.Generator().manual_seed(settings.seed)
        n_users, n_items = interactions.shape
        by_item = interactions.T.tocsr()
        users = torch.randn(n_users, settings.factors, generator=generator) * 0.01  # (U, F)
        items = torch.randn(n_items, settings.factors, generator=generator) * 0.01  # (N, F)
        for _ in range(settings.iterations):
            users = conjugate_gradient_side(interactions.indptr, interactions.indices, items, users, settings)
            items = conjugate_gradient_side(by_item.indptr, by_item.indices, users, items, settings)
        return cls(items, settings)

    def item_embeddings(self) -> np.ndarray:
        """(N, F) item factors."""
        return self.item_factors.numpy()

    def user_embeddings(self, user_idx: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        """(B, F) user factors folded in from each history (the user index is not needed)."""
        seen = history_matrix(histories, self.item_factors.shape[0])
        return solve_exact(seen.indptr, seen.indices, self.item_factors, self.settings).numpy()

    def item_vectors(self) -> np.ndarray:
        """(N, F): what user vectors are matched against (the item factors themselves)."""
        return self.item_embeddings()

    def user_vectors(self, user_idx: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        """(B, F): the user factors, whose inner product with `item_vectors` is the score."""
        return self.user_embeddings(user_idx, histories)

    def score(self, user_idx: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        users = torch.from_numpy(self.user_embeddings(user_idx, histories))  # (B, F)
        return (users @ self.item_factors.T).numpy()  # (B, N)


def conjugate_gradient_side(
    indptr: np.ndarray,
    indices: np.ndarray,
    fixed: torch.Tensor,
    current: torch.Tensor,
    settings: ALSSettings,
    steps: int = 3,
) -> torch.Tensor:
    """One ALS half-step by a few conjugate-gradient steps from the current factors (Takács et al. 2011).

    Solves the same normal equations as `solve_exact` for all rows at once without forming a
    (F, F) matrix per row: each step costs O(nnz·F), which keeps fitting fast on large catalogues.
    """
    n_rows = len(indptr) - 1
    rows = torch.from_numpy(np.repeat(np.arange(n_rows), np.diff(indptr)))  # (nnz,)
    observed = fixed[torch.from_numpy(np.asarray(indices, dtype=np.int64))]  # (nnz, F)
    gram = fixed.T @ fixed + settings.reg * torch.eye(fixed.shape[1])  # (F, F)

    def apply(x: torch.Tensor) -> torch.Tensor:
        dots = (observed * x[rows]).sum(dim=1, keepdim=True)  # (nnz, 1)
        return (x @ gram).index_add_(0, rows, settings.alpha * dots * observed)  # (R, F)

    rhs = torch.zeros_like(current).index_add_(0, rows, (1.0 + settings.alpha) * observed)  # (R, F)
    x = current.clone()
    residual = rhs - apply(x)  # (R, F)
    direction = residual.clone()
    norm = (residual * residual).sum(dim=1)  # (R,)
    for _ in range(steps):
        applied = apply(direction)  # (R, F)
        step = norm / (direction * applied).sum(dim=1).clamp_min(1e-20)  # (R,)
        x += step[:, None] * direction
        residual -= step[:, None] * applied
        new_norm = (residual * residual).sum(dim=1)  # (R,)
        direction = residual + (new_norm / norm.clamp_min(1e-20))[:, None] * direction
        norm = new_norm
    return x


def solve_exact(
    indptr: np.ndarray, indices: np.ndarray, fixed: torch.Tensor, settings: ALSSettings, chunk: int = 1 << 16
) -> torch.Tensor:
    """One ALS half-step solved exactly: the least-squares factors of each CSR row given the other side's.

    Row r with observed columns I solves (FᵀF + alpha·F_Iᵀ F_I + reg·1) x = (1 + alpha)·F_Iᵀ 1,
    the weighted objective with confidence 1 + alpha on observed pairs and 1 elsewhere. Rows are
    taken shortest first and padded into (R, L, F) blocks of about `chunk` observations, so
    F_Iᵀ F_I is one batched matrix product per block.
    """
    n_rows, dim = len(indptr) - 1, fixed.shape[1]
    gram = fixed.T @ fixed + settings.reg * torch.eye(dim)  # (F, F)
    lengths = np.diff(indptr)
    order = np.argsort(lengths, kind="stable")
    out = torch.zeros(n_rows, dim)
    start = 0
    while start < n_rows:
        longest = max(int(lengths[order[min(start + 1, n_rows) - 1]]), 1)
        end = min(n_rows, start + max(1, chunk // longest))
        longest = max(int(lengths[order[end - 1]]), 1)  # sorted: the block's last row is its longest
        block = order[start:end]
        rows = np.repeat(np.arange(len(block)), lengths[block])  # (nnz,) row within the block
        slots = np.arange(len(rows)) - np.repeat(np.cumsum(lengths[block]) - lengths[block], lengths[block])
        cols = np.asarray(indices, dtype=np.int64)[np.repeat(indptr[block], lengths[block]) + slots]  # (nnz,)
        padded = torch.zeros(len(block), longest, dim)  # (R, L, F)
        padded[torch.from_numpy(rows), torch.from_numpy(slots)] = fixed[torch.from_numpy(cols)]
        lhs = gram + settings.alpha * padded.transpose(1, 2) @ padded  # (R, F, F)
        rhs = (1.0 + settings.alpha) * padded.sum(dim=1)  # (R, F)
        out[torch.from_numpy(block)] = torch.linalg.solve(lhs, rhs)
        start = end
    return out


def item_gram(interactions: sp.csr_matrix) -> torch.Tensor:
    """(N, N) float32 dense XᵀX of a binary (users, items) matrix X: co-watch counts, views on the diagonal."""
    gram = (interactions.T @ interactions).astype(np.float32)  # (N, N) sparse
    return torch.from_numpy(np.asarray(gram.todense()))


class EASE:
    """Embarrassingly shallow autoencoder (Steck 2019): scores = history row · B, with an item-item B.

    B = I - P diag(1/diag(P)) for P = (XᵀX + lambda·I)⁻¹: the ridge regression of each item's train
    column on every other item's, its diagonal held at zero (an item may not predict itself).
    """

    def __init__(self, weights: torch.Tensor, lam: float) -> None:
        self.weights = weights.numpy()  # (N, N): row i, the weight of watched item i towards each item
        self.lam = lam

    @classmethod
    def fit(cls, interactions: sp.csr_matrix, lam: float) -> EASE:
        """The closed form on a binary (users, items) train matrix."""
        return cls.from_gram(item_gram(interactions), lam)

    @classmethod
    def from_gram(cls, gram: torch.Tensor, lam: float) -> EASE:
        """The closed form from an `item_gram` matrix (computed once for a grid of lambdas; not modified)."""
        regularised = gram.clone()  # (N, N)
        regularised.diagonal().add_(lam)
        # XᵀX + lambda·I is symmetric positive definite for lambda > 0: a Cholesky solve, in float32.
        factor = torch.linalg.cholesky(regularised)
        del regularised
        precision = torch.cholesky_inverse(factor)  # (N, N) P
        del factor
        precision /= -precision.diagonal().clone()[None, :]  # column j over -P_jj
        precision.diagonal().zero_()  # B = I - P diag(1/diag P), so B_jj = 1 - 1 = 0
        return cls(precision, lam)

    def score(self, user_idx: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        seen = history_matrix(histories, self.weights.shape[0])  # (B, N)
        return np.asarray(seen @ self.weights, dtype=np.float32)  # (B, N)


def transition_counts(paths: PreparedPaths, n_items: int) -> sp.csr_matrix:
    """(N, N) float32 CSR: entry (i, j) counts the train histories in which video j directly follows video i."""
    ordered = in_watch_order([pl.scan_parquet(paths.train)]).select("user_idx", "item_idx").collect()
    users, items = ordered["user_idx"].to_numpy(), ordered["item_idx"].to_numpy()
    follows = users[1:] == users[:-1]  # (E-1,) consecutive events of one user
    counts = sp.csr_matrix(
        (np.ones(int(follows.sum()), dtype=np.float32), (items[:-1][follows], items[1:][follows])),
        shape=(n_items, n_items),
    )
    counts.sum_duplicates()
    return counts


class Transitions:
    """Next-video counts: a user's score of video j sums, over their last `window` videos h (newest
    first, weights 1, decay, decay², ...), how often j directly followed h in train histories.

    Popularity (train views) is added below the smallest transition step, half the smallest
    weight times one count: a video that some recent video led to is always above one that none
    did, ties go to the more popular, and a user without history gets the popularity ranking.
    Window and decay are picked on validation; on MovieLens-100k (every interaction, seed 0) the
    last video alone scores validation NDCG@10 0.075, the last 3 at decay 0.5 0.097, the last 20 at
    decay 0.75 0.099, while with decay 1 (a plain sum) a long window falls back (20 videos: 0.090).
    """

    def __init__(self, counts: sp.csr_matrix, popularity: np.ndarray, window: int, decay: float) -> None:
        self.counts = counts.tocsr()  # (N, N)
        self.window, self.decay = window, decay
        smallest = decay ** (window - 1)
        popularity = np.asarray(popularity, dtype=np.float64)
        self.backoff = (0.5 * smallest * popularity / (popularity.max(initial=0.0) + 1.0)).astype(np.float32)  # (N,)

    @classmethod
    def fit(cls, paths: PreparedPaths, n_items: int, window: int = 1, decay: float = 0.5) -> Transitions:
        """Counts and popularity from the train split."""
        return cls(transition_counts(paths, n_items), train_counts(paths), window, decay)

    def recent_weights(self, histories: Sequence[np.ndarray]) -> sp.csr_matrix:
        """(B, N) CSR: each user's last `window` videos weighted decay^t, t = 0 for the newest (repeats add)."""
        recent = [np.asarray(h, dtype=np.int64)[-self.window:][::-1] for h in histories]  # newest first
        lengths = np.array([len(r) for r in recent], dtype=np.int64)
        rows = np.repeat(np.arange(len(recent)), lengths)
        cols = np.concatenate(recent) if len(recent) else np.zeros(0, dtype=np.int64)
        steps = np.concatenate([np.arange(n) for n in lengths]) if len(recent) else np.zeros(0)
        matrix = sp.csr_matrix(
            ((self.decay ** steps).astype(np.float32), (rows, cols)), shape=(len(recent), self.counts.shape[0])
        )
        matrix.sum_duplicates()
        return matrix

    def score(self, user_idx: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        following = (self.recent_weights(histories) @ self.counts).toarray()  # (B, N)
        return (following + self.backoff[None, :]).astype(np.float32)  # (B, N)


class OracleScorer:
    """The synthetic corpus' latent truth as a ranker: log choice weights at each user's held-out event."""

    def __init__(self, truth: SynthTruth, user_rows: np.ndarray, item_rows: np.ndarray, at: np.ndarray) -> None:
        self.truth = truth
        self.user_rows = user_rows  # (U,) truth row of each user_idx
        self.item_rows = item_rows  # (N,) truth row of each item_idx
        self.at = at  # (U,) timestamp of each user's held-out event

    @classmethod
    def for_split(cls, paths: PreparedPaths, synth_folder: Path, split: Split = "test") -> OracleScorer:
        """The oracle for the held-out events of a prepared synthetic dataset's valid or test split.

        With a leave-one-out split each user has one held-out event; with several (temporal split)
        the user's earliest one gives the time.
        """
        truth = SynthTruth.load(synth_folder)
        users = pl.read_parquet(paths.user_map).sort("user_idx")
        items = pl.read_parquet(paths.item_map).sort("item_idx")
        held_out = (
            pl.read_parquet(paths.valid if split == "valid" else paths.test)
            .group_by("user_idx").agg(pl.col("timestamp").min())
        )
        at = np.zeros(users.height, dtype=np.int64)
        at[held_out["user_idx"].to_numpy()] = held_out["timestamp"].to_numpy()
        return cls(
            truth,
            truth.user_index(users["user_id"].to_list()),
            truth.item_index(items["item_id"].to_list()),
            at,
        )

    def score(self, user_idx: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        user_idx = np.asarray(user_idx, dtype=np.int64)
        if (user_idx < 0).any():
            raise DataFormatError("the oracle scores only users of the synthetic corpus (user index -1 given)")
        return self.truth.log_weights(self.user_rows[user_idx], self.at[user_idx], self.item_rows, tail=True)
