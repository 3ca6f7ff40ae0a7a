"""Every family in the model zoo reads memories exactly, or is refused with its reason.

Parametrised over the tiny models of ``model_zoo`` × float32/bfloat16 × sdpa/eager (where the family
has both). For a family memory3 accepts: a memory of every token of a text, in every attention layer,
reads like that text as a prefix at the positions it stands for (its tokens first, the context from
the end of the reference interval; logits within a small fraction of the memory's own effect); no
memories give the plain model's logits bit for bit; a batch equals each row alone; the KV cache
holds only the context and continuing from it equals a full forward; beams and several return
sequences repeat each row's memories; a static cache generates what a dynamic one does. A refused
family raises :class:`UnsupportedModelError` with its reason when the spec or injector is built.
"""

import pytest
import torch
from model_zoo import FAMILIES, supports, tiny_model

from memory3.sdk.memory.encoder import MemoryEncoder
from memory3.sdk.memory.injection import MemoryInjector
from memory3.sdk.model.positions import UnsupportedModelError, memory_spec_for, probe_geometry

REFUSED = {
    "gpt2": "absolute positions",
    "falcon": "attention registry",
}
"""Families memory3 must refuse, and a phrase of the reason it gives."""

REFERENCE, CONTEXT, REFERENCE_LENGTH = 8, 7, 32  # 8 tokens stand for a reference interval of 32 positions
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.25}  # fraction of the memory's effect on the logits

CASES = [(family, dtype, impl) for family in FAMILIES for dtype in (torch.float32, torch.bfloat16)
         for impl in ("sdpa", "eager") if supports(family, impl)]


def _ids(model, rows, length, seed):
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kwargs):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False, **kwargs).logits.double()


def _relative(got, want, plain):
    return float((got - want).norm() / (want - plain).norm().clamp_min(1e-30))


@pytest.mark.parametrize("family,dtype,impl", CASES, ids=[f"{f}-{str(d)[6:]}-{i}" for f, d, i in CASES])
def test_family_reads_memories_exactly_or_is_refused(family, dtype, impl):
    model = tiny_model(family, dtype, impl)
    if family in REFUSED:
        with pytest.raises(UnsupportedModelError, match=REFUSED[family]):
            spec = memory_spec_for(model, tokens_per_head=REFERENCE, reference_length=REFERENCE)
            MemoryInjector(model, spec)
        return
    layers = probe_geometry(model).attention_layers
    spec = memory_spec_for(model, layers, tokens_per_head=REFERENCE, reference_length=REFERENCE_LENGTH)
    tolerance = TOLERANCE[dtype]
    reference, context = _ids(model, 2, REFERENCE, 1), _ids(model, 2, CONTEXT, 2)
    memories = MemoryEncoder(model, None, spec).encode_ids(reference, prefix_length=0)
    assert all(m.positions.tolist() == [[list(range(REFERENCE))] * spec.kv_heads] * len(layers) for m in memories)

    plain = _logits(model, context)
    # the memory's tokens at 0..7 and the context from the reference interval's end (parallel positions)
    positions = torch.cat((torch.arange(REFERENCE), torch.arange(CONTEXT) + REFERENCE_LENGTH)).expand(2, -1)
    whole = torch.cat((reference, context), dim=1)  # a mask given: a position jump is not read as packed sequences
    prefix = _logits(model, whole, position_ids=positions, attention_mask=torch.ones_like(whole))[:, REFERENCE:]
    with MemoryInjector(model, spec) as injector:
        injector.set_memories([[], []])
        assert torch.equal(_logits(model, context), plain)  # no memories: the plain model, bit for bit
        injector.set_memories([[memories[0]], [memories[1]]])
        read = _logits(model, context)
        assert _relative(read, prefix, plain) < tolerance  # a memory of every token == the prefix

        injector.set_memories([[memories[0], memories[1]], [memories[1]]])  # rows of different lengths
        batch = _logits(model, context)
        for row, row_memories in enumerate(([memories[0], memories[1]], [memories[1]])):
            injector.set_memories([row_memories])
            alone = _logits(model, context[row : row + 1])
            assert _relative(batch[row], alone[0], plain[row]) < tolerance

        injector.set_memories([[memories[0]], [memories[1]]])
        with torch.inference_mode():
            out = model(input_ids=context[:, :-1], use_cache=True)
            assert out.past_key_values.get_seq_length() == CONTEXT - 1  # the cache holds the context only
            step = model(input_ids=context[:, -1:], cache=out.past_key_values, use_cache=True).logits
        assert _relative(step[:, -1].double(), read[:, -1], plain[:, -1]) < tolerance


GENERATE_FAMILIES = [f for f in ("llama", "qwen3", "gemma3", "cohere", "smollm3", "gpt_neox") if f in FAMILIES]


@pytest.mark.parametrize("family", GENERATE_FAMILIES)
def test_beams_return_sequences_and_static_cache_read_each_rows_memories(family):
    """Memories set for the prompt's rows serve generate's expanded rows (row b -> rows 2b, 2b+1):
    the same as setting each row's memories twice by hand; a static cache reads them as a dynamic one."""
    model = tiny_model(family, torch.float32, "sdpa")
    spec = memory_spec_for(model, tokens_per_head=4, reference_length=REFERENCE)
    memories = MemoryEncoder(model, None, spec).encode_ids(_ids(model, 2, REFERENCE, 1), prefix_length=0)
    context = _ids(model, 2, CONTEXT, 2)
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with torch.inference_mode(), MemoryInjector(model, spec) as injector:
        injector.set_memories([[memories[0]], [memories[1]]])
        beams = model.generate(context, num_beams=2, num_return_sequences=2, **options)
        dynamic = model.generate(context, **options)
        static = model.generate(context, cache_implementation="static", **options)
        injector.set_memories([[memories[0]], [memories[0]], [memories[1]], [memories[1]]])
        by_hand = model.generate(context, num_beams=2, num_return_sequences=2, **options)
        injector.clear()
        without = model.generate(context, **options)
    assert torch.equal(beams.sequences, by_hand.sequences)
    assert all(torch.equal(a, b) for a, b in zip(beams.logits, by_hand.logits))
    torch.testing.assert_close(static.logits[0], dynamic.logits[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dynamic.logits[0], without.logits[0], atol=1e-3)  # memories are read at all
