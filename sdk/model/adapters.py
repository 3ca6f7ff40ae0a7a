"""Adapters (peft) on a model that reads memories: memories stay the base model's.

An adapter (``memory3 adapt``, saved in peft's own format) teaches a frozen base model to read
explicit memories. Memories are always the *base's* key/values: the encoder runs with every adapter
disabled (:func:`adapters_disabled`), and a model's fingerprint leaves adapter tensors out and names
wrapped base weights as the base names them, so an adapted model has its base's fingerprint. One bank,
encoded once, then serves the base and every adapter trained on it. An adapter records the base
fingerprint it was trained on (:data:`ADAPTER_METADATA`) and :func:`load_adapter` refuses it on any
other base. peft is imported only when an adapter is loaded; the rest works by duck typing on
peft's tuner layers (a module with ``base_layer`` and ``adapter_layer_names``).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

ADAPTER_METADATA = "memory3_adapter.json"
"""Beside peft's adapter_config.json: base fingerprint, memory spec and training facts."""


class AdapterMismatchError(ValueError):
    """An adapter given to a model other than the base it was trained on (or not an adapter)."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a ``peft.PeftModel`` (tuner layers injected), else ``model``."""
    if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
        return model.get_base_model()
    return model


def tuner_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """peft tuner layers by module name (empty for a model without adapters)."""
    return {name: m for name, m in unwrap(model).named_modules()
            if hasattr(m, "base_layer") and hasattr(m, "adapter_layer_names")}


def has_adapters(model: torch.nn.Module) -> bool:
    return bool(tuner_layers(model))


def base_named_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (named as ``unwrap(model)`` names them) as the base model names them: adapter
    tensors left out, ``x.base_layer.weight`` back to ``x.weight``."""
    layers = tuner_layers(model)
    if not layers:
        return tensors
    out = {}
    for name, tensor in tensors.items():
        owner = next((prefix for prefix in layers if name.startswith(prefix + ".")), None)
        if owner is None:
            out[name] = tensor
        elif name.startswith(owner + ".base_layer."):
            out[owner + "." + name[len(owner) + len(".base_layer.") :]] = tensor
    return out


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Inside: the model computes as its base (every tuner layer bypassed); restored after."""
    layers = [m for m in tuner_layers(model).values() if not m.disable_adapters]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def read_adapter_metadata(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / ADAPTER_METADATA
    if not (Path(adapter_dir) / "adapter_config.json").is_file() or not path.is_file():
        raise AdapterMismatchError(f"{str(adapter_dir)!r} is not a memory3 adapter (no adapter_config.json "
                                   f"or {ADAPTER_METADATA}): give a directory written by `memory3 adapt`")
    return json.loads(path.read_text())


def save_adapter(peft_model: torch.nn.Module, directory: str | Path, base_fingerprint: str, spec_dict: dict,
                 **facts) -> Path:
    """peft's own files (``PeftModel.from_pretrained`` loads them without memory3) plus
    :data:`ADAPTER_METADATA`: the base fingerprint it is bound to, the memory spec, ``facts``."""
    directory = Path(directory)
    peft_model.save_pretrained(str(directory))
    meta = {"base_fingerprint": base_fingerprint, "memory_spec": spec_dict, **facts}
    (directory / ADAPTER_METADATA).write_text(json.dumps(meta, indent=2))
    return directory


def load_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """``model`` with the adapter in ``adapter_dir`` injected (peft), after checking it was trained
    on exactly this base. Returns the transformers model (same class, adapter active), whose
    fingerprint is the base's, so the base's banks and memories serve it unchanged. An adapter
    trained to also encode (``memories: adapted``) comes back merged into the weights instead: a
    new model with its own fingerprint, whose bank must be encoded by it."""
    from peft import PeftModel

    from .fingerprint import forget_fingerprint, model_fingerprint

    meta = read_adapter_metadata(adapter_dir)
    if has_adapters(model):
        raise AdapterMismatchError("the model already carries an adapter; load the base model again")
    fingerprint = model_fingerprint(model)
    if meta.get("base_fingerprint") != fingerprint:
        raise AdapterMismatchError(
            f"adapter {str(adapter_dir)!r} was trained on base model {str(meta.get('base_fingerprint'))[:16]}…, "
            f"this model is {fingerprint[:16]}…: load the base it was trained on (its fingerprint pins it)")
    adapted = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    if meta.get("memories") == "adapted":  # it also encodes: a new model, whose own bank it needs
        merged = adapted.merge_and_unload()
        forget_fingerprint(merged)  # the merge writes through .data: the cached fingerprint would survive it
        return merged
    return adapted.get_base_model()
