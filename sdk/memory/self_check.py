"""The one-time check that a model reads memories exactly, run when an encoder or injector is built.

What memory3 promises for a model it accepts: a memory holding every token of a text, in every
attention layer, reads like that text placed before the context, and no memories at all compute
bit for bit what the plain model computes. :func:`require_exact_reading` checks both on a few random
tokens through the real :class:`~memory3.sdk.memory.injection.MemoryInjector`, layer by layer, so a
model whose attention never reaches the hook, or whose positions do not fit the measured rotation,
is refused with the first layer that disagrees — never read silently wrong. The tolerance is a
fraction of the memory's own effect (:data:`TOLERANCE`). Results are cached per model object,
attention implementation, dtype and device; a check costs three short forwards.
"""

from __future__ import annotations

import weakref

import torch

from memory3.core.memory_spec import MemorySpec
from memory3.sdk.memory.tensors import ExplicitMemory
from memory3.sdk.model.attention import attention_hook, attention_modules
from memory3.sdk.model.positions import UnsupportedModelError, model_state_key, probe_geometry

REFERENCE_TOKENS = 6
CONTEXT_TOKENS = 5

TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3}
"""Largest accepted difference between reading a memory and reading the prefix, as a fraction of
what the prefix changes (per layer's attention output, and in the logits); other dtypes: 0.25 (the
rounding of a whole bfloat16 forward reaches 0.12 of it on the model zoo)."""

_CHECKED: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, str | None]]" = weakref.WeakKeyDictionary()


def require_exact_reading(model: torch.nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model`` reads memories exactly (cached)."""
    key = model_state_key(model)
    results = _CHECKED.setdefault(model, {})
    if key not in results:
        try:
            _check(model)
            results[key] = None
        except UnsupportedModelError as error:
            results[key] = str(error)
    if results[key] is not None:
        raise UnsupportedModelError(results[key])


def _attention_outputs(model: torch.nn.Module, layers: tuple[int, ...]):
    """Forward hooks recording each attention layer's output; returns (dict, handles)."""
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for module in attention_modules(model):
        if module.layer_idx in layers:
            def record(mod, args, output, layer=module.layer_idx):
                outputs[layer] = (output[0] if isinstance(output, tuple) else output).detach().double()
            handles.append(module.register_forward_hook(record))
    return outputs, handles


def _run(model, input_ids, layers):
    outputs, handles = _attention_outputs(model, layers)
    try:
        logits = model(input_ids=input_ids, use_cache=False).logits.detach().double()
    finally:
        for handle in handles:
            handle.remove()
    return logits, outputs


def _check(model: torch.nn.Module) -> None:
    from memory3.sdk.memory.injection import MemoryInjector  # the injector runs this check when built

    geometry = probe_geometry(model)
    layers = geometry.attention_layers
    spec = MemorySpec(layers, geometry.kv_heads, geometry.head_dim, REFERENCE_TOKENS, REFERENCE_TOKENS)
    param = next(model.parameters())
    tolerance = TOLERANCE.get(param.dtype, 0.25)
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(1)
    reference = torch.randint(0, vocab, (2, REFERENCE_TOKENS), generator=generator).to(param.device)
    context = torch.randint(0, vocab, (2, CONTEXT_TOKENS), generator=generator).to(param.device)
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(base_fn, base_name, module, query, key, value, attention_mask, **kwargs):
        captured[module.layer_idx] = (key.detach(), value.detach())
        return base_fn(module, query, key, value, attention_mask, **kwargs)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            with attention_hook(model, capture):
                model(input_ids=reference, use_cache=False)
            positions = torch.arange(REFERENCE_TOKENS).expand(len(layers), geometry.kv_heads, -1)
            memories = [[ExplicitMemory(torch.stack([torch.stack((captured[i][0][b], captured[i][1][b]))
                                                     for i in layers]), positions, "self-check")]
                        for b in range(2)]
            plain_logits, plain = _run(model, context, layers)
            prefix_logits, prefix = _run(model, torch.cat((reference, context), dim=1), layers)
            injector = MemoryInjector(model, spec, verify_fingerprint=False, self_check=False)
            with injector:
                empty_logits, _ = _run(model, context, layers)
                injector.set_memories(memories)
                read_logits, read = _run(model, context, layers)
    finally:
        model.train(was_training)
    name = type(model).__name__
    if not torch.equal(empty_logits, plain_logits):
        raise UnsupportedModelError(
            f"{name}: with memory3's attention hook and no memories the logits differ from the plain "
            f"model's (by {float((empty_logits - plain_logits).abs().max()):.2g})")
    for layer in layers:
        want, got = prefix[layer][:, REFERENCE_TOKENS:], read[layer]
        effect = float((want - plain[layer]).norm())
        if torch.equal(got, plain[layer]):
            raise UnsupportedModelError(
                f"{name} layer {layer}: a memory changed nothing in this layer: its attention does not "
                "reach memory3's hook")
        error = float((got - want).norm()) / max(effect, 1e-30)
        if error > tolerance:
            raise UnsupportedModelError(
                f"{name} layer {layer}: a memory of every token reads differently from the same tokens "
                f"as a prefix (difference {error:.2g} of the memory's effect, tolerance {tolerance:g}; "
                f"positions measured as {geometry.rotations[layer].layout} rotation)")
    effect = float((prefix_logits[:, REFERENCE_TOKENS:] - plain_logits).norm())
    error = float((read_logits - prefix_logits[:, REFERENCE_TOKENS:]).norm()) / max(effect, 1e-30)
    if error > tolerance:
        raise UnsupportedModelError(
            f"{name}: logits with a memory of every token differ from logits with the prefix "
            f"(difference {error:.2g} of the memory's effect, tolerance {tolerance:g})")
