"""Rewards: what the proxy is aligned to. One interface, rule rewards for tests, a neural reward model.

Proxy-RLHF (arXiv 2403.04283) pays once, at the end of a response, so a :class:`Reward` scores whole
(prompt, response) pairs, as text or as token ids (``inputs``). Scores land in
``Episode.rewards[reward.name]`` beside other named rewards (e.g. a human label attached later), and
:func:`episode_return` makes them the one number the trainer maximises. :class:`NeuralReward` is the
packaged all-MiniLM-L6-v2 encoder (frozen, loaded by :class:`~memory3.core.embedder.BuiltinEmbedder`)
plus a head trained by :mod:`memory3.trainer.reward_train`; its reward is p(label = 1 | response).

Details: docs/design.md ("Episodes and decisions", "Offline V-trace training");
measurements: docs/experiments.md ("Proxy vs fine-tuning the LLM").
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

_WORD = re.compile(r"[A-Za-z]+")


class Reward(ABC):
    """Scores responses; ``inputs`` says whether it wants text or token id lists."""

    name: str = "reward"
    inputs: str = "text"  # "text" | "tokens"

    @abstractmethod
    def score(self, prompts: Sequence, responses: Sequence) -> list[float]:
        """One float per (prompt, response) pair; higher is better."""


def score_episodes(reward: Reward, episodes: Sequence, tokenizer=None) -> list[float]:
    """Score episodes (``memory3.core.episodes.Episode``) and store ``rewards[reward.name]``."""
    if reward.inputs == "tokens":
        prompts = [e.prompt_ids for e in episodes]
        responses = [e.response_ids for e in episodes]
    else:
        if tokenizer is None:
            raise ValueError(f"reward {reward.name!r} reads text: pass the model's tokenizer")
        prompts = tokenizer.batch_decode([e.prompt_ids for e in episodes], skip_special_tokens=True)
        responses = tokenizer.batch_decode([e.response_ids for e in episodes], skip_special_tokens=True)
    scores = reward.score(prompts, responses) if episodes else []
    for episode, value in zip(episodes, scores):
        episode.rewards[reward.name] = float(value)
    return scores


def episode_return(episode, names: Iterable[str] | str | None = None) -> float:
    """The scalar an episode earned: one named reward, the sum of several, or of all (``None``)."""
    rewards: Mapping[str, float] = episode.rewards
    if isinstance(names, str):
        names = [names]
    names = sorted(rewards) if names is None else list(names)
    missing = [n for n in names if n not in rewards]
    if missing:
        raise KeyError(f"episode {episode.episode_id} has no reward {missing} (it has {sorted(rewards)})")
    return float(sum(rewards[n] for n in names))


# ----------------------------------------------------------------------------- rule rewards


class AvoidTokensReward(Reward):
    """1 - the fraction of response tokens in a forbidden set (an empty response scores 0)."""

    inputs = "tokens"

    def __init__(self, forbidden: Iterable[int], name: str = "avoid_tokens"):
        self.forbidden = frozenset(int(t) for t in forbidden)
        self.name = name

    def score(self, prompts, responses):
        return [1.0 - sum(t in self.forbidden for t in r) / len(r) if len(r) else 0.0 for r in responses]


class WordSetReward(Reward):
    """Fraction of response words in a set (``prefer=True``) or 1 - that fraction (``prefer=False``)."""

    def __init__(self, words: Iterable[str], prefer: bool = True, name: str = "words"):
        self.words = frozenset(w.lower() for w in words)
        self.prefer = prefer
        self.name = name

    def score(self, prompts, responses):
        out = []
        for text in responses:
            words = [w.lower() for w in _WORD.findall(text)]
            hit = sum(w in self.words for w in words) / len(words) if words else 0.0
            out.append(hit if self.prefer else (1.0 - hit if words else 0.0))
        return out


class ShortWordsReward(Reward):
    """Fraction of response words of at most ``max_letters`` letters (0 without words)."""

    def __init__(self, max_letters: int = 4, name: str = "short_words"):
        self.max_letters = max_letters
        self.name = name

    def score(self, prompts, responses):
        out = []
        for text in responses:
            words = _WORD.findall(text)
            out.append(sum(len(w) <= self.max_letters for w in words) / len(words) if words else 0.0)
        return out


class LengthReward(Reward):
    """-|words - target| / target: prefer responses of about ``target`` words."""

    def __init__(self, target: int, name: str = "length"):
        self.target = target
        self.name = name

    def score(self, prompts, responses):
        return [-abs(len(_WORD.findall(t)) - self.target) / self.target for t in responses]


# ----------------------------------------------------------------------------- neural reward model


class RewardHead(nn.Module):
    """Sentence embedding (384) -> logit of p(label = 1). Small: the encoder did the reading."""

    def __init__(self, dim: int = 384, width: int = 64):
        super().__init__()
        self.dim, self.width = dim, width
        self.net = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, 1))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net(embedding).squeeze(-1)


HEAD_WEIGHTS = "reward_head.safetensors"
HEAD_CONFIG = "reward_head.json"


class NeuralReward(Reward):
    """Frozen all-MiniLM-L6-v2 + a trained :class:`RewardHead`; the reward is p(label = 1 | response).

    ``with_prompt`` scores ``prompt + response`` instead of the response alone.
    """

    def __init__(self, head: RewardHead, embedder=None, name: str = "neural", with_prompt: bool = False):
        self.head = head.eval()
        self.embedder = embedder
        self.name = name
        self.with_prompt = with_prompt

    def _embedder(self):
        if self.embedder is None:
            from memory3.core.embedder import BuiltinEmbedder

            self.embedder = BuiltinEmbedder()
        return self.embedder

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, 384) float32 L2-normalised sentence embeddings from the frozen encoder."""
        return torch.from_numpy(np.ascontiguousarray(self._embedder().embed(list(texts))))

    @torch.no_grad()
    def score(self, prompts, responses):
        texts = [p + r for p, r in zip(prompts, responses)] if self.with_prompt else list(responses)
        if not texts:
            return []
        return torch.sigmoid(self.head(self.embed(texts))).tolist()

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, directory / HEAD_WEIGHTS)
        config = {"dim": self.head.dim, "width": self.head.width, "name": self.name, "with_prompt": self.with_prompt,
                  "encoder": "all-MiniLM-L6-v2"}
        (directory / HEAD_CONFIG).write_text(json.dumps(config, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, embedder=None) -> "NeuralReward":
        directory = Path(directory)
        config = json.loads((directory / HEAD_CONFIG).read_text())
        head = RewardHead(config["dim"], config["width"])
        head.load_state_dict(load_file(directory / HEAD_WEIGHTS))
        return cls(head, embedder, name=config["name"], with_prompt=config["with_prompt"])
