"""The SDK write path against a real server: encode -> compress -> Write, and cold start."""

import io
import secrets

import pytest
import torch
from tqdm import tqdm

from memory3.sdk.model.positions import memory_spec_for
from memory3.core.blob import CodecError, read_header
from memory3.core.memory_spec import MemorySpec
from memory3.sdk.client import BankInfo, Reference
from memory3.sdk.memory.codec import decode_memory
from memory3.sdk.memory.encoder import MemoryEncoder
from memory3.sdk.memory.writer import MemoryWriter, ensure_memories, write_references
from memory3.sdk.model.fingerprint import model_fingerprint
from tiny_models import byte_tokenizer, tiny_llama

TEXTS = [f"Reference text number {i}: the river Alder{i} flows past the mill of town {i * 7}." for i in range(6)]
MIN_COSINE = {"fp16": 0.9999, "int8": 0.999, "int4": 0.95}  # per vector, the codec's stated bounds


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def spec(model):
    return memory_spec_for(model, (0, 2), tokens_per_head=4, reference_length=96)


@pytest.fixture(scope="module")
def encoder(model, tokenizer, spec):
    return MemoryEncoder(model, tokenizer, spec)


async def _bank(aclient, model, spec, scheme="int8") -> str:
    name = "w-" + secrets.token_hex(3)
    await aclient.create_bank(BankInfo(name, model_fingerprint(model), MemorySpec.from_dict({**spec.to_dict(), "codec": scheme})))
    return name


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min().item()


@pytest.mark.parametrize("scheme", ["fp16", "int8", "int4"])
async def test_written_memories_decode_to_encoder_output(aclient, model, spec, encoder, scheme):
    bank = await _bank(aclient, model, spec, scheme)
    refs = [(f"r{i}", text, {"n": str(i)}) for i, text in enumerate(TEXTS)]
    bar = tqdm(total=len(refs), file=io.StringIO())
    writer = MemoryWriter(encoder, scheme=scheme, encode_batch=4)
    summary = await writer.write(aclient, bank, refs, write_batch=4, max_in_flight=1, progress=bar)
    assert (summary.inserted, bar.n) == (len(refs), len(refs))
    expected = encoder.encode(TEXTS)
    fetched = await aclient.fetch(bank, [f"r{i}" for i in range(len(TEXTS))])
    for i, stored in enumerate(fetched):
        assert stored.metadata == {"n": str(i)} and stored.text == TEXTS[i]
        assert read_header(stored.memory).scheme == scheme
        memory = decode_memory(stored.memory)
        assert memory.fingerprint == model_fingerprint(model)
        assert torch.equal(memory.positions, expected[i].positions)
        assert _min_cosine(memory.kv, expected[i].kv) >= MIN_COSINE[scheme]
    stats = await aclient.stats(bank)
    assert (stats.references, stats.with_memory) == (len(refs), len(refs))


async def test_convenience_write_uses_the_spec_codec(aclient, model, spec, encoder):
    bank = await _bank(aclient, model, spec)
    summary = await write_references(aclient, bank, [Reference("a", TEXTS[0])], encoder, progress=False)
    assert summary.inserted == 1
    assert read_header((await aclient.fetch(bank, ["a"]))[0].memory).scheme == spec.codec


def test_pq_needs_a_codebook(encoder):
    with pytest.raises(CodecError, match="codebook"):
        MemoryWriter(encoder, scheme="pq")


def test_short_references_are_written_without_memory_when_asked(encoder):
    writer = MemoryWriter(encoder, skip_short=True)
    out = writer.encode([("short", "ab"), ("long", TEXTS[1])])
    assert out[0].memory is None and out[0].reference.memory is None
    assert out[1].memory is not None and out[1].reference.memory is not None


async def test_cold_start_encodes_and_stores_missing_memories(aclient, model, spec, encoder):
    bank = await _bank(aclient, model, spec)
    await aclient.write(bank, [Reference(f"c{i}", text, {"k": "v"}) for i, text in enumerate(TEXTS[:4])])
    await MemoryWriter(encoder).write(aclient, bank, [("c9", TEXTS[5])], progress=False)  # one already has a memory
    assert (await aclient.stats(bank)).with_memory == 1
    hits = await aclient.retrieve(bank, text=TEXTS[0], top_k=5)
    assert sum(h.memory_size == 0 for h in hits) == 4
    memories = await ensure_memories(aclient, bank, hits, encoder)
    assert sorted(memories) == [f"c{i}" for i in range(4)]
    assert (await aclient.stats(bank)).with_memory == 5
    stored = await aclient.fetch(bank, ["c0"])
    assert stored[0].metadata == {"k": "v"} and stored[0].text == TEXTS[0]
    assert torch.equal(decode_memory(stored[0].memory).kv, memories["c0"].kv)  # what later readers get
    again = await aclient.retrieve(bank, text=TEXTS[0], top_k=5)
    assert await ensure_memories(aclient, bank, again, encoder) == {}
