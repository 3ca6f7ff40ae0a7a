"""The built-in embedder: offline all-MiniLM-L6-v2, and concurrent requests batched together."""

import asyncio

import numpy as np


def test_embeds_offline_normalised(embedder):
    vectors = embedder.embed(["a capital city", "a river", ""])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors[:2], axis=1), 1.0, atol=1e-5)


def test_concurrent_requests_share_batches_and_match_single_calls(embedder):
    texts = [f"fact number {i} about Zorvania" for i in range(12)]
    calls = []
    original = embedder.embed

    def counting(batch):
        calls.append(len(batch))
        return original(batch)

    embedder.embed = counting
    try:
        async def run():
            return await asyncio.gather(*(embedder.embed_async([t]) for t in texts))

        together = asyncio.run(run())
    finally:
        embedder.embed = original
    assert len(calls) < len(texts), calls  # coalesced
    assert sum(calls) == len(texts)
    alone = original(texts)
    np.testing.assert_allclose(np.concatenate(together), alone, atol=1e-5)
