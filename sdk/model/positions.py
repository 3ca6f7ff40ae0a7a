"""How a model puts positions into attention, measured from the model itself, layer by layer.

A memory holds keys the model computed for a reference at positions ``0 .. L-1``. Memories read
together share that interval ("parallel positions", Memory3 arXiv 2407.01178): the injector turns
each stored key by :func:`memory_key_shift` positions, once, so it sits just before the context, and
the encoder turns queries and keys back to position 0 to score tokens. Both need each layer's own
rotation, whatever the family. :func:`probe_geometry` measures it instead of reading config names:
it runs the model on random tokens at a few position offsets and, for every layer whose attention
goes through transformers' attention registry, fits how keys move with position — not at all (a
NoPE layer), or rotary pairs in the rotate-half or interleaved layout (complex RoPE is interleaved)
over one block of ``rotary_dim`` dims, one angle per pair. The fit must reproduce the model's own keys
and queries at every offset; a layer that fits neither is refused (:class:`UnsupportedModelError`).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from memory3.core.memory_spec import MemorySpec
from memory3.sdk.model.attention import attention_hook, attention_modules

LAYOUTS = ("none", "half", "interleaved")
"""``none``: keys do not move with position; ``half``: pair ``i`` is dims (i, i + rotary_dim/2)
(transformers' ``rotate_half``); ``interleaved``: pair ``i`` is dims (2i, 2i + 1)."""

PROBE_OFFSETS = (0, 1, 7, 61)
"""Position offsets of the dry runs. Angles are read at offset 1 and sharpened at 7 and 61 (each
step multiplies the angle, so its error shrinks as long as the previous estimate is within pi)."""

PROBE_TOKENS = 24


class UnsupportedModelError(ValueError):
    """The model cannot read memories exactly; the message names the layer and the reason."""


def reference_position_ids(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Position ids of a reference's tokens while it is encoded: ``0 .. length - 1`` (1, length)."""
    return torch.arange(length, device=device, dtype=torch.long).unsqueeze(0)


def memory_key_shift(spec: MemorySpec) -> int:
    """Rotation (in positions) applied to stored memory keys at injection time."""
    return -spec.context_position_offset


def rotate_halves(first: torch.Tensor, second: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn each pair (``first[i]``, ``second[i]``) by the angle whose ``cos``/``sin`` are given.
    The one place the formula lives (:meth:`LayerRotation.rotate`, and PQ codebooks moving keys)."""
    return first * cos - second * sin, second * cos + first * sin


@dataclass(frozen=True)
class LayerRotation:
    """How one attention layer moves its queries and keys with position."""

    layout: str  # one of LAYOUTS
    angles: torch.Tensor  # (rotary_dim / 2,) float64: radians each pair turns per position
    start: int = 0  # first rotated dim (partial rotary: a leading block, or a trailing one as in MLA)

    @property
    def rotary_dim(self) -> int:
        return 2 * self.angles.numel()

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half, start = self.angles.numel(), self.start
        if self.layout == "half":
            return x[..., start : start + half], x[..., start + half : start + 2 * half]
        pairs = x[..., start : start + 2 * half].unflatten(-1, (half, 2))
        return pairs[..., 0], pairs[..., 1]

    def _join(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        if self.layout == "half":
            return torch.cat((first, second), dim=-1)
        return torch.stack((first, second), dim=-1).flatten(-2)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor | int) -> torch.Tensor:
        """``x`` (..., tokens, head_dim) as this layer would hold it ``positions`` further on.

        Computed in float32 (float64 for float64 input), returned in ``x``'s dtype. ``positions``
        broadcasts against ``x.shape[:-1]``; negative positions turn backwards.
        """
        if self.layout == "none":
            return x
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        positions = torch.as_tensor(positions, device=x.device)
        turn = positions.to(compute)[..., None] * self.angles.to(device=x.device, dtype=compute)
        first, second = self._split(x.to(compute))
        out = self._join(*rotate_halves(first, second, turn.cos(), turn.sin())).to(x.dtype)
        before, after = x[..., : self.start], x[..., self.start + self.rotary_dim :]
        if before.shape[-1] or after.shape[-1]:
            return torch.cat((before, out, after), dim=-1)
        return out

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Queries or keys taken back to position 0, float32 (float64 stays float64)."""
        x = x if x.dtype == torch.float64 else x.to(torch.float32)
        return self.rotate(x, -positions)


@dataclass(frozen=True)
class ModelGeometry:
    """What memories look like for one model, read from its attention calls (not its config)."""

    attention_layers: tuple[int, ...]  # layer_idx of every layer whose attention the registry runs
    kv_heads: int
    head_dim: int
    rotations: dict[int, LayerRotation]

    def default_memory_layers(self) -> tuple[int, ...]:
        """The paper's choice: the first half of the attention layers (at least one)."""
        return self.attention_layers[: max(1, len(self.attention_layers) // 2)]

    def codebook_angles(self, layers: tuple[int, ...]) -> torch.Tensor:
        """The RoPE angles a PQ codebook takes as ``key_rope`` (it codes keys at position 0, in the
        rotate-half layout with one set of angles): those of ``layers``, which must share them (each
        layer's measurement differs from another's by ~1e-9 rad; different bases differ by far more)."""
        rotations = [self.rotations[layer] for layer in layers]
        first = rotations[0]
        if any(r.layout != "half" or r.start != 0 or r.angles.shape != first.angles.shape
               or not torch.allclose(r.angles, first.angles, rtol=1e-3, atol=1e-7) for r in rotations):
            raise ValueError("a codebook's key_rope needs one rotate-half rotation shared by every memory "
                             f"layer; these layers have {sorted({r.layout for r in rotations})} rotations "
                             "with different angles: train the codebook without key_rope")
        return torch.stack([r.angles for r in rotations]).mean(0).to(torch.float32)  # each layer measured alike

    def check_spec(self, spec: MemorySpec) -> None:
        """Raise ValueError naming what differs when ``spec`` does not fit this model."""
        if (spec.kv_heads, spec.head_dim) != (self.kv_heads, self.head_dim):
            raise ValueError(f"spec has {spec.kv_heads} kv heads of dim {spec.head_dim}, "
                             f"the model has {self.kv_heads} of dim {self.head_dim}")
        missing = [layer for layer in spec.memory_layers if layer not in self.rotations]
        if missing:
            raise ValueError(f"memory layer(s) {missing} are not attention layers of this model "
                             f"(attention layers: {list(self.attention_layers)})")


def memory_spec_for(model: torch.nn.Module, memory_layers: tuple[int, ...] | None = None,
                    tokens_per_head: int = 8, reference_length: int = 128, codec: str = "int8") -> MemorySpec:
    """The memory spec of a model, from its measured geometry; by default the first half of its
    attention layers (the paper)."""
    geometry = probe_geometry(model)
    layers = geometry.default_memory_layers() if memory_layers is None else tuple(memory_layers)
    spec = MemorySpec(layers, geometry.kv_heads, geometry.head_dim, tokens_per_head, reference_length, codec)
    geometry.check_spec(spec)
    return spec


# --------------------------------------------------------------------------- the probe

_GEOMETRY: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, ModelGeometry]]" = weakref.WeakKeyDictionary()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _pair_angles(first0, second0, first1, second1) -> torch.Tensor:
    """Least-squares angle of the rotation taking each pair from run 0 to run 1 (float64)."""
    sin = (first0 * second1 - second0 * first1).flatten(0, -2).sum(0)
    cos = (first0 * first1 + second0 * second1).flatten(0, -2).sum(0)
    return torch.atan2(sin, cos)


def _fit(keys: dict[int, torch.Tensor], queries: dict[int, torch.Tensor],
         layout: str, start: int, rotary_dim: int) -> tuple[LayerRotation, float]:
    """Fit one layout over dims ``start .. start + rotary_dim``; returns the rotation and its worst error."""
    rotation = LayerRotation(layout, torch.zeros(rotary_dim // 2, dtype=torch.float64), start)
    base_first, base_second = rotation._split(keys[0])
    angles = None
    for offset in PROBE_OFFSETS[1:]:
        measured = _pair_angles(base_first, base_second, *rotation._split(keys[offset]))
        if angles is None:
            angles = measured / offset
        else:  # unwrap: choose the turn count that agrees with the estimate so far
            turns = torch.round((angles * offset - measured) / (2 * math.pi))
            angles = (measured + 2 * math.pi * turns) / offset
    rotation = LayerRotation(layout, angles, start)
    error = 0.0
    for offset in PROBE_OFFSETS[1:]:
        for seen in (keys, queries):
            error = max(error, _relative(rotation.rotate(seen[0], offset), seen[offset]))
    return rotation, error


def _classify(layer: int, keys, queries, values, dtype: torch.dtype) -> LayerRotation:
    """The rotation of one layer from its keys, queries and values at every probe offset."""
    noise = max(_relative(values[o], values[0]) for o in PROBE_OFFSETS[1:])
    floor = {torch.float64: 1e-9, torch.float32: 1e-5}.get(dtype, 3e-2)
    tolerance = max(floor, 20 * noise)
    moved = max(_relative(keys[o], keys[0]) for o in PROBE_OFFSETS[1:])
    if noise > 10 * floor:
        raise UnsupportedModelError(
            f"layer {layer}: its values change with the position offset (by {noise:.2g}): the model "
            "adds absolute positions to its hidden states, so memories cannot sit at shared positions")
    if moved <= tolerance:
        if max(_relative(queries[o], queries[0]) for o in PROBE_OFFSETS[1:]) > tolerance:
            raise UnsupportedModelError(f"layer {layer}: queries move with position but keys do not")
        return LayerRotation("none", torch.zeros(0, dtype=torch.float64))
    dim = keys[0].shape[-1]
    change = (keys[PROBE_OFFSETS[-1]] - keys[0]).abs().flatten(0, -2).amax(0)
    moving = (change > tolerance * keys[0].abs().amax()).nonzero().flatten()
    if not moving.numel():
        raise UnsupportedModelError(f"layer {layer}: its keys drift with position in no dim in particular; "
                                    "that is not a rotation")
    first, last = int(moving.min()), int(moving.max())
    if dim - first < 2:
        raise UnsupportedModelError(f"layer {layer}: only its last dim moves with position; that is not a rotation")
    block = last + 1 - first
    starts = [first] if first % 2 == 0 else [first, first - 1]
    best: tuple[LayerRotation, float] | None = None
    candidates = [(start, size) for start in starts for size in range(block + block % 2, dim - start + 1, 2)]
    for start, rotary_dim in sorted(candidates, key=lambda c: c[1]):
        for layout in ("half", "interleaved"):
            fit = _fit(keys, queries, layout, start, rotary_dim)
            if fit[1] <= tolerance:
                return fit[0]
            if best is None or fit[1] < best[1]:
                best = fit
    raise UnsupportedModelError(
        f"layer {layer}: keys move with position, but not as rotate-half or interleaved rotary pairs "
        f"(best fit: {best[0].layout} over dims {best[0].start}..{best[0].start + best[0].rotary_dim - 1}, "
        f"relative error {best[1]:.2g} > {tolerance:.2g})")


def model_state_key(model: torch.nn.Module) -> tuple:
    """What a measurement of the model depends on besides its class: attention implementation,
    dtype and device (the key of the per-model caches here and in the self-check)."""
    param = next(model.parameters())
    return (model.config._attn_implementation, param.dtype, param.device)


def probe_geometry(model: torch.nn.Module) -> ModelGeometry:
    """Measure a model's memory geometry (cached per model, attention implementation, dtype, device).

    Raises :class:`UnsupportedModelError` for a model whose attention does not go through the
    registry (measured: a class may declare ``_supports_attention_backend = False`` and still call it,
    as StableLM does), whose layers disagree on KV heads or head
    dims, whose keys and values differ in head dim, or whose positions are not a per-layer rotation.
    """
    key = model_state_key(model)
    cached = _GEOMETRY.get(model, {}).get(key)
    if cached is not None:
        return cached
    name = type(model).__name__
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    param = next(model.parameters())
    input_ids = torch.randint(0, vocab, (2, PROBE_TOKENS), generator=generator).to(param.device)
    seen: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    def capture(base_fn, base_name, module, query, key, value, attention_mask, **kwargs):
        seen[offset][module.layer_idx] = (query.detach().double().cpu(), key.detach().double().cpu(),
                                          value.detach().double().cpu())
        return base_fn(module, query, key, value, attention_mask, **kwargs)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), attention_hook(model, capture):
            for offset in PROBE_OFFSETS:
                seen[offset] = {}
                positions = torch.arange(PROBE_TOKENS, device=param.device)[None].expand(2, -1) + offset
                model(input_ids=input_ids, position_ids=positions, use_cache=False)
    finally:
        model.train(was_training)
    layers = tuple(sorted(seen[0]))
    if not layers:
        declared = (" (it declares _supports_attention_backend = False)"
                    if getattr(model, "_supports_attention_backend", True) is False else "")
        raise UnsupportedModelError(
            f"{name} computes attention in its own code, not through transformers' attention registry"
            f"{declared}: none of its {len(attention_modules(model))} attention modules called it during a "
            "forward pass, so memory3 cannot put memories into it")
    shapes = {layer: (seen[0][layer][1].shape[1], seen[0][layer][1].shape[-1], seen[0][layer][2].shape[-1])
              for layer in layers}
    kv_heads, head_dim, value_dim = shapes[layers[0]]
    for layer, shape in shapes.items():
        if shape[1] != shape[2]:
            raise UnsupportedModelError(
                f"layer {layer}: keys have head dim {shape[1]} but values {shape[2]}; a memory stores "
                "keys and values with one head dim (multi-head latent attention is not supported)")
        if shape != (kv_heads, head_dim, value_dim):
            raise UnsupportedModelError(
                f"layer {layer} has {shape[0]} kv heads of dim {shape[1]}, layer {layers[0]} has "
                f"{kv_heads} of dim {head_dim}: a memory needs one shape in every layer")
    rotations = {}
    for layer in layers:
        queries = {o: seen[o][layer][0] for o in PROBE_OFFSETS}
        keys = {o: seen[o][layer][1] for o in PROBE_OFFSETS}
        values = {o: seen[o][layer][2] for o in PROBE_OFFSETS}
        rotations[layer] = _classify(layer, keys, queries, values, param.dtype)
    geometry = ModelGeometry(layers, kv_heads, head_dim, rotations)
    _GEOMETRY.setdefault(model, {})[key] = geometry
    return geometry
