"""The built-in embedder: offline all-MiniLM-L6-v2, and concurrent requests batched together."""

import asyncio

import numpy as np
import pytest


def test_embeds_offline_normalised(embedder):
    vectors = embedder.embed(["a capital city", "a river", ""])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors[:2], axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("batch_max", [8, 3])
def test_concurrent_requests_share_batches_and_match_single_calls(embedder, batch_max):
    from memory3.core.embedder import BuiltinEmbedder

    capped = BuiltinEmbedder(query_cache_size=0, batch_max=batch_max)
    capped._model = embedder._load()  # share the loaded weights
    texts = [f"fact number {i} about Zorvania" for i in range(12)]
    calls = []
    original = capped.embed

    def counting(batch):
        calls.append(len(batch))
        return original(batch)

    capped.embed = counting

    async def run():
        return await asyncio.gather(*(capped.embed_async([t]) for t in texts))

    together = asyncio.run(run())
    assert len(calls) < len(texts), calls  # coalesced ...
    assert max(calls) <= batch_max, calls  # ... but never past the cap
    assert sum(calls) == len(texts)
    alone = original(texts)
    np.testing.assert_allclose(np.concatenate(together), alone, atol=1e-5)  # each caller got its own rows


def test_repeated_queries_come_from_the_cache(embedder):
    from memory3.core.embedder import BuiltinEmbedder

    cached = BuiltinEmbedder(query_cache_size=2)
    cached._model = embedder._load()  # share the loaded weights
    calls = []
    original = cached.embed
    cached.embed = lambda texts: calls.append(list(texts)) or original(texts)

    async def run():
        first = await cached.embed_query("where is Mirath?")
        again = await cached.embed_query("where is Mirath?")
        await cached.embed_query("b")
        await cached.embed_query("c")  # evicts the first
        await cached.embed_query("where is Mirath?")
        return first, again

    first, again = asyncio.run(run())
    assert calls == [["where is Mirath?"], ["b"], ["c"], ["where is Mirath?"]]
    np.testing.assert_array_equal(first, again)
