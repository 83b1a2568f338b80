"""Ablations of the score: the same trained model with one term of its score left out.

Only the content-only loss changes what training learns (`recsys.twotower.module`); its ablation is
a training run of its own (`content_only_weight` 0). Every other term is read after training:
checkpoints are picked by the default coefficients (cosine alone), and the terms' coefficients,
memberships and spec fields are fitted or set after it. So leaving one of them out is a refit of
the same trained weights on the coefficient-fit users (`RetrievalDataModule.fit_dataloader`) —
exactly what training without it would give, at a fraction of the cost:

- `cold bias`: no offset for new videos;
- `taste clusters`: no cluster-taste term (no memberships, no logistic read-out of content);
- `fresh sharpening`: new videos' memberships from content alone, not sharpened by their fresh viewers;
- `fresh popularity`: no fresh-popularity term, for new or watched videos;
- `pseudo views`: fresh popularity with 0.001 pseudo-views per video instead of 1 (almost none).

(A recency weighting of the cluster shares, half-life 20 views, was ablated too and removed: it paid
on no dataset, not even on the generator whose tastes drift.)
"""

from __future__ import annotations

import dataclasses

import torch

from recsys.data.paths import PreparedPaths
from recsys.twotower.datamodule import RetrievalDataModule
from recsys.twotower.new_videos import FITTED_TERMS, fit_new_videos
from recsys.twotower.towers import TwoTower
from recsys.twotower.trained_model import NEW_VIDEO_SCORING, TwoTowerScorer

SPEC_TERMS = {"pseudo views": {"fresh_pseudo_views": 1e-3}}
"""Terms left out by a change of the model's spec, and that change."""
SCORE_TERMS = (*FITTED_TERMS, *SPEC_TERMS)
"""Every term `without_term` can leave out."""


def without_term(scorer: TwoTowerScorer, paths: PreparedPaths, term: str | None) -> TwoTowerScorer:
    """The trained model of `scorer` with `term` (of `SCORE_TERMS`; None: none) left out and its coefficients
    fitted again as training fits them; `scorer` is left as it was."""
    if term is not None and term not in SCORE_TERMS:
        raise ValueError(f"unknown score term {term!r}; choose from {list(SCORE_TERMS)}")
    config = scorer.info.get("config", {})
    seed = int(config.get("seed", 0))
    data = RetrievalDataModule(paths, max_history=scorer.spec.max_history,
                               batch_size=int(config.get("batch_size", 1024)), seed=seed,
                               validation_users=int(config.get("validation_users", 10_000)))
    data.setup("fit")
    spec = dataclasses.replace(scorer.spec, **SPEC_TERMS.get(term or "", {}))
    content = torch.zeros(spec.n_items, spec.content_dim) if spec.content_dim else None
    model = TwoTower(spec, content=content)
    model.load_state_dict(scorer.model.state_dict())
    without = frozenset({term}) & frozenset(FITTED_TERMS)
    scoring, _, _ = fit_new_videos(model, data.fit_dataloader(), data.fresh_view_dataloader(), seed, without)
    return TwoTowerScorer(model.eval(), run_id=scorer.run_id, folder=scorer.folder,
                          info={**scorer.info, NEW_VIDEO_SCORING: scoring.to_dict(), "without": term})
