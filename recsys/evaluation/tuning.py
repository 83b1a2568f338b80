"""Baseline settings picked on the validation split, as the two-tower model's checkpoint is.

Each baseline is fitted on train once per setting of its grid and ranked on the validation cases
(history: train) by the same protocol as the final evaluation; the setting with the best
validation NDCG@10 is kept (ties: the earlier in the grid). The test split is never read here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from recsys.evaluation.protocol import EvalCases, Scorer, evaluate_scorer

SELECTION_METRIC = "ndcg@10"
"""The validation metric that picks a setting (the headline metric of every table)."""


@dataclass
class Tuned:
    """A baseline fitted with its validation-best setting, and what every setting of its grid scored."""

    scorer: Scorer
    setting: str
    """The chosen setting, e.g. `lambda=500`"""
    valid: dict[str, float]
    """Setting → validation NDCG@10, in grid order"""


def pick_on_validation(
    name: str,
    candidates: Sequence[tuple[str, Callable[[], Scorer]]],
    valid: EvalCases,
    batch_size: int = 256,
) -> Tuned:
    """Fit each (setting label, fit) candidate in turn and keep the one best on the validation cases.

    Fitting lazily keeps one model besides the best in memory (an EASE matrix can take gigabytes).
    """
    if not candidates:
        raise ValueError(f"{name}: no setting to choose from")
    best: Tuned | None = None
    scores: dict[str, float] = {}
    for label, fit in candidates:
        scorer = fit()
        scores[label] = evaluate_scorer(scorer, valid, ks=(10,), batch_size=batch_size,
                                        name=f"{name} {label}")[SELECTION_METRIC]
        if best is None or scores[label] > scores[best.setting]:
            best = Tuned(scorer, label, scores)
        del scorer
    assert best is not None
    return best
