"""Tests call generation with flat keyword options (mapped here onto the SDK's option groups) and
replay what a generation read (:func:`replay`)."""

from __future__ import annotations

import dataclasses

import torch
from transformers import DynamicCache

from memory3.sdk.memory.codec import decode_memory
from memory3.sdk.memory.injection import MemoryInjector
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


def replay(model, spec, blocking, bank, result) -> torch.Tensor:
    """The logits of every generated token, recomputed from what ``result`` says it read.

    Each segment's memories are fetched from the service by the ids the segment records, set on an
    injector of our own, and the segment's tokens fed to the model with the cache of the segments
    before. A memory switch that is recorded but not read (or read at the wrong positions) shows
    up as a difference from ``result.scores``.
    """
    ids = torch.tensor([result.prompt_ids + result.token_ids])
    stored = {r.external_id: decode_memory(r.memory)
              for r in blocking.fetch(bank, sorted(result.reference_ids), include_memory=True)}
    logits, cache = [], DynamicCache()
    with torch.no_grad(), MemoryInjector(model, spec) as injector:
        for segment in result.segments:
            injector.set_memories([[stored[i] for i in segment.reference_ids]])
            out = model(input_ids=ids[:, segment.start:segment.end], cache=cache, use_cache=True)
            logits.append(out.logits[0].float())
    replayed = torch.cat(logits)
    n = len(result.prompt_ids)
    assert replayed.shape[0] == n + len(result.token_ids) - 1  # every fed position, the last token never fed
    return replayed[n - 1:]
