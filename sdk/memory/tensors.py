"""One reference's explicit memory as tensors: what the encoder makes, the codec stores and the
injection path reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExplicitMemory:
    """Sparse attention key/values of one reference.

    kv:         (memory layers, 2 [K, V], kv heads, tokens per head, head dim); keys are post-RoPE,
                rotated at their ``positions`` inside the reference.
    positions:  (memory layers, kv heads, tokens per head) int64: where each kept token sits in the
                reference (marker included); each head may keep different tokens.
    fingerprint: hex digest of the model (config + weights) that computed it; memories belong to
                one model.
    retrieval_key: (dim,) float32 unit vector in the model's retrieval space, when the encoder
                had a :class:`~memory3.sdk.memory.retrieval_head.RetrievalHead` (else None); it is
                stored as the reference's vector, not in the memory's blob.
    """

    kv: torch.Tensor
    positions: torch.Tensor
    fingerprint: str
    retrieval_key: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.kv.dim() != 5 or self.kv.shape[1] != 2:
            raise ValueError(f"memory kv must be (layers, 2, kv heads, tokens, head dim), got {tuple(self.kv.shape)}")
        if tuple(self.positions.shape) != (self.kv.shape[0], self.kv.shape[2], self.kv.shape[3]):
            raise ValueError(
                f"positions shape {tuple(self.positions.shape)} does not match kv {tuple(self.kv.shape)}"
            )

    @property
    def keys(self) -> torch.Tensor:
        return self.kv[:, 0]

    @property
    def values(self) -> torch.Tensor:
        return self.kv[:, 1]

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "ExplicitMemory":
        key = self.retrieval_key.to(device) if self.retrieval_key is not None else None
        return ExplicitMemory(self.kv.to(device=device, dtype=dtype), self.positions.to(device), self.fingerprint, key)
