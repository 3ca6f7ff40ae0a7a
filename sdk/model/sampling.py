"""Decoding helpers every generation loop shares: the nucleus, left padding, one token-by-token loop.

:func:`decode` runs a frozen causal LM over a left-padded batch with a KV cache and explicit
position ids (``attention_mask.cumsum - 1``, what memory injection requires), asking a *chooser*
for each step's tokens: :func:`sample_nucleus` is plain nucleus sampling, the proxy's
accept/reject loop (:mod:`memory3.sdk.proxy.sampling`) is another chooser, so both draw the same
first candidate from the same generator. :func:`left_pad` is the one place batches are padded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 1.0  # > 0
    top_p: float = 0.9  # nucleus mass; 1.0 = the whole vocabulary
    max_rejections: int = 4  # rejected candidates per position before the fallback
    stochastic_proxy: bool = True  # draw accept ~ Bernoulli(p); False: accept iff p >= 0.5

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (use a small one for near-greedy decoding)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.max_rejections < 0 or self.max_new_tokens < 0:
            raise ValueError("max_rejections and max_new_tokens must be >= 0")


# ----------------------------------------------------------------------------- the distribution


def nucleus_distribution(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(..., vocab) logits -> float32 probabilities over the top-p nucleus, renormalised, zero elsewhere.

    The nucleus is the smallest set of most likely tokens whose mass reaches ``top_p`` (the top
    token always belongs to it).
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    probs = probs * keep
    return probs / probs.sum(-1, keepdim=True)


def logit_rank(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Rank of each token among the vocabulary by logit (0 = most likely): (..., V), (...) -> (...)."""
    chosen = logits.gather(-1, tokens[..., None])
    return (logits > chosen).sum(-1)


# ----------------------------------------------------------------------------- the decoding loop

Chooser = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]
"""choose(step, nucleus probs (B, V), logits (B, V), last hidden (B, d) or None, alive (B,)) -> tokens (B,)."""


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask) for a batch of token id lists."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
    for row, seq in enumerate(sequences):
        if len(seq):
            input_ids[row, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
            attention_mask[row, width - len(seq):] = 1
    return input_ids, attention_mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """First real token at 0, as ``generate()`` does (and memory injection requires)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def special_ids(model) -> tuple[int, int | None]:
    config = model.generation_config if getattr(model, "generation_config", None) is not None else model.config
    eos = config.eos_token_id if config.eos_token_id is not None else model.config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    pad = config.pad_token_id if config.pad_token_id is not None else model.config.pad_token_id
    pad = pad if pad is not None else (eos if eos is not None else 0)
    return int(pad), (int(eos) if eos is not None else None)


@torch.no_grad()
def decode(model, prompts: Sequence[Sequence[int]], config: SamplingConfig, choose: Chooser,
           need_hidden: bool = False) -> list[list[int]]:
    """Run the frozen model over a batch of prompts, one ``choose`` per step; response ids per row.

    Responses stop after the model's EOS (kept) or ``max_new_tokens``.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    pad_id, eos_id = special_ids(model)
    input_ids, attention_mask = left_pad(prompts, pad_id, device)
    batch = input_ids.shape[0]
    cache = DynamicCache(config=model.config)
    position_ids = position_ids_from_mask(attention_mask)
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    responses: list[list[int]] = [[] for _ in range(batch)]
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    cache=cache, use_cache=True, output_hidden_states=need_hidden, logits_to_keep=1)
        for step in range(config.max_new_tokens):
            logits = out.logits[:, -1].float()
            hidden = out.hidden_states[-1][:, -1] if need_hidden else None
            probs = nucleus_distribution(logits, config.temperature, config.top_p)
            tokens = choose(step, probs, logits, hidden, alive)
            tokens = torch.where(alive, tokens, torch.full_like(tokens, pad_id))
            for row in alive.nonzero().flatten().tolist():
                responses[row].append(int(tokens[row]))
            if eos_id is not None:
                alive = alive & (tokens != eos_id)
            if not bool(alive.any()) or step + 1 == config.max_new_tokens:
                break
            attention_mask = torch.cat((attention_mask, torch.ones_like(attention_mask[:, :1])), dim=1)
            position_ids = position_ids[:, -1:] + 1
            out = model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=position_ids,
                        cache=cache, use_cache=True, output_hidden_states=need_hidden)
    finally:
        model.train(was_training)
    return responses



def make_generator(device, seed: int | None = None, generator: torch.Generator | None = None) -> torch.Generator:
    """``generator`` as given, else a new one on ``device`` seeded with ``seed`` (random when None)."""
    if generator is None:
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
    return generator


# ----------------------------------------------------------------------------- plain nucleus sampling


def sample_nucleus(model, prompts: Sequence[Sequence[int]], config: SamplingConfig | None = None,
                   seed: int | None = None, generator: torch.Generator | None = None) -> list[list[int]]:
    """Plain nucleus sampling with the frozen model (the proxy-free baseline): response ids per prompt."""
    config = config or SamplingConfig()
    device = next(model.parameters()).device
    generator = make_generator(device, seed, generator)

    def choose(step, probs, logits, hidden, alive):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return decode(model, prompts, config, choose)


@contextmanager
def evaluating(module: torch.nn.Module):
    """``module`` in eval mode for the block, its previous mode restored after (the proxy decides, never trains)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


