"""One attention hook for every causal LM of transformers 5: how memories are captured and read.

transformers 5 calls attention through a registry (``AttentionInterface``) with each layer's
query/key/value after RoPE and after the KV cache update, plus ``module.layer_idx``. This module
registers two wrappers, ``memory3_sdpa`` and ``memory3_eager``, each with the mask builder of the
implementation it wraps, so the model builds exactly the mask it always builds. A wrapper looks
for a hook on the attention module; with none it calls the wrapped implementation untouched (bit
for bit the plain model). :func:`attention_hook` installs one hook for a block: the encoder
captures attention with it, the injector reads memories with it. Flash/flex attention are not
wrapped; the eager wrapper calls the model's own ``eager_attention_forward`` when it has one.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import torch
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

HOOK_ATTR = "_memory3_attention_hook"
"""Attribute set on attention modules (those with a ``layer_idx``) while a hook is active."""

WRAPPED_IMPLEMENTATIONS = ("sdpa", "eager")
WRAPPER_PREFIX = "memory3_"

AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
Hook = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
"""hook(base_fn, base_name, module, query, key, value, attention_mask, **kwargs) -> (out, weights)."""


# --------------------------------------------------------------------------- attention plumbing


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def plain_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention for models whose modeling file has no ``eager_attention_forward``."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def base_attention(module: torch.nn.Module, base_name: str) -> AttentionFn:
    """The implementation a wrapper stands in for: registry sdpa, or the model's own eager."""
    if base_name == "sdpa":
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    modeling = sys.modules.get(type(module).__module__)
    return getattr(modeling, "eager_attention_forward", None) or plain_eager_attention


def _make_wrapper(base_name: str) -> AttentionFn:
    def attention(module, query, key, value, attention_mask, **kwargs):
        base_fn = base_attention(module, base_name)
        hook = module.__dict__.get(HOOK_ATTR)
        if hook is None:
            return base_fn(module, query, key, value, attention_mask, **kwargs)
        return hook(base_fn, base_name, module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{WRAPPER_PREFIX}{base_name}_attention"
    return attention


for _base in WRAPPED_IMPLEMENTATIONS:
    AttentionInterface.register(WRAPPER_PREFIX + _base, _make_wrapper(_base))
AttentionMaskInterface.register(WRAPPER_PREFIX + "sdpa", sdpa_mask)
AttentionMaskInterface.register(WRAPPER_PREFIX + "eager", eager_mask)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules the attention registry is called with: those carrying an int ``layer_idx``."""
    return [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]


@contextlib.contextmanager
def attention_hook(model: torch.nn.Module, hook: Hook) -> Iterator[str]:
    """Run ``hook`` in place of the model's attention (sdpa or eager) inside the block.

    Yields the wrapped implementation's name. The model's implementation and its modules are
    restored on exit, also after an exception.
    """
    base_name = model.config._attn_implementation
    if base_name not in WRAPPED_IMPLEMENTATIONS:
        raise ValueError(
            f"memory3 hooks wrap {WRAPPED_IMPLEMENTATIONS} attention; the model uses {base_name!r} "
            "(already hooked, or an unsupported implementation: call model.set_attn_implementation('sdpa'))"
        )
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules with a `layer_idx`")
    model.set_attn_implementation(WRAPPER_PREFIX + base_name)
    for module in modules:
        module.__dict__[HOOK_ATTR] = hook
    try:
        yield base_name
    finally:
        for module in modules:
            module.__dict__.pop(HOOK_ATTR, None)
        model.set_attn_implementation(base_name)


# --------------------------------------------------------------------------- injection
