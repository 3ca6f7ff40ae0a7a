"""Offline, off-policy training of the proxy policy from logged trajectories (V-trace style).

Episodes logged by proxy sampling (:mod:`memory3.sdk.proxy.sampling`) under a behaviour proxy μ
carry each decision's candidate, action and μ's p(accept); hidden states are recomputed once with
the frozen LLM. The MDP (Proxy-RLHF, arXiv 2403.04283): one step per decision, action = accept /
reject, the episode's return paid after its last decision (γ = 1). Each decision carries the
ratio ρ_t = π/μ; value targets are V-trace's (IMPALA) and the policy surrogate -min(ρ_t, ρ̄)·A_t
bounds how far π moves from μ on the fixed data. Targets are recomputed every epoch; fresh proxy
sampling on held-out prompts measures the new proxy. Settings: :class:`ProxyRLConfig`.

Measurements: docs/experiments.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from memory3.core.episodes import Episode
from memory3.sdk.model.sampling import SamplingConfig
from memory3.sdk.proxy.policy import ProxyPolicy, count_trainable, parameter_ratio
from memory3.sdk.proxy.reward import Reward, episode_return, score_episodes
from memory3.sdk.proxy.sampling import sample_with_proxy, step_features


# ---------------------------------------------------------------- hyperparameters
@dataclass
class ProxyRLConfig:
    """Every setting of offline proxy training (the ``memory3 train-proxy`` flags default to these)."""

    epochs: int = 40  # passes over the logged decisions
    minibatch: int = 512  # decisions per gradient step
    lr: float = 3e-3  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient norm clip per step
    rho_bar: float = 1.9  # truncation of the policy surrogate's ratio π/μ (μ = 0.5 -> π may reach 0.95)
    target_rho_bar: float = 1.0  # V-trace truncation inside the value targets
    c_bar: float = 1.0  # V-trace truncation of the trace-cutting ratio
    value_coef: float = 0.5  # weight of the value loss in the total loss
    entropy_coef: float = 0.01  # weight of the entropy bonus (keeps the proxy from collapsing)
    baseline: str = "mean"  # advantage baseline: "mean" (batch-mean return) or "value" (learned V, V-trace's own)
    normalize_returns: bool = True  # z-score episode returns (rewards of any scale train alike)
    eval_every: int = 10  # epochs between held-out evaluations (0: only before and after)
    seed: int = 0  # torch seed of training and of the held-out sampling (seed + 1)
    reward_names: list[str] | None = None  # which episode rewards make the return; None: all
    progress: bool = True  # tqdm bar


@dataclass
class DecisionBatch:
    """All logged decisions as tensors, in episode order then logged order (N decisions)."""

    hidden: torch.Tensor  # (N, hidden size) the LLM's last hidden state where the decision was made
    candidate: torch.Tensor  # (N, embed size) candidate token embeddings (frozen table)
    accepted: torch.Tensor  # (N,) float 1 = accept
    behaviour_logp: torch.Tensor  # (N,) log μ(a_t|s_t) from the logged p_accept
    reward: torch.Tensor  # (N,) the episode return on its last decision, 0 elsewhere
    last: torch.Tensor  # (N,) bool: the last decision of its episode
    episode_index: torch.Tensor  # (N,) which episode


@dataclass
class TrainResult:
    proxy: ProxyPolicy
    history: list[dict] = field(default_factory=list)  # one row per epoch (losses, ratios, eval reward)
    metrics: dict = field(default_factory=dict)


# ---------------------------------------------------------------- data


def behaviour_logp(p_accept: torch.Tensor, accepted: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """log μ(a|s) of the logged action; p is clamped so a constant (0/1) behaviour stays finite."""
    p = p_accept.clamp(eps, 1 - eps)
    return torch.where(accepted > 0.5, p.log(), (1 - p).log())


def load_episodes(source, **read_options) -> list[Episode]:
    """Episodes from a list (as they are), a Parquet file (:mod:`memory3.sdk.proxy.export`) or
    a blocking :class:`memory3.sdk.client.client.Client` (the service's Read, filtered by ``read_options``:
    bank, proxy_version, ...)."""
    if isinstance(source, (str, Path)):
        from memory3.sdk.proxy.export import episodes_from_parquet

        return episodes_from_parquet(source)
    if hasattr(source, "read_episodes"):
        from memory3.sdk.proxy.export import iter_service_episodes

        return list(iter_service_episodes(source, include_hidden_states=False, **read_options))
    return list(source)


@torch.no_grad()
def build_decisions(model, episodes: Sequence[Episode], reward_names=None, normalize_returns: bool = True,
                    batch_size: int = 16) -> DecisionBatch:
    """Recompute LLM features for every logged decision; attach each episode's return."""
    episodes = [e for e in episodes if e.decisions]
    if not episodes:
        raise ValueError("no logged decisions to train on")
    returns = torch.tensor([episode_return(e, reward_names) for e in episodes])
    if normalize_returns and len(episodes) > 1:
        returns = (returns - returns.mean()) / (returns.std() + 1e-8)
    features = step_features(model, [e.prompt_ids for e in episodes], [e.response_ids for e in episodes], batch_size)
    table = model.get_input_embeddings()
    hidden, tokens, accepted, p_accept, reward, last, index = [], [], [], [], [], [], []
    for i, (episode, feats) in enumerate(zip(episodes, features)):
        positions = torch.tensor([d.position for d in episode.decisions])
        hidden.append(feats.hidden[positions].float())
        tokens += [d.candidate_token for d in episode.decisions]
        accepted += [float(d.accepted) for d in episode.decisions]
        p_accept += [d.p_accept for d in episode.decisions]
        n = len(episode.decisions)
        reward += [0.0] * (n - 1) + [float(returns[i])]
        last += [False] * (n - 1) + [True]
        index += [i] * n
    device = next(model.parameters()).device
    accepted_t = torch.tensor(accepted)
    return DecisionBatch(
        hidden=torch.cat(hidden).cpu(),
        candidate=table(torch.tensor(tokens, device=device)).float().cpu(),
        accepted=accepted_t,
        behaviour_logp=behaviour_logp(torch.tensor(p_accept), accepted_t),
        reward=torch.tensor(reward),
        last=torch.tensor(last),
        episode_index=torch.tensor(index),
    )


# ---------------------------------------------------------------- the algorithm


def action_logp(logit: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
    """log π(a|s) for a Bernoulli accept policy given its logit."""
    return torch.where(accepted > 0.5, F.logsigmoid(logit), F.logsigmoid(-logit))


def vtrace(values: np.ndarray, log_rhos: np.ndarray, rewards: np.ndarray, last: np.ndarray,
           rho_bar: float, c_bar: float, baselines: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """V-trace targets v_t and advantages r_t + v_{t+1} - b_t (the ratio enters the surrogate), γ = 1.

    One backward pass over all decisions; ``last`` marks episode ends (no bootstrap across them).
    ``baselines`` b_t default to the values V_t (V-trace); pass zeros for a constant baseline.
    """
    baselines = values if baselines is None else baselines
    rhos = np.exp(log_rhos)
    clipped_rho, clipped_c = np.minimum(rho_bar, rhos), np.minimum(c_bar, rhos)
    n = len(values)
    targets, advantages = np.zeros(n), np.zeros(n)
    next_value = next_target = 0.0
    for t in range(n - 1, -1, -1):
        if last[t]:
            next_value = next_target = 0.0
        delta = clipped_rho[t] * (rewards[t] + next_value - values[t])
        targets[t] = values[t] + delta + clipped_c[t] * (next_target - next_value)
        advantages[t] = rewards[t] + next_target - baselines[t]
        next_value, next_target = values[t], targets[t]
    return targets, advantages


def train_epoch(proxy: ProxyPolicy, optimizer, data: DecisionBatch, config: ProxyRLConfig,
                generator: torch.Generator) -> dict:
    """One pass: V-trace targets with the current π and V, then minibatch updates."""
    with torch.no_grad():
        logits, values = proxy(data.hidden, data.candidate)
        log_rhos = action_logp(logits, data.accepted) - data.behaviour_logp
    values_np = values.numpy().astype(np.float64)
    if config.baseline not in ("mean", "value"):
        raise ValueError(f"baseline must be 'mean' or 'value', got {config.baseline!r}")
    baselines = values_np if config.baseline == "value" else np.full_like(values_np, float(data.reward[data.last].mean()))
    targets, advantages = vtrace(values_np, log_rhos.numpy().astype(np.float64), data.reward.numpy(),
                                 data.last.numpy(), config.target_rho_bar, config.c_bar, baselines)
    targets_t = torch.from_numpy(targets).float()
    advantages_t = torch.from_numpy(advantages).float()
    advantages_t = (advantages_t - advantages_t.mean()) / (advantages_t.std() + 1e-8)
    order = torch.randperm(len(targets_t), generator=generator)
    totals = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0}
    steps = 0
    proxy.train()
    for start in range(0, len(order), config.minibatch):
        idx = order[start:start + config.minibatch]
        logit, value = proxy(data.hidden[idx], data.candidate[idx])
        ratio = (action_logp(logit, data.accepted[idx]) - data.behaviour_logp[idx]).exp()
        policy_loss = -(ratio.clamp(max=config.rho_bar) * advantages_t[idx]).mean()
        value_loss = 0.5 * (value - targets_t[idx]).pow(2).mean()
        p = torch.sigmoid(logit)
        entropy = -(p * F.logsigmoid(logit) + (1 - p) * F.logsigmoid(-logit)).mean()
        loss = policy_loss + config.value_coef * value_loss - config.entropy_coef * entropy
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(proxy.parameters(), config.max_grad_norm)
        optimizer.step()
        totals["policy_loss"] += policy_loss.item()
        totals["value_loss"] += value_loss.item()
        totals["entropy"] += entropy.item()
        steps += 1
    proxy.eval()
    row = {k: v / steps for k, v in totals.items()}
    row["mean_rho"] = float(log_rhos.exp().mean())
    return row


def evaluate(model, proxy: ProxyPolicy, prompts: Sequence[Sequence[int]], reward: Reward, sampling: SamplingConfig,
             seed: int, tokenizer=None) -> float:
    """Mean reward of fresh proxy sampling on held-out prompts (fixed seed: comparable across proxies)."""
    episodes = sample_with_proxy(model, proxy, prompts, sampling, seed=seed)
    return float(np.mean(score_episodes(reward, episodes, tokenizer)))


def train_proxy(
    model,
    episodes: Sequence[Episode],
    proxy: ProxyPolicy,
    config: ProxyRLConfig | None = None,
    eval_prompts: Sequence[Sequence[int]] | None = None,
    eval_reward: Reward | None = None,
    sampling: SamplingConfig | None = None,
    tokenizer=None,
) -> TrainResult:
    """Train a copy of ``proxy`` (the behaviour's parent) offline on ``episodes``; returns the new version."""
    config = config or ProxyRLConfig()
    sampling = sampling or SamplingConfig()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    parent_version = proxy.version
    new = ProxyPolicy.from_bytes(proxy.to_bytes())  # a copy on CPU; the parent is left as it was
    if new.config.mode != "learned":
        raise ValueError("only a learned proxy can be trained (start from ProxyPolicy.for_model)")
    new.version = parent_version + 1
    started = time.perf_counter()
    data = build_decisions(model, episodes, config.reward_names, config.normalize_returns)
    optimizer = torch.optim.AdamW(new.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    can_eval = eval_prompts is not None and eval_reward is not None

    def run_eval() -> float:
        device_proxy = new.to(next(model.parameters()).device)
        value = evaluate(model, device_proxy, eval_prompts, eval_reward, sampling, config.seed + 1, tokenizer)
        new.cpu()
        return value

    history: list[dict] = []
    reward_before = run_eval() if can_eval else float("nan")
    bar = tqdm(range(1, config.epochs + 1), desc="proxy RL", disable=not config.progress)
    for epoch in bar:
        row = {"epoch": epoch, **train_epoch(new, optimizer, data, config, generator)}
        if can_eval and ((config.eval_every and epoch % config.eval_every == 0) or epoch == config.epochs):
            row["eval_reward"] = run_eval()
        history.append(row)
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k != "epoch"})
    metrics = {
        "parent_version": parent_version,
        "version": new.version,
        "episodes": len(episodes),
        "decisions": int(data.accepted.numel()),
        "behaviour_accept_rate": float(data.accepted.mean()),
        "eval_reward_before": reward_before,
        "eval_reward_after": history[-1].get("eval_reward", float("nan")) if history else reward_before,
        "parameter_ratio": parameter_ratio(new, model),
        "train_seconds": time.perf_counter() - started,
        "config": asdict(config),
    }
    return TrainResult(new.to(next(model.parameters()).device), history, metrics)


def save_result(result: TrainResult, out_dir: str | Path) -> Path:
    """Weights + proxy.json + metrics.json + history.json + learning_curve.png, ready to publish."""
    out_dir = Path(out_dir)
    result.proxy.save(out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(result.metrics, indent=2, default=str))
    (out_dir / "history.json").write_text(json.dumps(result.history, indent=2))
    plot_learning_curve(result.history, result.metrics, out_dir / "learning_curve.png")
    return out_dir


def plot_learning_curve(history: list[dict], metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_reward) = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = [r["epoch"] for r in history]
    for key in ("policy_loss", "value_loss", "entropy"):
        ax_loss.plot(epochs, [r[key] for r in history], label=key)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("training losses")
    ax_loss.legend()
    points = [(0, metrics.get("eval_reward_before", math.nan))] + [(r["epoch"], r["eval_reward"]) for r in history if "eval_reward" in r]
    ax_reward.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    ax_reward.set_xlabel("epoch")
    ax_reward.set_title("held-out mean reward (fresh sampling)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """``memory3 train-proxy``: train a proxy offline from a Parquet export of logged episodes."""
    parser = argparse.ArgumentParser(prog="memory3 train-proxy", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=LOOP_HELP)
    parser.add_argument("--model", required=True, help="reference model directory (trainer.model.save_reference_model)")
    parser.add_argument("--episodes", help="Parquet file of logged episodes (trajectory export)")
    parser.add_argument("--target", help="read episodes from this memory3 server (host:port) instead "
                                          "(without --episodes, default: MEMORY3_TARGET)")
    parser.add_argument("--api-key", help="API key for --target (default: MEMORY3_API_KEY)")
    parser.add_argument("--bank", default="", help="with --target: only this bank's episodes")
    parser.add_argument("--behaviour-version", type=int, default=0, help="with --target: only this proxy version")
    parser.add_argument("--publish", metavar="NAME", help="with --target: publish the new proxy under NAME")
    parser.add_argument("--parent", help="directory of the behaviour proxy (proxy.safetensors + proxy.json)")
    parser.add_argument("--init", action="store_true",
                        help="make the first proxy (version 0) for --model in --out, and publish it with --publish")
    parser.add_argument("--width", type=int, help="with --init: hidden width (default: the largest within 1%% of the model)")
    parser.add_argument("--out", required=True, help="directory for the new proxy, metrics and learning curve")
    parser.add_argument("--reward", action="append", help="episode reward name(s) summed into the return (default: all)")
    parser.add_argument("--reward-model", help="NeuralReward directory for held-out evaluation")
    parser.add_argument("--eval-prompts", help="text file, one held-out prompt per line")
    parser.add_argument("--epochs", type=int, default=ProxyRLConfig.epochs)
    parser.add_argument("--lr", type=float, default=ProxyRLConfig.lr)
    parser.add_argument("--max-new-tokens", type=int, default=SamplingConfig.max_new_tokens)
    parser.add_argument("--top-p", type=float, default=SamplingConfig.top_p)
    parser.add_argument("--max-rejections", type=int, default=SamplingConfig.max_rejections)
    parser.add_argument("--seed", type=int, default=ProxyRLConfig.seed)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from memory3.sdk.proxy.reward import NeuralReward

    from .model import load_reference_model

    if args.init:
        return init_proxy(parser, args)
    if not args.parent:
        parser.error("give --parent DIR (the proxy that sampled the episodes), or --init to make the first one")
    model, tokenizer, _ = load_reference_model(args.model)
    parent = ProxyPolicy.load(args.parent)
    eval_prompts = eval_reward = None
    if args.eval_prompts and args.reward_model:
        lines = [line for line in Path(args.eval_prompts).read_text().splitlines() if line.strip()]
        eval_prompts = [tokenizer(line)["input_ids"] for line in lines]
        eval_reward = NeuralReward.load(args.reward_model)
    config = ProxyRLConfig(epochs=args.epochs, lr=args.lr, seed=args.seed, reward_names=args.reward)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, top_p=args.top_p, max_rejections=args.max_rejections)
    client = None
    target = args.target or (None if args.episodes else os.environ.get("MEMORY3_TARGET"))
    if target:
        from memory3.sdk.client.client import Client

        client = Client(target, args.api_key or os.environ.get("MEMORY3_API_KEY"))
        filters = {"bank": args.bank} if args.bank else {}
        if args.behaviour_version:
            filters["proxy_version"] = args.behaviour_version
        episodes = load_episodes(client, **filters)
    elif args.episodes:
        episodes = load_episodes(args.episodes)
    else:
        parser.error("give --episodes FILE.parquet or --target HOST:PORT (or set MEMORY3_TARGET)")
    result = train_proxy(model, episodes, parent, config, eval_prompts, eval_reward, sampling, tokenizer)
    out = save_result(result, args.out)
    print(json.dumps({k: v for k, v in result.metrics.items() if k != "config"}, indent=2))
    print(f"new proxy v{result.proxy.version} in {out}")
    if client is not None:
        if args.publish:
            info = publish(client, args.publish, result)
            print(f"published {info.name} v{info.version}")
        client.close()
    return result


LOOP_HELP = """\
the loop, from nothing to a retrained proxy:
  1. memory3 train-proxy --init --model M --out proxies/first --target HOST:PORT --publish NAME
     the first proxy: sized for the model (<= 1% of its parameters), it starts out accepting most
     tokens, so it only explores gently; the registry numbers it version 1 (unpublished: 0), and
     decoding processes following NAME pick it up
  2. decode with it (memory3.sdk.generation ProxyOptions) and log episodes to the service
  3. memory3 train-proxy --model M --target HOST:PORT --behaviour-version 1 --parent proxies/first
        --out proxies/second --publish NAME   (or --episodes FILE.parquet from `memory3 trajectories export`)
     version 2, trained offline on what version 1 did; repeat from 2 with the newest version
"""


def init_proxy(parser: argparse.ArgumentParser, args) -> ProxyPolicy:
    """``--init``: the first proxy for the model, published (taking the registry's version) and
    saved to ``--out``, so ``--parent`` of the next training names the version that sampled."""
    from .model import load_reference_model

    target = args.target or os.environ.get("MEMORY3_TARGET")
    if args.publish and not target:
        parser.error("--publish needs --target HOST:PORT (or MEMORY3_TARGET)")
    model, _, _ = load_reference_model(args.model)
    proxy = ProxyPolicy.for_model(model, width=args.width, seed=args.seed)
    if args.publish:
        from memory3.sdk.client.client import Client

        with Client(target, args.api_key or os.environ.get("MEMORY3_API_KEY")) as client:
            info = client.publish_proxy(args.publish, proxy.to_bytes(), proxy.config.model_fingerprint,
                                        config=asdict(proxy.config))
        proxy.version = info.version
        print(f"published {info.name} v{info.version}")
    out = proxy.save(args.out)
    print(f"proxy v{proxy.version} for {type(model).__name__} ({count_trainable(proxy)} parameters, "
          f"{parameter_ratio(proxy, model):.2%} of the model) in {out}")
    return proxy


def publish(client, name: str, result: TrainResult):
    """Publish the new proxy to the service's registry (weights + config + metrics + parent)."""
    numeric = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    return client.publish_proxy(name, result.proxy.to_bytes(), result.proxy.config.model_fingerprint,
                                parent_version=result.metrics["parent_version"], metrics=numeric,
                                config=asdict(result.proxy.config))


if __name__ == "__main__":
    main()
