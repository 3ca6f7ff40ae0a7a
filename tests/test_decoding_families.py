"""Decoding with memory through a real server on families other than Llama.

For each family (interleaved RoPE, a NoPE layer, per-layer-type RoPE bases, partial rotary): a bank
of the prompt's own chunks is written through the service with the family's model, generation
retrieves and reads memories every chunk, and replaying what each segment recorded — memories
fetched back from the service by id — gives the logits generation returned. Memories change what
is generated, so the check is not vacuous.
"""

import secrets

import pytest
import torch
from decoding_helpers import generate_flat, replay
from model_zoo import tiny_config
from tiny_models import byte_tokenizer
from transformers import AutoModelForCausalLM

from memory3.sdk.client import BankInfo
from memory3.sdk.memory.encoder import MemoryEncoder
from memory3.sdk.memory.supply import MemorySupply
from memory3.sdk.memory.writer import MemoryWriter
from memory3.sdk.model.fingerprint import model_fingerprint
from memory3.sdk.model.positions import memory_spec_for, probe_geometry

CHUNK = 16
PROMPT = "The lighthouse keeper counted ships at dawn, then wrote to his sister in Oslo."
FILLER = [f"Unrelated note {i}: a recipe for {w} soup with {i} onions." for i, w in enumerate(["leek", "pea", "corn"])]
FAMILIES = {"cohere": "interleaved", "smollm3": "none", "gemma3": "half", "gpt_neox": "half"}
"""Family -> a rotation layout that must occur among its layers (measured by the probe)."""


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_reads_the_memories_it_retrieved(family, server, api_key, blocking, tokenizer):
    torch.manual_seed(5)
    config = tiny_config(family, vocab_size=len(tokenizer), num_hidden_layers=4,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    assert FAMILIES[family] in {r.layout for r in probe_geometry(model).rotations.values()}
    spec = memory_spec_for(model, tokens_per_head=4, reference_length=64)
    bank = "fam-" + secrets.token_hex(3)
    blocking.create_bank(BankInfo(bank, model_fingerprint(model), spec))
    ids = tokenizer(PROMPT)["input_ids"]
    chunks = [tokenizer.decode(ids[i : i + CHUNK], skip_special_tokens=True) for i in range(0, len(ids), CHUNK)]
    refs = [(f"p{i}", text) for i, text in enumerate(chunks)] + [(f"f{i}", t) for i, t in enumerate(FILLER)]
    options = dict(max_new_tokens=24, chunk=CHUNK, top_k=2, stop_at_eos=False, output_scores=True)
    with MemorySupply(server.target, api_key, model, spec, tokenizer=tokenizer) as supply:
        supply.run(MemoryWriter(MemoryEncoder(model, tokenizer, spec)).write(supply.client, bank, refs, progress=False))
        [result] = generate_flat(model, tokenizer, [PROMPT], supply=supply, bank=bank, **options)
    [plain] = generate_flat(model, tokenizer, [PROMPT], mode="plain", **options)
    assert [s.reference_ids[0] for s in result.segments[:5]] == [f"p{i}" for i in range(5)]
    torch.testing.assert_close(replay(model, spec, blocking, bank, result), result.scores, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(result.scores, plain.scores, atol=1e-3)
