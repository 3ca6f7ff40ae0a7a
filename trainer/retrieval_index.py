"""An in-process retrieval index over reference texts, with the built-in MiniLM embedder.

Stage 2 retrieves for every chunk of every batch and the evaluation for every question; going
through the gRPC service would make training depend on a running database for nothing the trainer
needs. The embedder (:class:`memory3.core.embedder.BuiltinEmbedder`) and the metric (cosine on
L2-normalised vectors) are the service's, so the trainer retrieves what a bank holding the same
references would. Embeddings are cached on disk (``.npy`` named by a hash of weights + texts):
runs, resumes, the evaluation and tests embed the same references again and again.

Measurements: docs/experiments.md
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from memory3.core.embedder import BuiltinEmbedder

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "memory3" / "embeddings"
"""Per user, whatever the working directory; shared by every run and checkout (entries are keyed
by the embedder's weights and the texts, so they never go stale)."""

_EMBEDDER: BuiltinEmbedder | None = None


def builtin_embedder() -> BuiltinEmbedder:
    """One MiniLM per process: loading it takes seconds and it is stateless."""
    global _EMBEDDER
    if _EMBEDDER is None:
        _EMBEDDER = BuiltinEmbedder()
    return _EMBEDDER


def embed_cached(texts: Sequence[str], cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
                 embedder: BuiltinEmbedder | None = None) -> np.ndarray:
    """(len(texts), dim) float32 L2-normalised embeddings, from the disk cache when present.

    The cache key covers the embedder's weights (name and shipping package version) and every
    text in order, so neither a changed corpus nor new weights read stale vectors.
    ``cache_dir=None`` disables the cache.
    """
    embedder = embedder or builtin_embedder()
    texts = list(texts)
    path = None
    if cache_dir is not None:
        digest = hashlib.sha256(embedder.weights_id.encode())
        for t in texts:
            digest.update(b"\0" + t.encode())
        path = Path(cache_dir) / f"{digest.hexdigest()[:32]}.npy"
        if path.exists():
            vectors = np.load(path)
            if vectors.shape == (len(texts), embedder.dimension):
                return vectors
    vectors = embedder.embed(texts) if texts else np.zeros((0, embedder.dimension), np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, vectors)
        tmp.replace(path)
    return vectors


class ReferenceIndex:
    """Exact cosine top-k over a fixed list of reference texts.

    Exact search (one matrix product) rather than an ANN index: a few thousand references fit in
    a (n, 384) matrix, and exactness keeps training and evaluation deterministic.
    ``search`` may drop candidates with ``exclude(query, reference_index)`` (the overlap rules)
    and still return ``top_k`` survivors when there are enough.
    """

    def __init__(self, texts: Sequence[str], ids: Sequence[int] | None = None,
                 cache_dir: str | Path | None = DEFAULT_CACHE_DIR, embedder: BuiltinEmbedder | None = None):
        self.texts = list(texts)
        self.ids = list(ids) if ids is not None else list(range(len(self.texts)))
        if len(self.ids) != len(self.texts):
            raise ValueError("ids and texts differ in length")
        self.cache_dir = cache_dir
        self.embedder = embedder or builtin_embedder()
        self.vectors = embed_cached(self.texts, cache_dir, self.embedder)

    def __len__(self) -> int:
        return len(self.texts)

    def embed_queries(self, queries: Sequence[str], cache: bool = False) -> np.ndarray:
        return embed_cached(queries, self.cache_dir if cache else None, self.embedder)

    def search(self, queries: Sequence[str], top_k: int,
               exclude: Callable[[str, int], bool] | None = None,
               query_vectors: np.ndarray | None = None, candidates: int | None = None) -> list[list[int]]:
        """Positions (into ``texts``) of the ``top_k`` nearest references per query, best first.

        ``candidates`` nearest are examined (default ``4 * top_k + 4``) before ``exclude`` drops
        some, so a query loses a reference only to the rule, not to a short candidate list.
        """
        return [positions for positions, _ in self.search_scored(queries, top_k, exclude, query_vectors, candidates)]

    def search_scored(self, queries: Sequence[str], top_k: int,
                      exclude: Callable[[str, int], bool] | None = None, query_vectors: np.ndarray | None = None,
                      candidates: int | None = None) -> list[tuple[list[int], list[float]]]:
        """:meth:`search` with each kept reference's cosine similarity to its query."""
        if not queries:
            return []
        q = self.embed_queries(queries) if query_vectors is None else query_vectors
        scores = q @ self.vectors.T  # cosine: both sides are L2-normalised
        n = min(len(self.texts), candidates or 4 * top_k + 4)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :n]
        out = []
        for query, row, row_scores in zip(queries, order, scores):
            kept = [int(i) for i in row if exclude is None or not exclude(query, int(i))][:top_k]
            out.append((kept, [float(row_scores[i]) for i in kept]))
        return out
