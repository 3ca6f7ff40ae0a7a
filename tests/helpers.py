"""Small helpers shared by the service tests."""

from __future__ import annotations

import contextlib

import grpc
import numpy as np
import pytest
import torch

from memory3.sdk.codec import encode_memory
from memory3.sdk.memory import ExplicitMemory
from memory3.sdk.memory_spec import MemorySpec

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
