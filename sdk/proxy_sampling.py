"""Stable proxy sampling (Proxy-RLHF, arXiv 2403.04283): the LLM proposes, the proxy disposes.

Each step, for every unfinished row:

1. the frozen LLM gives its next-token distribution; temperature, then the top-p *nucleus*
   (:func:`nucleus_distribution`), renormalised — candidates only ever come from the nucleus, so
   the answer stays inside what the LLM considers plausible;
2. a candidate is sampled from it and the proxy is asked p(accept | hidden state, candidate);
   a coin with that probability decides (``SamplingConfig.stochastic_proxy``; else accept iff
   p >= 0.5);
3. on reject the candidate is masked, the rest renormalised and a new candidate sampled;
4. after ``max_rejections`` rejections the best remaining candidate (highest LLM probability
   among the unrejected nucleus tokens) is taken without asking. If the whole nucleus was
   rejected before the cap, the nucleus's top token is taken: the fallback never leaves the
   nucleus. A fallback leaves no Decision — the proxy did not decide it — so a position whose
   decisions are all rejections was filled by the fallback.

Every verdict becomes a :class:`~memory3.sdk.trajectory.Decision`: ``llm_prob`` is the candidate's
probability in the *original* nucleus distribution of that step (what the LLM believed, not the
renormalised leftovers), ``rank`` its rank among all tokens by the LLM's logit (0 = most likely,
ties share the better rank), ``p_accept`` the behaviour proxy's probability — the trainer's
importance ratios need exactly that.

Determinism: two generators. ``generator`` draws the candidates, ``proxy_generator`` the accept
coins. The first candidate of a step is drawn for the whole batch in one ``torch.multinomial``
call — the same call :func:`sample_nucleus` makes — so with an always-accept proxy (which never
rejects) proxy sampling is token-for-token plain nucleus sampling with the same seed. Both run
through one decoding loop (:func:`decode`); only the token chooser differs.

The accept/reject procedure is one per-step callable (:class:`ProxyChooser`, made by
:func:`make_proxy_chooser`) and episodes are assembled by :func:`make_episodes`, so any other
decoding loop — :func:`memory3.sdk.decoding.generate`, which retrieves memories every 64 tokens —
runs the very same procedure and logs the very same records instead of re-implementing them.

Memory injection: :func:`decode` is a plain forward loop with a KV cache and explicit position ids
(``attention_mask.cumsum - 1``, what :class:`~memory3.sdk.injection.MemoryInjector` requires for a
left-padded batch), so it runs unchanged while an injector with memories is active on the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .fingerprint import model_fingerprint
from .proxy import ProxyPolicy
from .trajectory import Decision, Episode

PROXY_SEED_OFFSET = 0x5EED
"""``proxy_generator`` defaults to seed + this, so coins never share a stream with candidates."""


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


def _special_ids(model) -> tuple[int, int | None]:
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
    pad_id, eos_id = _special_ids(model)
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


def _generators(device, seed: int | None, generator, proxy_generator):
    if generator is None:
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
    if proxy_generator is None:
        proxy_generator = torch.Generator(device=device)
        proxy_generator.manual_seed((seed if seed is not None else generator.initial_seed()) + PROXY_SEED_OFFSET)
    return generator, proxy_generator


# ----------------------------------------------------------------------------- plain nucleus sampling


def sample_nucleus(model, prompts: Sequence[Sequence[int]], config: SamplingConfig | None = None,
                   seed: int | None = None, generator: torch.Generator | None = None) -> list[list[int]]:
    """Plain nucleus sampling with the frozen model (the proxy-free baseline): response ids per prompt."""
    config = config or SamplingConfig()
    device = next(model.parameters()).device
    generator, _ = _generators(device, seed, generator, None)

    def choose(step, probs, logits, hidden, alive):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return decode(model, prompts, config, choose)


# ----------------------------------------------------------------------------- proxy sampling


class ProxyChooser:
    """The accept/reject loop of one decoding run, one call per step (a :data:`Chooser`);
    collects the decisions per row in ``decisions``.

    Public so that other decoding loops (memory-augmented decoding) reuse it rather than copy
    it; make one with :func:`make_proxy_chooser`, which also seeds and checks.
    """

    def __init__(self, model, proxy: ProxyPolicy, config: SamplingConfig, generator, proxy_generator, batch: int):
        self.embeddings = model.get_input_embeddings()
        self.proxy = proxy
        self.config = config
        self.generator = generator
        self.proxy_generator = proxy_generator
        self.decisions: list[list[Decision]] = [[] for _ in range(batch)]

    def __call__(self, step, probs, logits, hidden, alive):
        cfg = self.config
        candidates = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)  # as sample_nucleus
        chosen = candidates.clone()
        remaining = probs.clone()
        ranks = logit_rank(logits, candidates)
        rows = alive.nonzero().flatten()  # rows still waiting for a verdict
        for rejections in range(cfg.max_rejections):
            if rows.numel() == 0:
                break
            if rejections > 0:
                candidates[rows] = torch.multinomial(remaining[rows], 1, generator=self.generator).squeeze(1)
                ranks[rows] = logit_rank(logits[rows], candidates[rows])
            row_candidates = candidates[rows]
            p_accept = self.proxy.p_accept(hidden[rows], self.embeddings(row_candidates))
            if cfg.stochastic_proxy:
                coins = torch.rand(rows.shape[0], generator=self.proxy_generator, device=p_accept.device)
                accepted = coins < p_accept
            else:
                accepted = p_accept >= 0.5
            llm_probs = probs[rows, row_candidates]
            for i, row in enumerate(rows.tolist()):
                self.decisions[row].append(Decision(
                    position=step, candidate_token=int(row_candidates[i]), llm_prob=float(llm_probs[i]),
                    rank=int(ranks[row]), p_accept=float(p_accept[i]), accepted=bool(accepted[i]),
                    rejections=rejections,
                ))
            chosen[rows[accepted]] = row_candidates[accepted]
            rows = rows[~accepted]
            remaining[rows, candidates[rows]] = 0.0
            mass = remaining[rows].sum(-1, keepdim=True)
            remaining[rows] = remaining[rows] / mass.clamp(min=torch.finfo(mass.dtype).tiny)
            # A row whose whole nucleus is rejected stays in ``rows``: the fallback below takes it.
            if not bool((mass > 0).all()):
                stuck = rows[mass.squeeze(-1) <= 0]
                chosen[stuck] = probs[stuck].argmax(-1)
                rows = rows[mass.squeeze(-1) > 0]
        if rows.numel():  # the cap was reached (or max_rejections == 0): best remaining candidate
            chosen[rows] = remaining[rows].argmax(-1)
        return chosen


def make_proxy_chooser(model, proxy: ProxyPolicy, config: SamplingConfig, batch: int, *, seed: int | None = None,
                       generator: torch.Generator | None = None,
                       proxy_generator: torch.Generator | None = None) -> ProxyChooser:
    """A :class:`ProxyChooser` for ``batch`` rows of ``model``, seeded as :func:`sample_with_proxy` seeds.

    Refuses a proxy trained for another model (:meth:`ProxyPolicy.check_model`). Pass the
    decoding loop's own candidate ``generator`` so that an always-accept proxy draws exactly
    what that loop's plain sampler would draw; the accept coins get their own stream.
    """
    generator, proxy_generator = _generators(next(model.parameters()).device, seed, generator, proxy_generator)
    proxy.check_model(model)
    return ProxyChooser(model, proxy, config, generator, proxy_generator, batch)


def make_episodes(model, proxy: ProxyPolicy, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                  decisions: Sequence[list[Decision]], bank: str = "", reward=None, tokenizer=None) -> list[Episode]:
    """One :class:`Episode` per row (what the sampler leaves behind), scored by ``reward`` if given."""
    fingerprint = model_fingerprint(model)
    episodes = [
        Episode(prompt_ids=list(map(int, p)), response_ids=list(r), decisions=d, model_fingerprint=fingerprint,
                proxy_version=proxy.version, bank=bank)
        for p, r, d in zip(prompts, responses, decisions)
    ]
    if reward is not None:
        from .reward import score_episodes

        score_episodes(reward, episodes, tokenizer)
    return episodes


def sample_with_proxy(
    model,
    proxy: ProxyPolicy,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    proxy_generator: torch.Generator | None = None,
    bank: str = "",
    reward=None,
    tokenizer=None,
) -> list[Episode]:
    """Proxy-guided sampling from the frozen ``model``: one :class:`Episode` per prompt.

    ``reward`` (a :class:`memory3.sdk.reward.Reward`, optional) scores each response at episode
    end into ``episode.rewards[reward.name]``; text rewards need ``tokenizer``.
    """
    config = config or SamplingConfig()
    chooser = make_proxy_chooser(model, proxy, config, len(prompts), seed=seed, generator=generator,
                                 proxy_generator=proxy_generator)
    with evaluating(proxy):
        responses = decode(model, prompts, config, chooser, need_hidden=True)
    return make_episodes(model, proxy, prompts, responses, chooser.decisions, bank, reward, tokenizer)


@contextmanager
def evaluating(module: torch.nn.Module):
    """``module`` in eval mode for the block, its previous mode restored after (the proxy decides, never trains)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


# ----------------------------------------------------------------------------- replay / features


@dataclass
class StepFeatures:
    """What the frozen LLM saw before each response token of one episode."""

    hidden: torch.Tensor  # (response length, hidden size): last hidden state before token t
    logits: torch.Tensor  # (response length, vocab) float32: next-token logits before token t


@torch.no_grad()
def step_features(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                  batch_size: int = 16) -> list[StepFeatures]:
    """Recompute, with one full forward per batch, the states the sampler decided in.

    This is how the offline trainer gets hidden states without logging them, and how tests
    replay logged decisions. Memory injection, if active on the model, applies here too.
    """
    device = next(model.parameters()).device
    pad_id, _ = _special_ids(model)
    out: list[StepFeatures] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            rows = list(zip(prompts[start:start + batch_size], responses[start:start + batch_size]))
            # The last response token is never an input: nothing is decided after it.
            input_ids, attention_mask = left_pad([list(p) + list(r)[:-1] for p, r in rows], pad_id, device)
            result = model(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids_from_mask(attention_mask), output_hidden_states=True)
            hidden_all, logits_all = result.hidden_states[-1], result.logits
            width = input_ids.shape[1]
            for b, (prompt, response) in enumerate(rows):
                n = len(response)
                first = width - n  # the position holding the last prompt token
                out.append(StepFeatures(hidden=hidden_all[b, first:first + n].clone(),
                                        logits=logits_all[b, first:first + n].float().clone()))
    finally:
        model.train(was_training)
    return out


def replay_decisions(model, episode: Episode, config: SamplingConfig) -> list[tuple[float, int]]:
    """(llm_prob, rank) of each logged decision, recomputed with the frozen model."""
    features = step_features(model, [episode.prompt_ids], [episode.response_ids])[0]
    probs = nucleus_distribution(features.logits, config.temperature, config.top_p)
    out = []
    for d in episode.decisions:
        token = torch.tensor(d.candidate_token)
        out.append((float(probs[d.position, token]), int(logit_rank(features.logits[d.position], token))))
    return out
