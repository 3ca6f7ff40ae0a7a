"""Small helpers shared by the tests."""

from __future__ import annotations

import contextlib

import grpc
import numpy as np
import pytest
import torch

from memory3.sdk.memory.codec import encode_memory
from memory3.sdk.memory.tensors import ExplicitMemory
from memory3.core.memory_spec import MemorySpec
from memory3.trainer.config import StageConfig, TrainConfig, WorldConfig
from memory3.trainer.corpus import build_world
from memory3.trainer.tokenizer import train_tokenizer

FINGERPRINT = "ab12" * 16
SPEC = MemorySpec((0, 1), 2, 16, 4, 32, "int8")


@contextlib.contextmanager
def expect_status(code: grpc.StatusCode, match: str | None = None):
    """The block must fail with this gRPC status (and a message matching ``match``)."""
    with pytest.raises(grpc.RpcError) as info:
        yield info
    assert info.value.code() == code, f"expected {code}, got {info.value.code()}: {info.value.details()}"
    assert info.value.details(), "a failed call must say why"
    if match:
        assert match in info.value.details(), info.value.details()


def random_memory(spec: MemorySpec = SPEC, fingerprint: str = FINGERPRINT, seed: int = 0) -> ExplicitMemory:
    g = torch.Generator().manual_seed(seed)
    layers, _, heads, tokens, dim = spec.shape
    kv = torch.randn(spec.shape, generator=g)
    positions = torch.stack(
        [torch.randperm(spec.reference_length, generator=g)[:tokens] for _ in range(layers * heads)]
    ).reshape(layers, heads, tokens)
    return ExplicitMemory(kv, positions.long(), fingerprint)


def memory_payload(spec: MemorySpec = SPEC, fingerprint: str = FINGERPRINT, seed: int = 0, scheme: str = "int8") -> bytes:
    return encode_memory(random_memory(spec, fingerprint, seed), scheme)


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def assert_decisions_explain_tokens(decisions, token_ids, max_rejections: int) -> None:
    """Logged proxy decisions match what was generated: at each position the rejections count up
    from 0, only the last decision may accept (and then names the token), and a position with no
    acceptance ran into the cap and took a fallback token that was not among those rejected."""
    by_position: dict[int, list] = {}
    for d in decisions:
        by_position.setdefault(d.position, []).append(d)
    for position, token in enumerate(token_ids):
        step = by_position[position]
        assert [d.rejections for d in step] == list(range(len(step)))
        assert all(not d.accepted for d in step[:-1])
        if step[-1].accepted:
            assert step[-1].candidate_token == token
        else:
            assert len(step) == max_rejections and token not in {d.candidate_token for d in step}


STAGE2 = "memory3.trainer.memory_stage:retrieval_stage"


def two_stage_config(out_dir, stage1=4, stage2=4, **kw) -> TrainConfig:
    """A small world, a tiny model, ``stage1`` steps without memory, ``stage2`` with it."""
    defaults = dict(
        out_dir=str(out_dir), seed=0,
        world=WorldConfig(seed=0, n_entities=40, heldout_fraction=0.2, passages_per_entity=2),
        vocab_size=1024, preset="tiny", memory_layers=[2, 3], tokens_per_head=8, seq_len=128, batch_size=8,
        stages=[StageConfig(name="warmup", steps=stage1, lr=3e-3, min_lr=3e-4, warmup_steps=5),
                StageConfig(name="memory", steps=stage2, lr=2e-3, min_lr=2e-4, warmup_steps=5, memory=STAGE2,
                            chunk_size=64, references_per_chunk=1, previous_chunks=4)],
        log_interval=1, eval_interval=10_000, eval_questions=0, checkpoint_interval=10_000,
        num_threads=1, device="cpu", progress=False,
    )
    defaults.update(kw)
    return TrainConfig(**defaults)


def small_world_and_tokenizer():
    """The trainer tests' world (40 entities) and a 1024-token tokenizer trained on its text."""
    world = build_world(0, n_entities=40, passages_per_entity=2)
    return world, train_tokenizer(world.training_texts + [r.text for r in world.references], 1024)
