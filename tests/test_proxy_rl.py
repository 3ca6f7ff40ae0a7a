"""The offline trainer raises the mean reward on a small task, on held-out prompts, with fixed seeds.

Task: a tiny random Llama proposes bytes; the rule reward is the fraction of response tokens
outside a forbidden set (the 30 tokens the model proposes most). Episodes are logged once with the
initial, exploring proxy (p(accept) ~ 0.5); the trainer learns from them offline, through a
Parquet round trip (the service's export format), and the new proxy is evaluated by fresh
sampling on prompts it never saw.
"""

from __future__ import annotations

import collections
import random

import numpy as np
import torch

from memory3.sdk.model.sampling import SamplingConfig, sample_nucleus
from memory3.sdk.proxy.export import write_parquet
from memory3.sdk.proxy.policy import ProxyPolicy
from memory3.sdk.proxy.reward import AvoidTokensReward
from memory3.sdk.proxy.sampling import sample_with_proxy
from memory3.trainer.proxy_rl import (
    ProxyRLConfig,
    evaluate,
    load_episodes,
    save_result,
    train_proxy,
    vtrace,
)
from tiny_models import tiny_llama

torch.set_num_threads(1)
SAMPLING = SamplingConfig(max_new_tokens=16, top_p=0.9, max_rejections=4)


def random_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[256] + [rng.randrange(32, 127) for _ in range(rng.randrange(2, 8))] for _ in range(n)]


def test_vtrace_on_policy_targets_are_the_returns():
    values = np.array([0.3, -0.2, 0.5, 0.1])
    rewards = np.array([0.0, 1.0, 0.0, -2.0])
    last = np.array([False, True, False, True])
    targets, advantages = vtrace(values, np.zeros(4), rewards, last, 1.0, 1.0)
    assert np.allclose(targets, [1.0, 1.0, -2.0, -2.0])
    assert np.allclose(advantages, [1.0 - 0.3, 1.0 + 0.2, -2.0 - 0.5, -2.0 - 0.1])
    cut, _ = vtrace(values, np.full(4, -np.inf), rewards, last, 1.0, 1.0)  # ρ = 0: no correction
    assert np.allclose(cut, values)


def _vtrace_by_definition(values, log_rhos, rewards, last, rho_bar, c_bar):
    """Espeholt et al. (2018), eq. 1, summed term by term (γ = 1, V = 0 after an episode's end):
    v_s = V(x_s) + Σ_{t≥s} (Π_{s≤i<t} c_i) δ_t, δ_t = ρ_t (r_t + V(x_{t+1}) − V(x_t)),
    ρ_t = min(ρ̄, π/μ), c_i = min(c̄, π/μ); advantages r_s + v_{s+1} − V(x_s)."""
    n = len(values)
    ends = [t for t in range(n) if last[t]]
    end_of = [min([e for e in ends if e >= s] or [n - 1]) for s in range(n)]  # data may stop mid-episode
    rhos = np.exp(log_rhos)
    rho, c = np.minimum(rho_bar, rhos), np.minimum(c_bar, rhos)
    next_v = [0.0 if last[t] or t == n - 1 else values[t + 1] for t in range(n)]
    targets = np.zeros(n)
    for s in range(n):
        total, trace = values[s], 1.0
        for t in range(s, end_of[s] + 1):
            total += trace * rho[t] * (rewards[t] + next_v[t] - values[t])
            trace *= c[t]
        targets[s] = total
    next_target = [0.0 if last[t] or t == n - 1 else targets[t + 1] for t in range(n)]
    return targets, np.array([rewards[t] + next_target[t] - values[t] for t in range(n)])


def test_vtrace_matches_the_definition_with_truncated_ratios():
    """Ratios on both sides of ρ̄ and c̄, several episodes: truncating neither ρ nor c, or
    bootstrapping across an episode's end, changes the targets."""
    rng = np.random.default_rng(3)
    n = 40
    values, rewards = rng.normal(size=n), rng.normal(size=n)
    log_rhos = rng.normal(scale=1.2, size=n)  # ratios ~0.1 .. 10
    last = np.zeros(n, dtype=bool)
    last[[6, 7, 19, 33, n - 1]] = True
    unfinished = last.copy()
    unfinished[n - 1] = False  # the data ends inside an episode: nothing is bootstrapped past it
    for ends in (last, unfinished):
        for rho_bar, c_bar in ((1.0, 1.0), (1.0, 0.7), (2.0, 0.5)):
            targets, advantages = vtrace(values, log_rhos, rewards, ends, rho_bar, c_bar)
            want_targets, want_advantages = _vtrace_by_definition(values, log_rhos, rewards, ends, rho_bar, c_bar)
            assert np.allclose(targets, want_targets), (rho_bar, c_bar)
            assert np.allclose(advantages, want_advantages), (rho_bar, c_bar)
    untruncated, _ = _vtrace_by_definition(values, log_rhos, rewards, last, np.inf, np.inf)
    assert not np.allclose(vtrace(values, log_rhos, rewards, last, 1.0, 1.0)[0], untruncated)


def test_offline_training_raises_held_out_reward(tmp_path):
    model = tiny_llama(seed=1)
    counts = collections.Counter(t for r in sample_nucleus(model, random_prompts(64, 3), SAMPLING, seed=0) for t in r)
    reward = AvoidTokensReward([t for t, _ in counts.most_common(30)])
    behaviour = ProxyPolicy.for_model(model, width=32, seed=0)
    episodes = sample_with_proxy(model, behaviour, random_prompts(512, 1), SAMPLING, seed=10, reward=reward)
    write_parquet(episodes, tmp_path / "episodes.parquet")
    logged = load_episodes(tmp_path / "episodes.parquet")
    assert len(logged) == 512 and logged[0].decisions == episodes[0].decisions

    heldout = random_prompts(48, 2)
    result = train_proxy(model, logged, behaviour, ProxyRLConfig(epochs=10, eval_every=5, progress=False),
                         heldout, reward, SAMPLING)
    before, after = result.metrics["eval_reward_before"], result.metrics["eval_reward_after"]
    plain = evaluate(model, ProxyPolicy.always_accept(model), heldout, reward, SAMPLING, seed=1)
    print(f"held-out reward: plain LLM {plain:.3f}, behaviour proxy {before:.3f}, trained proxy {after:.3f}")
    assert after > before + 0.04 and after > plain + 0.04
    assert result.proxy.version == behaviour.version + 1

    out = save_result(result, tmp_path / "v1")
    assert (out / "learning_curve.png").stat().st_size > 0
    reloaded = ProxyPolicy.load(out)
    again = evaluate(model, reloaded, heldout, reward, SAMPLING, seed=1)
    assert again == after  # the saved weights are the evaluated ones; same seed, same samples
