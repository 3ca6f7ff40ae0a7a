"""Stable proxy sampling (Proxy-RLHF, arXiv 2403.04283): the LLM proposes, the proxy disposes.

Each step a candidate is drawn from the frozen LLM's top-p nucleus and the proxy accepts or rejects
it; a rejected candidate is masked and another drawn, and after ``max_rejections`` the best remaining
one is taken, so the answer never leaves the nucleus. Every verdict becomes a
:class:`~memory3.core.episodes.Decision` holding what the trainer's importance ratios need. Candidates
and accept coins use separate generators, so an always-accept proxy reproduces plain nucleus sampling
token for token. :class:`ProxyChooser` and :func:`make_episodes` are the whole procedure, so
:func:`memory3.sdk.generation.generate` runs it unchanged under its memory schedule. Given the
tokenizer, :func:`make_episodes` also keeps each episode's prompt and response decoded (what the
Parquet export's ``prompt`` / ``completion`` columns carry).

Details: docs/design.md ("Stable proxy sampling", "Episodes and decisions").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from memory3.core.episodes import Decision, Episode
from memory3.sdk.model.fingerprint import model_fingerprint
from memory3.sdk.model.sampling import (
    SamplingConfig,
    decode,
    evaluating,
    left_pad,
    logit_rank,
    make_generator,
    nucleus_distribution,
    position_ids_from_mask,
    special_ids,
)
from memory3.sdk.proxy.policy import ProxyPolicy

PROXY_SEED_OFFSET = 0x5EED
"""``proxy_generator`` defaults to seed + this, so coins never share a stream with candidates."""



def _generators(device, seed: int | None, generator, proxy_generator):
    generator = make_generator(device, seed, generator)
    if proxy_generator is None:
        proxy_generator = torch.Generator(device=device)
        proxy_generator.manual_seed((seed if seed is not None else generator.initial_seed()) + PROXY_SEED_OFFSET)
    return generator, proxy_generator


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
    """One :class:`Episode` per row (what the sampler leaves behind), scored by ``reward`` if given;
    with ``tokenizer``, each keeps its prompt and response decoded (``skip_special_tokens``)."""
    fingerprint = model_fingerprint(model)
    episodes = [
        Episode(prompt_ids=list(map(int, p)), response_ids=list(r), decisions=d, model_fingerprint=fingerprint,
                proxy_version=proxy.version, bank=bank)
        for p, r, d in zip(prompts, responses, decisions)
    ]
    if tokenizer is not None and episodes:
        prompt_texts = tokenizer.batch_decode([e.prompt_ids for e in episodes], skip_special_tokens=True)
        response_texts = tokenizer.batch_decode([e.response_ids for e in episodes], skip_special_tokens=True)
        for episode, prompt_text, response_text in zip(episodes, prompt_texts, response_texts):
            # the service stores text (no NUL): a decoded NUL byte becomes U+FFFD rather than cost the episode
            episode.prompt_text = prompt_text.replace("\x00", "\ufffd")
            episode.response_text = response_text.replace("\x00", "\ufffd")
    if reward is not None:
        from memory3.sdk.proxy.reward import score_episodes

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

    ``reward`` (a :class:`memory3.sdk.proxy.reward.Reward`, optional) scores each response at episode
    end into ``episode.rewards[reward.name]``; text rewards need ``tokenizer``.
    """
    config = config or SamplingConfig()
    chooser = make_proxy_chooser(model, proxy, config, len(prompts), seed=seed, generator=generator,
                                 proxy_generator=proxy_generator)
    with evaluating(proxy):
        responses = decode(model, prompts, config, chooser, need_hidden=True)
    return make_episodes(model, proxy, prompts, responses, chooser.decisions, bank, reward, tokenizer)


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
    pad_id, _ = special_ids(model)
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
