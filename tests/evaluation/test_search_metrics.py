"""Search metrics and the synthetic query set: NDCG/recall on hand-made rankings, paraphrases with no title word."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.evaluation.search import PARAPHRASES, chance_metrics, search_metrics, synthetic_queries, title_vocabulary
from recsys.synthetic.generator import WORDS


def test_perfect_and_reversed_rankings() -> None:
    relevant = np.array([[True, True, False, False]])
    perfect = search_metrics(np.array([[4.0, 3.0, 2.0, 1.0]]), relevant, k=2)
    assert perfect == {"ndcg_2": pytest.approx(1.0), "recall_2": pytest.approx(1.0)}
    reversed_ = search_metrics(np.array([[1.0, 2.0, 3.0, 4.0]]), relevant, k=2)
    assert reversed_ == {"ndcg_2": 0.0, "recall_2": 0.0}
    one = search_metrics(np.array([[4.0, 1.0, 3.0, 2.0]]), relevant, k=2)  # relevant at places 1 and 3
    assert one["ndcg_2"] == pytest.approx(1 / (1 + 1 / np.log2(3))) and one["recall_2"] == 0.5
    chance = chance_metrics(relevant, k=2)
    assert 0.3 < chance["recall_2"] < 0.7


def test_every_group_has_queries_and_paraphrases_share_no_title_word() -> None:
    vocabulary = title_vocabulary()
    assert set(PARAPHRASES) == {words[0] for words in WORDS}
    for text in PARAPHRASES.values():
        assert not set(text.lower().split()) & vocabulary, text
    valid, test = synthetic_queries(8, "valid"), synthetic_queries(8, "test")
    assert len(valid) == 16 and len(test) == 24
    assert not {q.text for q in valid} & {q.text for q in test}
    assert {q.kind for q in test} == {"word", "paraphrase"}
