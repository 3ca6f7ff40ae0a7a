"""The memory spec: which layers keep memory, and the shape of one reference's memory.

One place for the conventions that the encoder, the codec, the injection path and the service
must agree on (Memory3, arXiv 2407.01178):

* a memory tensor has shape ``(memory layers, 2 [K, V], kv heads, tokens per head, head dim)``;
* a reference (reference marker included) occupies positions ``0 .. reference_length - 1``;
  all memories read together share that one interval ("parallel positions"), so the context's
  positions start at ``reference_length`` (:attr:`MemorySpec.context_position_offset`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

REFERENCE_MARKER = "Reference:"
"""Text put in front of every reference (after BOS) before the model encodes it."""

SPEC_FILENAME = "memory_spec.json"


@dataclass(frozen=True)
class MemorySpec:
    memory_layers: tuple[int, ...]
    kv_heads: int
    head_dim: int
    tokens_per_head: int = 8
    reference_length: int = 128
    codec: str = "int8"

    def __post_init__(self) -> None:
        object.__setattr__(self, "memory_layers", tuple(int(i) for i in self.memory_layers))
        if not self.memory_layers:
            raise ValueError("memory spec needs at least one memory layer")
        if len(set(self.memory_layers)) != len(self.memory_layers) or min(self.memory_layers) < 0:
            raise ValueError(f"memory layers must be distinct and >= 0, got {self.memory_layers}")
        for name in ("kv_heads", "head_dim", "tokens_per_head", "reference_length"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.tokens_per_head > self.reference_length:
            raise ValueError("tokens_per_head cannot exceed reference_length")

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one reference's memory: (layers, K/V, kv heads, tokens, head dim)."""
        return (len(self.memory_layers), 2, self.kv_heads, self.tokens_per_head, self.head_dim)

    def dense_kv_bytes(self, num_layers: int, bytes_per_value: int = 2) -> int:
        """Bytes of the dense K/V of one whole reference in every layer and KV head (bf16 by
        default): the baseline the paper's storage ratios are measured against."""
        return num_layers * 2 * self.kv_heads * self.reference_length * self.head_dim * bytes_per_value

    @property
    def context_position_offset(self) -> int:
        """First position id of the context: memories own positions [0, reference_length)."""
        return self.reference_length

    def layer_slot(self, layer_idx: int) -> int | None:
        """Index of a model layer inside the memory tensor, or None if it keeps no memory."""
        try:
            return self.memory_layers.index(layer_idx)
        except ValueError:
            return None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["memory_layers"] = list(self.memory_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "MemorySpec":
        return cls(**{**data, "memory_layers": tuple(data["memory_layers"])})

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SPEC_FILENAME
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "MemorySpec":
        return cls.from_dict(json.loads((Path(directory) / SPEC_FILENAME).read_text()))
