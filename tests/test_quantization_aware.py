"""Quantization-aware reading (a stage with ``pq_bytes``): the memories a step reads are exactly
what the codec returns for them, gradients pass the round trip, the codebook follows the weights,
and a training stage really reads coded memories. Real tokenizer, real tiny models, real codec."""

import pytest
import torch

from memory3.sdk.memory.codec import decode_memory, encode_memory
from memory3.sdk.memory.encoder import MemoryEncoder
from memory3.trainer.config import StageConfig, TrainConfig
from memory3.trainer.model import build_model, default_memory_spec
from memory3.trainer.pretrain import run_training
from memory3.trainer.quantization_aware import CodebookRoundTrip, round_trip, sample_references

from helpers import small_world_and_tokenizer, two_stage_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def encoder():
    world, tokenizer = small_world_and_tokenizer()
    model = build_model("tiny", len(tokenizer), seed=0)
    spec = default_memory_spec(model, (2, 3), tokens_per_head=8)
    return world, MemoryEncoder(model, tokenizer, spec)


def test_round_trip_returns_what_the_codec_decodes_and_passes_gradients_straight_through(encoder):
    world, enc = encoder
    trip = CodebookRoundTrip(enc, sample_references(world, 60), bytes_per_vector=2, quantizer="residual")
    codebook = trip.train()
    texts = [r.text for r in world.references[:3]]
    live = enc.encode_differentiable(texts)
    coded = round_trip(live, codebook)
    for original, got in zip(live, coded):
        expected = decode_memory(encode_memory(original, "pq", codebook), codebook=codebook)
        torch.testing.assert_close(got.kv.detach(), expected.kv, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.positions, original.positions)
        assert not torch.allclose(got.kv.detach(), original.kv.detach(), atol=1e-3)  # really coded: 2 bytes/vector
    weights = torch.randn_like(coded[1].kv)
    (grad,) = torch.autograd.grad((coded[1].kv * weights).sum(), live[1].kv)
    torch.testing.assert_close(grad, weights)  # straight-through: d coded / d original = identity
    assert round_trip([], codebook) == []


def test_codebook_is_trained_again_on_the_current_weights_every_refresh_steps(encoder):
    world, enc = encoder
    trip = CodebookRoundTrip(enc, sample_references(world, 40), bytes_per_vector=2, refresh=2, kmeans_iters=3)
    memories = enc.encode([world.references[0].text])
    trip(memories)
    first = trip.codebook
    trip(memories)
    assert trip.codebook is first  # within the refresh interval: kept
    with torch.no_grad():
        for p in enc.model.model.layers[2].self_attn.k_proj.parameters():
            p.mul_(1.5)  # the weights move, as in training
    try:
        trip(memories)
        assert trip.codebook is not first
        assert not torch.equal(trip.codebook.mean, first.mean)  # fitted to memories of the new weights
    finally:
        with torch.no_grad():
            for p in enc.model.model.layers[2].self_attn.k_proj.parameters():
                p.div_(1.5)


def test_a_pq_stage_trains_on_coded_memories(tmp_path):
    """Same seed, same data: the stage-1 losses agree, and the memory stage's differ only because
    its memories were coded (2 bytes per 32-d vector is far from exact)."""
    def config(name, pq_bytes):
        base = two_stage_config(tmp_path / name, stage1=2, stage2=3)
        base.stages[1].pq_bytes = pq_bytes
        base.stages[1].pq_sample = 40
        return base

    exact = run_training(config("exact", 0)).history
    coded = run_training(config("coded", 2)).history
    assert [r["loss"] for r in exact[:2]] == [r["loss"] for r in coded[:2]]  # deterministic: bit for bit
    # an untrained reader barely uses memory, so coding moves the loss little, but always
    assert all(abs(a["loss"] - b["loss"]) > 1e-5 for a, b in zip(exact[2:], coded[2:]))


@pytest.mark.parametrize("stage, message", [
    (StageConfig(pq_bytes=4), "needs a memory stage"),
    (StageConfig(memory="retrieval", pq_bytes=4, pq_quantizer="lattice"), "pq_quantizer must be one of"),
    (StageConfig(memory="retrieval", pq_bytes=-1), "pq_bytes must be >= 0"),
])
def test_pq_stage_settings_are_checked(stage, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(stages=[stage]).validate()
