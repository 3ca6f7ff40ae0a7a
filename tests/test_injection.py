"""Injection: memories change logits only through memory layers, exactly as a hand-written
attention over concatenated K/V with the context after the memories' interval would.

All on tiny random Llama models (tests/tiny_models.py); no downloads, no mocks.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from memory3.sdk.memory.encoder import MemoryEncoder
from memory3.sdk.memory.injection import MemoryInjector
from memory3.sdk.memory.tensors import ExplicitMemory
from memory3.sdk.model.fingerprint import model_fingerprint
from memory3.sdk.model.positions import memory_spec_for, probe_geometry
from tiny_models import byte_tokenizer, tiny_llama

REFERENCES = [
    "The capital of France is Paris.",
    "Llamas are domesticated South American camelids.",
    "Explicit memory sits between weights and RAG.",
    "Quantization compresses vectors into a few bytes each.",
]
PROMPTS = ["Where is Paris? In", "Tell me about llamas and their", "Hi"]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=2)


@pytest.fixture(scope="module")
def spec(model):
    return memory_spec_for(model, memory_layers=(1, 2), tokens_per_head=4, reference_length=64)


@pytest.fixture(scope="module")
def memories(model, tokenizer, spec):
    return MemoryEncoder(model, tokenizer, spec).encode(REFERENCES)


def left_padded(tokenizer, prompts):
    """A left-padded batch with the position ids generate() would use (first real token at 0).

    With memories a context's absolute position matters (it sits after the memories' interval),
    so a direct forward over a left-padded batch must pass these position ids, as generate() does.
    """
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return batch


def real(batch, values):
    """Values at real (non-pad) token positions only: pad positions' outputs are undefined."""
    return values[batch["attention_mask"].bool()]


def logits(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs).logits


# ----------------------------------------------------------------------------- slow reference


def reference_logits(model, spec, ids: list[int], memories: list[ExplicitMemory],
                     sees: torch.Tensor | None = None) -> torch.Tensor:
    """Hand-written float64 forward of one unpadded sequence with memories.

    Uses the layers' own norms/projections/MLP but does attention by hand: in memory layers the
    memories' stored keys (rotated at their reference positions, untouched) and values are
    concatenated in front of the context's, the context sits at positions
    ``context_position_offset + t`` (the convention stated directly, not via key rotation),
    queries see all memories (or, with ``sees`` (queries, memories) bool, query t sees memory i
    where ``sees[t, i]``) and the causal context.
    """
    ref = _double(model)
    cfg = ref.config
    heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    length = len(ids)
    with torch.no_grad():
        h = ref.model.embed_tokens(torch.tensor([ids]))
        positions = spec.context_position_offset + torch.arange(length)
        cos, sin = ref.model.rotary_emb(h, positions[None])
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
        for layer_idx, layer in enumerate(ref.model.layers):
            x = layer.input_layernorm(h)
            q = layer.self_attn.q_proj(x).view(1, length, heads, dim).transpose(1, 2)
            k = layer.self_attn.k_proj(x).view(1, length, kv_heads, dim).transpose(1, 2)
            v = layer.self_attn.v_proj(x).view(1, length, kv_heads, dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            q, k, v = q[0], k[0], v[0]
            visible = causal
            slot = spec.layer_slot(layer_idx)
            if slot is not None and memories:
                mem_k = torch.cat([m.kv[slot, 0].double() for m in memories], dim=1)  # (kv heads, n*k, dim)
                mem_v = torch.cat([m.kv[slot, 1].double() for m in memories], dim=1)
                k, v = torch.cat((mem_k, k), dim=1), torch.cat((mem_v, v), dim=1)
                tokens = mem_k.shape[1] // len(memories)
                reads = (torch.ones(length, len(memories), dtype=torch.bool) if sees is None else sees)
                visible = torch.cat((reads.repeat_interleave(tokens, dim=1), causal), dim=1)
            outs = []
            for head in range(heads):
                g = head // (heads // kv_heads)
                scores = (q[head] @ k[g].T) / dim**0.5
                scores = scores.masked_fill(~visible, float("-inf"))
                outs.append(torch.softmax(scores, dim=-1) @ v[g])
            attn = torch.cat(outs, dim=-1)[None]
            h = h + layer.self_attn.o_proj(attn)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return ref.lm_head(ref.model.norm(h))[0]


_DOUBLES: dict[int, torch.nn.Module] = {}


def _double(model):
    if id(model) not in _DOUBLES:
        _DOUBLES[id(model)] = copy.deepcopy(model).double()
    return _DOUBLES[id(model)]


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_zero_memories_is_the_plain_model_bit_for_bit(impl, tokenizer, spec, memories):
    model = tiny_llama(seed=2, attn_implementation=impl)
    batch = left_padded(tokenizer, PROMPTS)
    plain = logits(model, batch)
    with MemoryInjector(model, spec) as injector:
        assert model.config._attn_implementation == f"memory3_{impl}"
        assert torch.equal(logits(model, batch), plain)
        injector.set_memories([[], [], []])
        assert torch.equal(logits(model, batch), plain)
        injector.set_memories([[memories[0]], [], []])
        assert not torch.equal(logits(model, batch), plain)
        injector.clear()
        assert torch.equal(logits(model, batch), plain)
        injector.set_memories([])  # no rows at all: as cleared
        assert torch.equal(logits(model, batch), plain)
    assert model.config._attn_implementation == impl
    assert torch.equal(logits(model, batch), plain)


def test_memories_act_only_through_memory_layers(model, tokenizer, memories):
    """Hidden states before the first memory layer are untouched bit-for-bit; after it they move."""
    spec = memory_spec_for(model, memory_layers=(2, 3), tokens_per_head=4, reference_length=64)
    encoded = MemoryEncoder(model, tokenizer, spec).encode(REFERENCES[:2])
    batch = left_padded(tokenizer, PROMPTS[:2])
    with torch.no_grad():
        plain = model(**batch, output_hidden_states=True).hidden_states
        with MemoryInjector(model, spec) as injector:
            injector.set_memories([encoded, encoded[:1]])
            injected = model(**batch, output_hidden_states=True).hidden_states
    for layer in range(3):  # embeddings, after layer 0, after layer 1
        assert torch.equal(plain[layer], injected[layer]), layer
    assert not torch.allclose(plain[3], injected[3]), "layer 2 is a memory layer"


def test_non_memory_layer_of_a_memory_is_ignored(model, tokenizer, spec, memories):
    """A memory is read only at the spec's layers: other layers never see any memory K/V."""
    wide = memory_spec_for(model, memory_layers=(0, 1, 2, 3), tokens_per_head=4, reference_length=64)
    wide_memory = MemoryEncoder(model, tokenizer, wide).encode(REFERENCES[:1])[0]
    # The narrow memory = the wide one restricted to spec's layers (1, 2); layers 0 and 3 of the
    # wide one are garbage to prove they are not read.
    narrow = ExplicitMemory(wide_memory.kv[1:3].clone(), wide_memory.positions[1:3].clone(), wide_memory.fingerprint)
    batch = left_padded(tokenizer, PROMPTS[:1])
    with MemoryInjector(model, spec) as injector:
        injector.set_memories([[narrow]])
        expected = logits(model, batch)
    garbled = wide_memory.kv.clone()
    garbled[0].normal_()
    garbled[3].normal_()
    with MemoryInjector(model, spec) as injector:
        injector.set_memories([[ExplicitMemory(garbled[1:3], wide_memory.positions[1:3], wide_memory.fingerprint)]])
        assert torch.equal(logits(model, batch), expected)


def test_injection_equals_hand_written_reference(model, tokenizer, spec, memories):
    rows = [memories[:2], memories[2:], [], memories[1:2]]
    _double(model)  # copied before the injector hooks the model
    with MemoryInjector(model, spec) as injector:
        for prompt, row in zip(PROMPTS + ["Hi"], rows):  # "Hi": two tokens, the shortest causal prefill
            ids = tokenizer(prompt)["input_ids"]
            injector.set_memories([row])
            got = logits(model, {"input_ids": torch.tensor([ids])})[0]
            expected = reference_logits(model, spec, ids, row)
            torch.testing.assert_close(got.double(), expected, atol=5e-5, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_per_query_visibility_equals_hand_written_reference(impl, tokenizer, spec, memories):
    """``visible`` (stage 2's chunk-local reading): query t of row b reads memory i only where
    visible[b, t, i]; each row matches the reference forward with that row's pattern, a row whose
    pattern hides everything reads as without memories, and a forward of another length is refused."""
    model = tiny_llama(seed=2, attn_implementation=impl)
    ids = [tokenizer(p)["input_ids"][:10] for p in PROMPTS[:2]]
    width = min(len(i) for i in ids)
    ids = [i[:width] for i in ids]
    rows = [memories[:3], memories[1:4]]
    visible = torch.zeros(2, width, 3, dtype=torch.bool)
    visible[0, : width // 2, 0] = True  # first half reads memory 0, second half memories 1 and 2
    visible[0, width // 2 :, 1:] = True
    visible[1, :, 2] = True  # row 1 reads only its last memory, everywhere
    _double(model)
    with MemoryInjector(model, spec) as injector:
        injector.set_memories(rows, visible=visible)
        got = logits(model, {"input_ids": torch.tensor(ids)})
        for b in range(2):
            expected = reference_logits(model, spec, ids[b], rows[b], sees=visible[b])
            torch.testing.assert_close(got[b].double(), expected, atol=5e-5, rtol=0)
        injector.set_memories(rows, visible=torch.zeros(2, width, 3, dtype=torch.bool))
        hidden = logits(model, {"input_ids": torch.tensor(ids)})
        injector.clear()
        torch.testing.assert_close(hidden, logits(model, {"input_ids": torch.tensor(ids)}), atol=1e-5, rtol=0)
        injector.set_memories(rows, visible=visible)
        with pytest.raises(ValueError, match=f"covers {width} queries, the forward has {width - 1}"):
            logits(model, {"input_ids": torch.tensor(ids)[:, :-1]})


def test_visible_must_be_bool_batch_by_queries_by_memories(model, spec, memories):
    rows = [memories[:3], memories[2:3]]
    good = torch.ones(2, 5, 3, dtype=torch.bool)
    bad = {"float": good.float(), "2-d": good[:, :, 0], "4-d": good[..., None], "batch": good[:1],
           "memories": torch.ones(2, 5, 2, dtype=torch.bool)}
    with MemoryInjector(model, spec) as injector:
        injector.set_memories(rows, visible=good)
        for name, visible in bad.items():
            with pytest.raises(ValueError, match=r"visible must be a bool tensor \(batch, queries, memories\) = \(2, q, 3\)"):
                injector.set_memories(rows, visible=visible)


@pytest.mark.parametrize("layout", [(0, 1, 2), (None, 0, None, 3)], ids=["last-row-empty", "empty-rows-first"])
def test_batch_equals_single_sequences(model, tokenizer, spec, memories, layout):
    """Each row of a batch reads its own memories as if it ran alone; rows without memories (also
    before rows with them) read none. ``layout``: per row, which memory group it gets (None: none)."""
    groups = [memories[:3], [memories[3]], [], memories[:2]]
    rows = [groups[g] if g is not None else [] for g in layout]
    prompts = (PROMPTS * 2)[: len(rows)]
    batch = left_padded(tokenizer, prompts)
    with MemoryInjector(model, spec) as injector:
        injector.set_memories(rows)
        batched = logits(model, batch)
        for b, (prompt, row) in enumerate(zip(prompts, rows)):
            ids = tokenizer(prompt, return_tensors="pt")
            injector.set_memories([row])
            single = logits(model, ids)[0]
            n = ids["input_ids"].shape[1]
            torch.testing.assert_close(batched[b, -n:], single, atol=1e-5, rtol=1e-5)


def test_one_memory_list_broadcasts_to_the_batch(model, tokenizer, spec, memories):
    batch = left_padded(tokenizer, PROMPTS)
    with MemoryInjector(model, spec) as injector:
        injector.set_memories([memories[:2]] * 3)
        each = logits(model, batch)
        injector.set_memories([memories[:2]])
        assert torch.equal(logits(model, batch), each)
        injector.set_memories([memories[:2]] * 2)
        with pytest.raises(ValueError, match="2 rows but the batch has 3"):
            logits(model, batch)
        injector.set_memories([memories[:2]] * 4)
        with pytest.raises(ValueError, match="4 rows but the batch has 3"):
            logits(model, batch)


@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "same-length"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_generate_with_cache_equals_full_recompute(impl, padded, tokenizer, spec, memories):
    """Cached generation equals recomputing everything each step — also for prompts of one length,
    where the model passes no mask of its own and the injector builds (and caches) one per step
    for the row with fewer memories."""
    model = tiny_llama(seed=2, attn_implementation=impl)
    batch = left_padded(tokenizer, PROMPTS[:2] if padded else [PROMPTS[0], "Llamas live in the"])
    assert padded or bool(batch["attention_mask"].all())
    steps = 6
    with MemoryInjector(model, spec) as injector:
        injector.set_memories([memories[:2], memories[2:3]])
        with torch.no_grad():
            out = model.generate(
                **batch, max_new_tokens=steps, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                output_logits=True, return_dict_in_generate=True,
            )
        ids, mask = batch["input_ids"], batch["attention_mask"]
        for step in range(steps):
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            full = logits(model, {"input_ids": ids, "attention_mask": mask}, position_ids=position_ids, use_cache=False)
            torch.testing.assert_close(out.logits[step], full[:, -1], atol=1e-4, rtol=1e-4)
            next_ids = full[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat((ids, next_ids), dim=1)
            mask = torch.cat((mask, torch.ones_like(next_ids)), dim=1)
        assert torch.equal(out.sequences, ids)


def test_eager_and_sdpa_agree(tokenizer, spec, memories):
    batch = left_padded(tokenizer, PROMPTS)
    rows = [memories[:2], memories[2:], []]
    results = []
    for impl in ("sdpa", "eager"):
        model = tiny_llama(seed=2, attn_implementation=impl)
        with MemoryInjector(model, spec) as injector:
            injector.set_memories(rows)
            results.append(logits(model, batch))
    torch.testing.assert_close(real(batch, results[0]), real(batch, results[1]), atol=1e-5, rtol=1e-5)


def test_parallel_positions_rotation_equals_context_shift(model):
    """R(-offset) on a key == +offset on the query: attention scores agree — with the rotation the
    model itself applies (its rotary module's cos/sin through HF's apply_rotary_pos_emb), so the
    measured rotation must have the model's frequencies and layout, not just be some rotation."""
    rotary = probe_geometry(model).rotations[1]
    torch.manual_seed(0)
    dim = model.config.head_dim
    x = torch.randn(1, 1, 9, dim)
    positions = torch.tensor([[0, 1, 2, 5, 17, 64, 100, 300, 1000]])
    cos, sin = model.model.rotary_emb(x, positions)
    by_model, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(rotary.rotate(x[0, 0], positions[0]), by_model[0, 0], atol=1e-5, rtol=1e-5)
    q, k = torch.randn(5, 16, dtype=torch.float64), torch.randn(7, 16, dtype=torch.float64)
    q_pos, k_pos, offset = torch.arange(5), torch.arange(7) * 3, 64
    shifted_context = rotary.rotate(q, q_pos + offset) @ rotary.rotate(k, k_pos).T
    rotated_memory = rotary.rotate(q, q_pos) @ rotary.rotate(rotary.rotate(k, k_pos), -offset).T
    torch.testing.assert_close(shifted_context, rotated_memory)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_retrieval_prior_weighs_memories_by_their_scores(impl, tokenizer, spec, memories):
    """The prior lowers a memory's attention by ``retrieval_bias * (best score - its score)``: equal
    scores read as without the prior; a far worse score reads as if that memory were absent; the
    bias follows the memory wherever it sits in the row and whatever the batch's padding."""
    model = tiny_llama(seed=2, attn_implementation=impl)
    batch = left_padded(tokenizer, PROMPTS)
    rows = [memories[:2], [memories[2], memories[0]], [memories[3]]]
    with MemoryInjector(model, spec) as injector:
        injector.set_memories(rows)
        unbiased = logits(model, batch)
        injector.set_memories([[rows[0][0]], [rows[1][1]], rows[2]])
        best_only = logits(model, batch)
    with MemoryInjector(model, spec, retrieval_bias=5.0) as injector:
        injector.set_memories(rows, [[0.7, 0.7], [0.3, 0.3], [0.9]])
        torch.testing.assert_close(real(batch, logits(model, batch)), real(batch, unbiased), atol=1e-5, rtol=1e-5)
        injector.set_memories(rows, [[0.9, -1e4], [-1e4, 0.2], [0.5]])
        torch.testing.assert_close(real(batch, logits(model, batch)), real(batch, best_only), atol=1e-5, rtol=1e-5)
        injector.set_memories(rows, [[0.9, 0.8], [0.4, 0.5], [0.5]])
        between = real(batch, logits(model, batch))
        assert not torch.allclose(between, real(batch, unbiased), atol=1e-4)
        assert not torch.allclose(between, real(batch, best_only), atol=1e-4)
        injector.set_memories(rows)  # no scores: no prior
        assert torch.equal(logits(model, batch), unbiased)
    with MemoryInjector(model, spec) as injector:  # retrieval_bias 0: scores are ignored
        injector.set_memories(rows, [[0.9, -1e4], [-1e4, 0.2], [0.5]])
        assert torch.equal(logits(model, batch), unbiased)
        injector.set_memories(rows, [[], [], []])  # a memory source without scores (bench_decoding's)
        assert torch.equal(logits(model, batch), unbiased)


def test_a_small_retrieval_bias_still_weighs_and_follows_beams(tokenizer, spec, memories):
    """A bias below 1 is still a prior (0.5 moves the logits); with beam search each beam of a row
    reads that row's memories under that row's prior, as if they had been set per beam."""
    model = tiny_llama(seed=2)
    batch = left_padded(tokenizer, PROMPTS[:2])
    rows, scores = [memories[:2], memories[2:4]], [[0.9, -3.0], [-2.0, 0.8]]
    with MemoryInjector(model, spec) as injector:
        injector.set_memories(rows)
        unbiased = logits(model, batch)
    with MemoryInjector(model, spec, retrieval_bias=0.5) as injector:
        injector.set_memories(rows, scores)
        assert not torch.allclose(real(batch, logits(model, batch)), real(batch, unbiased), atol=1e-4)
        runs = []
        for per_beam in (False, True):
            if per_beam:  # generate lays the beams of row b out at rows 2b, 2b+1
                injector.set_memories([r for r in rows for _ in range(2)], [s for s in scores for _ in range(2)])
            else:
                injector.set_memories(rows, scores)
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=5, num_beams=2, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, output_scores=True,
                                     return_dict_in_generate=True)
            runs.append(out)
        assert torch.equal(runs[0].sequences, runs[1].sequences)
        for a, b in zip(runs[0].scores, runs[1].scores):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_retrieval_prior_refuses_bad_scores(model, spec, memories):
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="retrieval_bias must be finite and >= 0"):
            MemoryInjector(model, spec, retrieval_bias=bad)
    with MemoryInjector(model, spec, retrieval_bias=1.0) as injector:
        for scores in ([[0.5]], [[0.5, 0.4, 0.3]]):
            with pytest.raises(ValueError, match=r"scores per row \[\d\] do not match memories per row \[2\]"):
                injector.set_memories([memories[:2]], scores)
        injector.set_memories([memories[:1]], [[0.5]])
        before = injector.counts
        with pytest.raises(ValueError, match="scores of row 0 are not all finite"):
            injector.set_memories([memories[:2]], [[0.5, float("nan")]])
        assert injector.counts == before  # refused input changes nothing


def test_refuses_foreign_or_misshapen_memories(model, tokenizer, spec, memories):
    foreign = dataclasses.replace(memories[0], fingerprint="f" * 64)
    with MemoryInjector(model, spec) as injector:
        running = model_fingerprint(model)[:16]
        with pytest.raises(ValueError, match=f"belongs to model f{{16}}…, the running model is {running}…;"):
            injector.set_memories([[memories[1], foreign]])
        small = ExplicitMemory(memories[0].kv[:1], memories[0].positions[:1], memories[0].fingerprint)
        large = ExplicitMemory(torch.cat((memories[0].kv, memories[0].kv[:1])),
                               torch.cat((memories[0].positions, memories[0].positions[:1])), memories[0].fingerprint)
        for misshapen in (small, large):
            with pytest.raises(ValueError, match="spec needs"):
                injector.set_memories([[misshapen]])
    with MemoryInjector(model, spec, verify_fingerprint=False) as injector:
        injector.set_memories([[foreign]])


def test_injector_is_reentrant_and_restores_on_error(model, tokenizer, spec, memories):
    injector = MemoryInjector(model, spec)
    with pytest.raises(RuntimeError, match="boom"):
        with injector:
            injector.set_memories([[memories[0]]])
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert not injector.active and injector.counts == []
    with injector:
        with pytest.raises(ValueError, match="already hooked"):
            MemoryInjector(model, spec).activate()
    assert all("_memory3_attention_hook" not in m.__dict__ for m in model.modules())
