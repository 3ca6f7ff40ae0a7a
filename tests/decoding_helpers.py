"""Tests call generation with flat keyword options; this maps them onto the SDK's option groups."""

from __future__ import annotations

import dataclasses

from memory3.sdk.generation import DecodingOptions, MemoryOptions, ProxyOptions, generate

_DECODING = {f.name for f in dataclasses.fields(DecodingOptions)}
_MEMORY = {f.name for f in dataclasses.fields(MemoryOptions)} - {"supply", "bank"}
_PROXY = {"max_rejections": "max_rejections", "stochastic_proxy": "stochastic", "reward": "reward",
          "trajectory_logger": "trajectory_logger"}


def option_groups(supply=None, bank=None, proxy=None, **flat):
    """(memory, decoding, proxy) option groups from flat keywords."""
    unknown = set(flat) - _DECODING - _MEMORY - set(_PROXY)
    if unknown:
        raise TypeError(f"unknown generation options {sorted(unknown)}")
    decoding = DecodingOptions(**{k: v for k, v in flat.items() if k in _DECODING})
    memory = None
    if supply is not None:
        memory = MemoryOptions(supply, bank, **{k: v for k, v in flat.items() if k in _MEMORY})
    guidance = None
    if proxy is not None:
        guidance = ProxyOptions(proxy, **{_PROXY[k]: v for k, v in flat.items() if k in _PROXY})
    return memory, decoding, guidance


def generate_flat(model, tokenizer, prompts, mode="memory", supply=None, bank=None, proxy=None, **flat):
    memory, decoding, guidance = option_groups(supply, bank, proxy, **flat)
    return generate(model, tokenizer, prompts, mode=mode, memory=memory, decoding=decoding, proxy=guidance)
