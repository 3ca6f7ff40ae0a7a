"""Running a half-precision model in float32 for a while, its weights given back bit for bit.

The encoder picks which tokens of a reference a memory keeps by the attention they receive; run in
bfloat16 that choice differs from float32 in a tenth of the slots and moves what the memory does by
more than half its effect (docs/design.md, "Any Hugging Face model"). :func:`float32_compute` casts
every bfloat16/float16 parameter and buffer to float32 inside the block and puts the very same
tensors back after, so the model is unchanged (same values, storage and fingerprint). The cost is a
float32 copy of the weights while the block runs; nothing is done for a float32 model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def float32_compute(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block ``model`` computes in float32; on exit its own tensors are restored."""
    originals = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.dtype in HALF_DTYPES and id(tensor) not in originals:
            originals[id(tensor)] = (tensor, tensor.data)
    try:
        for tensor, data in originals.values():
            tensor.data = data.to(torch.float32)
        yield
    finally:
        for tensor, data in originals.values():
            tensor.data = data
