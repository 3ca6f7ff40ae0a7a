"""Stable proxy sampling on a real tiny Llama: equivalence with nucleus sampling, the rejection
cap and its fallback, logged fields replayed against the frozen model, memory injection."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_decisions_explain_tokens
from memory3.sdk.model.positions import memory_spec_for
from memory3.sdk.memory.encoder import MemoryEncoder
from memory3.sdk.memory.injection import MemoryInjector
from memory3.sdk.model.sampling import SamplingConfig, logit_rank, nucleus_distribution, sample_nucleus
from memory3.sdk.proxy.policy import ProxyPolicy
from memory3.sdk.proxy.sampling import replay_decisions, sample_with_proxy, step_features
from tiny_models import byte_tokenizer, tiny_llama

torch.set_num_threads(1)
PROMPTS = ["Hello there", "Hi", "A somewhat longer prompt", "Llamas"]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=1)


@pytest.fixture(scope="module")
def prompts():
    tok = byte_tokenizer()
    return [tok(p)["input_ids"] for p in PROMPTS]


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = nucleus_distribution(logits, 1.0, 0.8)
    assert torch.allclose(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.allclose(nucleus_distribution(logits, 1.0, 0.81)[0, :3].sum(), torch.tensor(1.0))
    assert int(logit_rank(logits[0], torch.tensor(2))) == 2


@pytest.mark.parametrize("top_p,temperature", [(0.9, 1.0), (1.0, 0.7)])
def test_always_accept_equals_plain_nucleus_sampling(model, prompts, top_p, temperature):
    config = SamplingConfig(max_new_tokens=24, top_p=top_p, temperature=temperature)
    plain = sample_nucleus(model, prompts, config, seed=11)
    episodes = sample_with_proxy(model, ProxyPolicy.always_accept(model), prompts, config, seed=11)
    assert [e.response_ids for e in episodes] == plain
    assert plain != sample_nucleus(model, prompts, config, seed=12)  # the seed matters
    for episode in episodes:
        assert all(d.accepted and d.rejections == 0 and d.p_accept == 1.0 for d in episode.decisions)
        assert [d.position for d in episode.decisions] == list(range(len(episode.response_ids)))


def test_always_reject_falls_back_to_the_best_remaining_candidate(model, prompts):
    config = SamplingConfig(max_new_tokens=8, top_p=0.95, max_rejections=3)
    episodes = sample_with_proxy(model, ProxyPolicy.always_reject(model), prompts, config, seed=3)
    features = step_features(model, [e.prompt_ids for e in episodes], [e.response_ids for e in episodes])
    for episode, feats in zip(episodes, features):
        probs = nucleus_distribution(feats.logits, config.temperature, config.top_p)
        for position, token in enumerate(episode.response_ids):
            step = [d for d in episode.decisions if d.position == position]
            assert [d.rejections for d in step] == [0, 1, 2] and not any(d.accepted for d in step)
            rejected = {d.candidate_token for d in step}
            assert token not in rejected
            remaining = probs[position].clone()
            remaining[list(rejected)] = 0
            assert token == int(remaining.argmax())  # highest LLM probability among the unrejected


def test_whole_nucleus_rejected_takes_the_nucleus_top(model, prompts):
    config = SamplingConfig(max_new_tokens=4, top_p=0.05, max_rejections=5)  # a one- or two-token nucleus
    episodes = sample_with_proxy(model, ProxyPolicy.always_reject(model), prompts, config, seed=3)
    features = step_features(model, [e.prompt_ids for e in episodes], [e.response_ids for e in episodes])
    for episode, feats in zip(episodes, features):
        assert episode.response_ids == feats.logits.argmax(-1).tolist()
        assert all(d.rejections < 5 for d in episode.decisions)


def test_logged_decisions_match_a_replay(model, prompts):
    config = SamplingConfig(max_new_tokens=20, top_p=0.9, max_rejections=4)
    proxy = ProxyPolicy.for_model(model, width=8, seed=0)
    proxy.version = 3
    episodes = sample_with_proxy(model, proxy, prompts, config, seed=5, bank="demo")
    assert sum(not d.accepted for e in episodes for d in e.decisions) > 0  # the ~0.5 proxy does reject
    embeddings = model.get_input_embeddings()
    for episode in episodes:
        assert episode.proxy_version == 3 and episode.bank == "demo" and len(episode.model_fingerprint) == 64
        replayed = replay_decisions(model, episode, config)
        feats = step_features(model, [episode.prompt_ids], [episode.response_ids])[0]
        for d, (llm_prob, rank) in zip(episode.decisions, replayed):
            assert d.llm_prob == pytest.approx(llm_prob, abs=1e-5) and d.rank == rank
            p = proxy.p_accept(feats.hidden[d.position], embeddings(torch.tensor(d.candidate_token)))
            assert d.p_accept == pytest.approx(float(p.detach()), abs=1e-5)
        assert_decisions_explain_tokens(episode.decisions, episode.response_ids, config.max_rejections)


def test_works_with_memory_injection(model, prompts):
    tok = byte_tokenizer()
    spec = memory_spec_for(model, memory_layers=(1, 2), tokens_per_head=4, reference_length=64)
    memories = MemoryEncoder(model, tok, spec).encode(["The capital of France is Paris.", "Llamas are camelids."])
    config = SamplingConfig(max_new_tokens=12, top_p=0.9)
    proxy = ProxyPolicy.for_model(model, width=8, seed=0)
    without = sample_with_proxy(model, proxy, prompts, config, seed=2)
    with MemoryInjector(model, spec) as injector:
        injector.set_memories([memories])
        plain = sample_nucleus(model, prompts, config, seed=2)
        accepted = sample_with_proxy(model, ProxyPolicy.always_accept(model), prompts, config, seed=2)
        episodes = sample_with_proxy(model, proxy, prompts, config, seed=2)
        replayed = [replay_decisions(model, e, config) for e in episodes]
    assert [e.response_ids for e in accepted] == plain
    for episode, replay in zip(episodes, replayed):
        assert [d.llm_prob for d in episode.decisions] == pytest.approx([r[0] for r in replay], abs=1e-5)
    first = lambda eps: [e.decisions[0].llm_prob for e in eps]  # noqa: E731
    assert first(episodes) != pytest.approx(first(without), abs=1e-6)  # the memories were read
