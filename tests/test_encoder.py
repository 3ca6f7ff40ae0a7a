"""Encoder: shapes, positions, selection against a slow loop-based reference, padding, fingerprint.

All on tiny random Llama models (tests/tiny_models.py); no downloads, no mocks.
"""

from __future__ import annotations

import math

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from memory3.core.memory_spec import REFERENCE_MARKER
from memory3.sdk.memory.encoder import MemoryEncoder, ReferenceTooShortError
from memory3.sdk.model.fingerprint import model_fingerprint
from memory3.sdk.model.positions import memory_spec_for, probe_geometry
from tiny_models import byte_tokenizer, tiny_llama

TEXTS = [
    "The capital of France is Paris.",
    "Llamas are domesticated South American camelids.",
    "Explicit memory sits between weights and RAG.",
    "Short but enough.",
    "Quantization compresses vectors into a few bytes each, with codebooks.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=1)


@pytest.fixture(scope="module")
def spec(model):
    return memory_spec_for(model, memory_layers=(0, 2), tokens_per_head=5, reference_length=64)


@pytest.fixture(scope="module")
def encoder(model, tokenizer, spec):
    return MemoryEncoder(model, tokenizer, spec)


# ----------------------------------------------------------------------------- slow reference


def slow_select(model, spec, ids: list[int], prefix_length: int):
    """Loop-based reference for one reference: per memory layer and kv head, the log score of
    every selectable position and all post-RoPE keys / values, recomputed in float64 from the
    layer's own projections.

    w_j = sum over the group's query heads h and all queries i of exp(q_i . k_j / sqrt(d)), q and
    k before RoPE, summed term by term in the log domain (no overflow), j after the prefix.
    """
    ref = _double(model)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        hidden = ref(input_ids, output_hidden_states=True).hidden_states
        cfg = ref.config
        heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        group = heads // kv_heads
        length = len(ids)
        cos, sin = ref.model.rotary_emb(hidden[0], torch.arange(length)[None])
        out = {}
        for layer_idx in spec.memory_layers:
            layer = ref.model.layers[layer_idx]
            x = layer.input_layernorm(hidden[layer_idx])
            q = layer.self_attn.q_proj(x).view(1, length, heads, dim).transpose(1, 2)
            k = layer.self_attn.k_proj(x).view(1, length, kv_heads, dim).transpose(1, 2)
            v = layer.self_attn.v_proj(x).view(1, length, kv_heads, dim).transpose(1, 2)
            _, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
            kept = []
            for g in range(kv_heads):
                scores = {}
                for j in range(prefix_length, length):
                    terms = [
                        float(q[0, h, i] @ k[0, g, j]) / math.sqrt(dim)
                        for h in range(g * group, (g + 1) * group)
                        for i in range(length)
                    ]
                    top = max(terms)
                    scores[j] = top + math.log(math.fsum(math.exp(t - top) for t in terms))
                kept.append((scores, k_rot[0, g], v[0, g]))
            out[layer_idx] = kept
    return out


_DOUBLES: dict[int, torch.nn.Module] = {}


def _double(model):
    import copy

    if id(model) not in _DOUBLES:
        _DOUBLES[id(model)] = copy.deepcopy(model).double()
    return _DOUBLES[id(model)]


def check_against_slow(model, spec, encoder, text, memory, atol=1e-5, tie=1e-3):
    """The kept positions are a top-k set of the reference scores, and their K/V match.

    Equal scores are genuine in this model: in layer 0 a pre-RoPE key depends on the token only,
    so repeated tokens tie exactly and either copy is a correct choice. Scores within ``tie`` (log
    domain; the encoder merges neighbours closer than 1e-4) of the k-th best count as tied;
    everything else must match.
    """
    ids = encoder.tokenize([text])[0]
    expected = slow_select(model, spec, ids, len(encoder.prefix_ids))
    k = spec.tokens_per_head
    exact = 0
    for slot, layer_idx in enumerate(spec.memory_layers):
        for g, (scores, keys, values) in enumerate(expected[layer_idx]):
            kept = memory.positions[slot, g].tolist()
            ranked = sorted(scores, key=lambda j: -scores[j])
            kth = scores[ranked[k - 1]]
            assert all(scores[j] >= kth - tie for j in kept), (layer_idx, g, kept, ranked[:k])
            assert all(scores[j] <= kth + tie for j in scores if j not in kept), (layer_idx, g, kept, ranked[:k])
            exact += sorted(ranked[:k]) == kept
            torch.testing.assert_close(memory.kv[slot, 0, g].double(), keys[kept], atol=atol, rtol=0)
            torch.testing.assert_close(memory.kv[slot, 1, g].double(), values[kept], atol=atol, rtol=0)
    return exact


# ----------------------------------------------------------------------------- tests


def test_shapes_positions_and_fingerprint(model, spec, encoder):
    memories = encoder.encode(TEXTS)
    assert len(memories) == len(TEXTS)
    prefix = len(encoder.prefix_ids)
    assert encoder.prefix_ids[0] == encoder.tokenizer.bos_token_id
    assert prefix == 1 + len(encoder.tokenizer(REFERENCE_MARKER, add_special_tokens=False)["input_ids"])
    for text, memory in zip(TEXTS, memories):
        length = len(encoder.tokenize([text])[0])
        assert tuple(memory.kv.shape) == spec.shape
        assert memory.kv.dtype == torch.float32
        assert memory.positions.dtype == torch.int64
        assert tuple(memory.positions.shape) == (len(spec.memory_layers), spec.kv_heads, spec.tokens_per_head)
        assert int(memory.positions.min()) >= prefix, "BOS / marker must never be kept"
        assert int(memory.positions.max()) < length, "padding must never be kept"
        assert bool((memory.positions.diff(dim=-1) > 0).all()), "positions sorted and distinct per head"
        assert memory.fingerprint == model_fingerprint(model)
    # heads may keep different tokens; on this model at least one pair of heads differs
    assert any(not torch.equal(m.positions[:, 0], m.positions[:, 1]) for m in memories)


def test_selection_equals_slow_reference(model, spec, encoder):
    memories = encoder.encode(TEXTS[:3])
    exact = sum(check_against_slow(model, spec, encoder, text, memory) for text, memory in zip(TEXTS[:3], memories))
    heads = 3 * len(spec.memory_layers) * spec.kv_heads
    assert exact >= heads // 2, f"only {exact} of {heads} heads kept exactly the reference's top-k"


def test_kept_keys_carry_reference_positions(model, spec, encoder):
    """A kept key rotated back by its recorded position is the layer's own pre-RoPE key at that
    position (read from k_proj with a hook): RoPE was applied at the reference position, before
    selection — not at another position, and not left out."""
    memory = encoder.encode([TEXTS[1]])[0]
    ids = encoder.tokenize([TEXTS[1]])[0]
    captured = {}
    hooks = [model.model.layers[i].self_attn.k_proj.register_forward_hook(
        lambda _m, _inp, out, i=i: captured.__setitem__(i, out.detach())) for i in spec.memory_layers]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    rotations = probe_geometry(model).rotations
    back = torch.stack([rotations[layer].rotate(memory.keys[slot], -memory.positions[slot])
                        for slot, layer in enumerate(spec.memory_layers)])
    for slot, layer in enumerate(spec.memory_layers):
        pre = captured[layer][0].view(len(ids), spec.kv_heads, spec.head_dim).transpose(0, 1)  # (heads, seq, dim)
        for g in range(spec.kv_heads):
            torch.testing.assert_close(back[slot, g], pre[g, memory.positions[slot, g]], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(back, memory.keys, atol=1e-3)  # the stored keys are rotated


def test_padded_batch_equals_one_by_one(encoder):
    batched = encoder.encode(TEXTS, batch_size=len(TEXTS))
    for text, memory in zip(TEXTS, batched):
        alone = encoder.encode([text])[0]
        assert torch.equal(alone.positions, memory.positions)
        torch.testing.assert_close(alone.kv, memory.kv, atol=1e-5, rtol=1e-5)
    uneven = encoder.encode(TEXTS, batch_size=2)  # several batches, order restored
    for a, b in zip(batched, uneven):
        assert torch.equal(a.positions, b.positions)
        torch.testing.assert_close(a.kv, b.kv, atol=1e-5, rtol=1e-5)


def test_truncation_to_reference_length(model, spec, encoder):
    long_text = "memory " * 40
    ids = encoder.tokenize([long_text])[0]
    assert len(ids) == spec.reference_length
    memory = encoder.encode([long_text])[0]
    assert int(memory.positions.max()) < spec.reference_length
    check_against_slow(model, spec, encoder, long_text, memory)


def test_short_reference_is_an_error(encoder):
    with pytest.raises(ReferenceTooShortError, match="fewer than 5 tokens"):
        encoder.encode(["ok", TEXTS[0]])


def test_logsumexp_survives_huge_logits(tokenizer):
    """Scores whose exp overflows float32 still select exactly what the log-domain reference does."""
    model = tiny_llama(seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40.0)
    spec = memory_spec_for(model, memory_layers=(1,), tokens_per_head=4, reference_length=48)
    encoder = MemoryEncoder(model, tokenizer, spec)
    memory = encoder.encode([TEXTS[0]])[0]
    assert torch.isfinite(memory.kv).all()
    check_against_slow(model, spec, encoder, TEXTS[0], memory, atol=1e-4)


def test_eager_and_sdpa_encoders_agree(tokenizer, spec, encoder):
    eager = tiny_llama(seed=1, attn_implementation="eager")
    a = MemoryEncoder(eager, tokenizer, spec).encode(TEXTS)
    b = encoder.encode(TEXTS)
    for x, y in zip(a, b):
        assert torch.equal(x.positions, y.positions)
        torch.testing.assert_close(x.kv, y.kv, atol=1e-5, rtol=0)
        assert x.fingerprint == y.fingerprint, "attention implementation is not part of the fingerprint"
    assert eager.config._attn_implementation == "eager"


def test_model_state_restored(model, encoder):
    model.train()
    try:
        encoder.encode([TEXTS[0]])
        assert model.training
    finally:
        model.eval()
    with pytest.raises(ReferenceTooShortError):
        encoder.encode(["x"])
    assert model.config._attn_implementation == "sdpa"


def test_encode_ids_rejects_left_padding(encoder):
    ids, mask = encoder.pad(encoder.tokenize(TEXTS[:2]))
    with pytest.raises(ValueError, match="right-padded"):
        encoder.encode_ids(ids, mask.flip(-1))


def test_fingerprint_changes_with_any_weight():
    a, b = tiny_llama(seed=7), tiny_llama(seed=7)
    fa = model_fingerprint(a)
    assert len(fa) == 64 and fa == model_fingerprint(b), "same config and weights, same fingerprint"
    with torch.no_grad():
        a.model.layers[3].mlp.down_proj.weight[0, 0] += 1e-3
    fa2 = model_fingerprint(a)
    assert fa2 != fa, "an in-place change must invalidate the cached digest"
    with torch.no_grad():
        a.model.layers[3].mlp.down_proj.weight[0, 0] -= 1e-3
        a.load_state_dict(b.state_dict())
    assert model_fingerprint(a) == fa
    assert model_fingerprint(tiny_llama(seed=8)) != fa
    assert model_fingerprint(tiny_llama(seed=7, layers=3)) != fa


def test_fingerprint_survives_save_and_load_and_follows_the_config(tmp_path, spec):
    """The model that was saved, and the same model loaded back, have one fingerprint
    (save_pretrained fills in ``architectures`` and ``dtype``); a config change is seen even
    after the digest was cached."""
    from memory3.trainer.model import load_reference_model, save_reference_model

    model = tiny_llama(seed=7)
    before = model_fingerprint(model)
    save_reference_model(model, byte_tokenizer(), spec, tmp_path / "m")
    assert model_fingerprint(model) == before
    loaded, _, _ = load_reference_model(tmp_path / "m")
    assert model_fingerprint(loaded) == before
    loaded.config.rope_theta = 5000.0
    assert model_fingerprint(loaded) != before



def test_ties_go_to_the_earlier_token():
    from memory3.sdk.memory.encoder import rank_with_ties

    inf = float("-inf")
    scores = torch.tensor([[1.0, 2.0 + 3e-7, 2.0, 0.5, inf, 2.0 - 2e-7, inf]])
    assert rank_with_ties(scores).tolist() == [[1, 2, 5, 0, 3, 4, 6]]
    assert rank_with_ties(torch.tensor([3.0, 1.0, 2.0])).tolist() == [0, 2, 1]


def test_half_precision_model_selects_and_encodes_in_float32(model, tokenizer, spec):
    """A bfloat16 model encodes what its exact float32 upcast encodes (same kept tokens, same K/V
    bit for bit), and comes back from encoding unchanged: dtype, values and fingerprint."""
    half = copy.deepcopy(model).to(torch.bfloat16)
    upcast = copy.deepcopy(half).to(torch.float32)
    weights = {name: tensor.clone() for name, tensor in half.state_dict().items()}
    fingerprint = model_fingerprint(half)
    got = MemoryEncoder(half, tokenizer, spec).encode(TEXTS)
    want = MemoryEncoder(upcast, tokenizer, spec).encode(TEXTS)
    for g, w in zip(got, want):
        assert torch.equal(g.positions, w.positions) and g.kv.dtype == torch.float32 and torch.equal(g.kv, w.kv)
        assert g.fingerprint == fingerprint != w.fingerprint  # pinned to the model as loaded
    state = half.state_dict()
    assert all(state[name].dtype == tensor.dtype and torch.equal(state[name], tensor) for name, tensor in weights.items())
    assert model_fingerprint(half) == fingerprint
