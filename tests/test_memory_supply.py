"""The memory supply against a real server: cache accounting, payload-free retrieval once warm,
fingerprint refusal, cold start through the write path."""

import secrets

import pytest
import torch

from memory3.sdk.model.positions import memory_spec_for
from memory3.sdk.client import BankInfo, Reference
from memory3.sdk.memory.codec import decode_memory
from memory3.sdk.memory.encoder import MemoryEncoder
from memory3.sdk.memory.supply import FingerprintMismatchError, MemoryCache, MemorySupply
from memory3.sdk.memory.writer import MemoryWriter
from memory3.sdk.model.fingerprint import model_fingerprint
from tiny_models import byte_tokenizer, tiny_llama

TOPICS = ["rivers", "mountains", "bread", "violins", "comets", "glaciers", "tea", "bridges", "owls", "copper"]
TEXTS = [f"Notes on {t}: the {t} of the northern valley were recorded in the year {1800 + i}." for i, t in enumerate(TOPICS)]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=5)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def spec(model):
    return memory_spec_for(model, (1, 2), tokens_per_head=4, reference_length=96)


@pytest.fixture
def supply(server, api_key, model, tokenizer, spec):
    with MemorySupply(server.target, api_key, model, spec, tokenizer=tokenizer) as s:
        yield s


@pytest.fixture(scope="module")
def warm_bank(server, api_key, blocking, model, tokenizer, spec):
    """A bank whose references all have memories (warm start)."""
    name = "warm-" + secrets.token_hex(3)
    blocking.create_bank(BankInfo(name, model_fingerprint(model), spec))
    with MemorySupply(server.target, api_key, model, spec) as s:
        writer = MemoryWriter(MemoryEncoder(model, tokenizer, spec))
        s.run(writer.write(s.client, name, [(f"r{i}", t) for i, t in enumerate(TEXTS)], progress=False))
    return name


def _ids(blocking, bank, query, top_k):
    return [r.external_id for r in blocking.retrieve(bank, text=query, top_k=top_k)]


def test_cache_counts_hits_and_misses_across_retrievals(supply, blocking, warm_bank):
    first = supply.request(warm_bank, ["rivers and mountains"], top_k=3)
    [row] = first.result()
    expected = _ids(blocking, warm_bank, "rivers and mountains", 3)
    assert row.memory_ids == expected and [r.external_id for r in row.references] == expected
    assert (supply.cache.hits, supply.cache.misses) == (0, 3)
    assert first.timing.fetch == 0.0 and first.timing.decode > 0  # one round trip with payloads
    for memory, ref_id in zip(row.memories, row.memory_ids):
        stored = decode_memory(blocking.fetch(warm_bank, [ref_id])[0].memory)
        assert torch.equal(memory.kv, stored.kv) and memory.fingerprint == supply.fingerprint

    again = supply.request(warm_bank, ["rivers and mountains"], top_k=3)
    [row2] = again.result()
    assert row2.memory_ids == expected and all(a is b for a, b in zip(row2.memories, row.memories))
    assert (supply.cache.hits, supply.cache.misses) == (3, 3)
    assert again.timing.fetch == 0.0 and again.timing.decode == 0.0  # ids only, nothing fetched

    other = _ids(blocking, warm_bank, "owls and copper bridges", 4)
    new = sum(i not in expected for i in other)
    third = supply.request(warm_bank, ["owls and copper bridges", None, "   "], top_k=4)
    rows = third.result()
    assert rows[0].memory_ids == other and rows[1].memories == [] and rows[2].memories == []
    assert (supply.cache.hits, supply.cache.misses) == (3 + 4 - new, 3 + new)
    assert supply.cache.hit_rate == pytest.approx((7 - new) / 10)
    assert (third.timing.fetch > 0) == (new > 0)  # misses fetched separately once the cache is warm
    assert len(supply.timings) == 3


def test_rewritten_memory_is_a_miss(supply, blocking, warm_bank, model, tokenizer, spec):
    [row] = supply.request(warm_bank, [TEXTS[6]], top_k=1).result()
    assert row.memory_ids == ["r6"]
    writer = MemoryWriter(MemoryEncoder(model, tokenizer, spec), scheme="fp16")  # same text, new bytes
    supply.run(writer.write(supply.client, warm_bank, [("r6", TEXTS[6])], progress=False))
    misses = supply.cache.misses
    [row2] = supply.request(warm_bank, [TEXTS[6]], top_k=1).result()
    assert supply.cache.misses == misses + 1
    assert not torch.equal(row2.memories[0].kv, row.memories[0].kv)


def test_memories_of_another_model_are_refused(server, api_key, warm_bank, tokenizer, spec, model):
    other = tiny_llama(seed=6)
    with MemorySupply(server.target, api_key, other, spec, tokenizer=tokenizer) as s:
        with pytest.raises(FingerprintMismatchError) as info:
            s.request(warm_bank, ["tea"], top_k=2).result()
    message = str(info.value)
    assert model_fingerprint(model)[:16] in message and model_fingerprint(other)[:16] in message


def test_cold_start_encodes_stores_and_caches(supply, blocking, model, tokenizer, spec):
    bank = "cold-" + secrets.token_hex(3)
    blocking.create_bank(BankInfo(bank, model_fingerprint(model), spec))
    blocking.write(bank, [Reference(f"c{i}", t) for i, t in enumerate(TEXTS)])
    assert blocking.stats(bank).with_memory == 0
    [row] = supply.request(bank, ["comets and glaciers"], top_k=3).result()
    assert len(row.memories) == 3 and supply.cache.misses == 3
    assert blocking.stats(bank).with_memory == 3
    expected = MemoryEncoder(model, tokenizer, spec).encode([TEXTS[int(i[1:])] for i in row.memory_ids])
    for memory, want in zip(row.memories, expected):
        assert torch.equal(memory.positions, want.positions)
        assert torch.nn.functional.cosine_similarity(memory.kv, want.kv, dim=-1).min() > 0.999  # int8 bound
    [row2] = supply.request(bank, ["comets and glaciers"], top_k=3).result()
    assert row2.memory_ids == row.memory_ids and supply.cache.hits == 3 and blocking.stats(bank).with_memory == 3


def test_lru_evicts_least_recently_used():
    cache = MemoryCache(capacity=2)
    from helpers import random_memory

    a, b, c = (random_memory(seed=i) for i in range(3))
    cache.put(("k", "a", "f"), 1, a)
    cache.put(("k", "b", "f"), 2, b)
    assert cache.get(("k", "a", "f"), 1) is a  # a is now the most recent
    cache.put(("k", "c", "f"), 3, c)
    assert cache.get(("k", "b", "f")) is None and cache.get(("k", "a", "f")) is a
    assert cache.get(("k", "a", "f"), version=99) is None  # stale payload
    assert (cache.hits, cache.misses, len(cache)) == (2, 2, 2)
