"""Model fingerprint: which model (config + weights) a memory belongs to.

Explicit memories are the model's own key/values, so a memory, bank, codebook or proxy made with
other weights must be refused. :func:`model_fingerprint` is a SHA-256 over the config as sorted JSON
(without fields that do not change what the model computes) and every parameter and buffer in name
order (name, dtype, shape, bytes). It is cached per model object and recomputed only when the config
text, a tensor's version counter (in-place writes) or its storage pointer (``.data`` re-assigned, the
model moved) changes. Adapters do not count: an adapted model has its base's fingerprint, since
its memories are the base's (:mod:`memory3.sdk.model.adapters`).

Details: docs/design.md ("Fingerprints").
"""

from __future__ import annotations

import hashlib
import json
import weakref

import torch

from .adapters import base_named_tensors, unwrap

VOLATILE_CONFIG_FIELDS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "_attn_implementation",
        "_attn_implementation_internal",
        "_commit_hash",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "torchscript",
    }
)
"""Config keys left out of the fingerprint: they name or steer a run, not the function computed."""

_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def _named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and buffers (persistent or not), each once, sorted by name; of a model carrying
    peft adapters, the base's tensors under the base's names (:mod:`memory3.sdk.model.adapters`)."""
    inner = unwrap(model)
    seen: dict[str, torch.Tensor] = {}
    for name, tensor in inner.named_parameters(remove_duplicate=False):
        seen[name] = tensor
    for name, tensor in inner.named_buffers(remove_duplicate=False):
        seen[name] = tensor
    return sorted(base_named_tensors(inner, seen).items())


def _state_key(tensors: list[tuple[str, torch.Tensor]]) -> tuple:
    return tuple((name, t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for name, t in tensors)


def config_digest_text(config, model: torch.nn.Module | None = None) -> str:
    """The config as canonical JSON (sorted keys, volatile fields removed).

    With ``model``: ``architectures`` and ``dtype``, when unset, are filled in as
    ``save_pretrained`` writes them, so a model built in memory and the same model saved and loaded
    back have one fingerprint (and loaded models keep the fingerprint they always had).
    """
    data = json.loads(config.to_json_string(use_diff=False))
    for key in VOLATILE_CONFIG_FIELDS:
        data.pop(key, None)
    if model is not None:
        if not data.get("architectures"):
            data["architectures"] = [type(model).__name__]
        if data.get("dtype") is None:
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
            data["dtype"] = str(dtype).removeprefix("torch.") if dtype is not None else None
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def forget_fingerprint(model: torch.nn.Module) -> None:
    """Drop the cached fingerprint: for weights rewritten where the cache key cannot see it
    (through ``.data``, as peft's merge does, which keeps storage and version counters)."""
    _CACHE.pop(model, None)


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hex SHA-256 of a model's config and weights; cached until the config or a tensor changes."""
    tensors = _named_tensors(model)
    config = getattr(unwrap(model), "config", None)
    config_text = config_digest_text(config, unwrap(model)) if config is not None else "null"
    key = (config_text, _state_key(tensors))
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]

    digest = hashlib.sha256()
    digest.update(b"config\0")
    digest.update(config_text.encode())
    with torch.no_grad():
        for name, tensor in tensors:
            digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
            flat = tensor.detach().contiguous().reshape(-1)
            if flat.numel():
                digest.update(flat.view(torch.uint8).cpu().numpy().tobytes())
    hexdigest = digest.hexdigest()
    _CACHE[model] = (key, hexdigest)
    return hexdigest
