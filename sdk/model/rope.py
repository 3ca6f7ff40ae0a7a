"""Rotary position embedding (RoPE) as the model defines it, and the parallel-positions convention.

The encoder undoes RoPE to score tokens and the injector moves stored memory keys; both use
:class:`Rotary`, whose frequencies come from the model's own rotary module (so frequency-only variants
such as linear, llama3 or yarn scaling come for free), in the ``rotate_half`` layout. This is the one
place the parallel-positions convention (Memory3, arXiv 2407.01178) lives: a reference is encoded alone
at positions ``0 .. reference_length - 1`` (:func:`reference_position_ids`); memories read together
share that interval, and instead of shifting the context the injector rotates each memory key once by
:func:`memory_key_shift`, which works with ``generate()`` and any KV cache.

Details: docs/design.md ("Parallel positions").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memory3.core.memory_spec import MemorySpec


def reference_position_ids(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Position ids of a reference's tokens while it is encoded: ``0 .. length - 1`` (1, length)."""
    return torch.arange(length, device=device, dtype=torch.long).unsqueeze(0)


def memory_key_shift(spec: MemorySpec) -> int:
    """Rotation (in positions) applied to stored memory keys at injection time."""
    return -spec.context_position_offset


def find_rotary_embedding(model: torch.nn.Module) -> torch.nn.Module:
    """The model's rotary embedding module: the first submodule with an ``inv_freq`` buffer."""
    for module in model.modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            return module
    raise ValueError(f"{type(model).__name__} has no rotary embedding module (no `inv_freq` buffer); RoPE is required")


def rotate_halves(first: torch.Tensor, second: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoPE rotation in the ``rotate_half`` layout: rotary dims split in a first and a second
    half, pair ``i`` of the two turned by the angle whose ``cos``/``sin`` are given (``(..., half)``).
    The one place the formula lives (:meth:`Rotary.rotate`, and PQ codebooks moving keys)."""
    return first * cos - second * sin, second * cos + first * sin


@dataclass(frozen=True)
class Rotary:
    """RoPE frequencies of one model; rotates ``(..., tokens, head_dim)`` tensors by positions."""

    inv_freq: torch.Tensor  # (rotary_dim / 2,) float32
    attention_scaling: float = 1.0

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "Rotary":
        module = find_rotary_embedding(model)
        inv_freq = module.inv_freq.detach().to(torch.float32).clone()
        return cls(inv_freq, float(getattr(module, "attention_scaling", 1.0) or 1.0))

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    def rotate(self, x: torch.Tensor, positions: torch.Tensor | int) -> torch.Tensor:
        """Apply the rotation R(positions) to ``x`` (no attention scaling), in float32 (float64 for float64).

        ``positions`` broadcasts against ``x.shape[:-1]`` (an int rotates every vector alike);
        negative positions rotate backwards, so ``rotate(rotate(x, p), -p) == x``.
        """
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        positions = torch.as_tensor(positions, device=x.device)
        freqs = positions.to(compute)[..., None] * self.inv_freq.to(device=x.device, dtype=compute)
        half = self.inv_freq.numel()
        rot, rest = x[..., : 2 * half].to(compute), x[..., 2 * half :]
        out = torch.cat(rotate_halves(rot[..., :half], rot[..., half:], freqs.cos(), freqs.sin()), dim=-1).to(x.dtype)
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Undo the model's RoPE (rotation and its attention scaling): pre-RoPE vectors, float32."""
        x32 = self.rotate(x.to(torch.float32), -positions)
        if self.attention_scaling != 1.0:
            x32 = torch.cat(
                (x32[..., : self.rotary_dim] / self.attention_scaling, x32[..., self.rotary_dim :]), dim=-1
            )
        return x32
