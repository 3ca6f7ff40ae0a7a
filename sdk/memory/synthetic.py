"""Structured synthetic key/values for codec tests and benchmarks when no model is at hand.

Random Gaussian data neither compresses nor quantizes like real KV. This recipe imitates what
matters: low-rank structure, heavy-tailed (Laplace) coefficients, a few outlier channels in the
keys, and RoPE applied to keys at their positions inside a reference.
"""

from __future__ import annotations

import math

import torch

from memory3.sdk.memory.tensors import ExplicitMemory


class SyntheticKV:
    """KV-like memories of one pretend model: low-rank + outlier channels + RoPE."""

    def __init__(self, layers, heads, tokens, dim, rank=6, outliers=2, ref_len=128, seed=0, fingerprint="ab12" * 16):
        g = torch.Generator().manual_seed(seed)
        self.shape = (layers, heads, tokens, dim)
        self.ref_len, self.fingerprint = ref_len, fingerprint
        self.basis = torch.randn(layers, 2, heads, rank, dim, generator=g) / math.sqrt(rank)
        self.bias = torch.randn(layers, 2, heads, 1, dim, generator=g) * 0.3
        self.gain = torch.ones(layers, 2, heads, 1, dim)
        for layer in range(layers):
            for head in range(heads):
                ch = torch.randperm(dim // 2, generator=g)[:outliers]
                self.gain[layer, 0, head, 0, ch] = 6.0
                self.gain[layer, 0, head, 0, ch + dim // 2] = 6.0
        self.inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        self.gen = torch.Generator().manual_seed(seed + 1)

    def sample(self) -> ExplicitMemory:
        layers, heads, tokens, dim = self.shape
        g = self.gen
        coef = -torch.log(torch.rand(layers, 2, heads, tokens, self.basis.shape[3], generator=g))
        coef = coef * (torch.randint(0, 2, coef.shape, generator=g) * 2 - 1)  # Laplace(0, 1)
        kv = torch.einsum("lshtr,lshrd->lshtd", coef, self.basis)
        kv = (kv + self.bias + 0.1 * torch.randn(layers, 2, heads, tokens, dim, generator=g)) * self.gain
        pos = torch.stack(
            [torch.randperm(self.ref_len - 4, generator=g)[:tokens] + 4 for _ in range(layers * heads)]
        ).reshape(layers, heads, tokens)
        ang = pos[..., None].float() * self.inv_freq
        cos, sin = ang.cos().repeat(1, 1, 1, 2), ang.sin().repeat(1, 1, 1, 2)
        k = kv[:, 0]
        kv[:, 0] = k * cos + torch.cat([-k[..., dim // 2 :], k[..., : dim // 2]], -1) * sin
        return ExplicitMemory(kv, pos.long(), self.fingerprint)
