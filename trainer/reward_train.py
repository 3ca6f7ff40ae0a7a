"""Train the neural reward model's head on labelled texts (the encoder stays frozen).

all-MiniLM-L6-v2 already maps a sentence to a 384-d meaning vector, so a reward model for one
preference is a small classifier on top: the embeddings are computed once, then the head is fit
full-batch with AdamW and binary cross-entropy. :func:`nature_examples` makes a labelled set
locally: filler sentences of the reference corpus (:func:`memory3.trainer.corpus.filler_sentence`)
labelled 1 when about nature, 0 when about built things. Settings: :class:`RewardTrainConfig`.

Measurements: docs/experiments.md
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memory3.sdk.proxy.reward import NeuralReward, RewardHead


@dataclass
class RewardTrainConfig:
    """Every setting of fitting the reward head (:func:`train_reward_model`)."""

    epochs: int = 300  # full-batch AdamW steps
    lr: float = 1e-2  # AdamW learning rate
    weight_decay: float = 1e-3  # AdamW weight decay
    head_width: int = 64  # hidden units of the RewardHead MLP
    seed: int = 0  # head initialisation (and the labelled set's sampling in main)


# The labelled set's definition: filler nouns that make a sentence "nature" (1) or "built" (0).
NATURE_WORDS = ("river", "garden", "field", "storm", "winter", "harbor", "forest", "horse", "song")
BUILT_WORDS = ("road", "window", "market", "bridge", "boat", "house", "tower", "lantern", "book", "door", "letter")


def nature_examples(n: int, seed: int = RewardTrainConfig.seed) -> list[tuple[str, int]]:
    """``n`` filler sentences labelled 1 (nature nouns only) or 0 (built nouns only), balanced."""
    from .corpus import filler_sentence

    rng = random.Random(seed)
    by_label: dict[int, list[str]] = {0: [], 1: []}
    while min(len(v) for v in by_label.values()) < (n + 1) // 2:
        sentence = filler_sentence(rng)
        words = set(w.strip(".,").lower() for w in sentence.split())
        nature, built = bool(words & set(NATURE_WORDS)), bool(words & set(BUILT_WORDS))
        if nature != built:
            by_label[int(nature)].append(sentence)
    examples = [(t, 1) for t in by_label[1][: (n + 1) // 2]] + [(t, 0) for t in by_label[0][: n // 2]]
    rng.shuffle(examples)
    return examples


def train_reward_model(
    examples: Sequence[tuple[str, int | float]],
    embedder=None,
    config: RewardTrainConfig | None = None,
    name: str = "neural",
    **overrides,
) -> tuple[NeuralReward, dict]:
    """Fit a :class:`RewardHead` on (text, label in [0, 1]); returns the reward and its metrics.

    ``config`` defaults to :class:`RewardTrainConfig`'s defaults; ``overrides`` replace fields of
    it by name (e.g. ``seed=1``)."""
    config = dataclasses.replace(config or RewardTrainConfig(), **overrides)
    torch.manual_seed(config.seed)
    reward = NeuralReward(RewardHead(width=config.head_width), embedder, name=name)
    texts = [t for t, _ in examples]
    labels = torch.tensor([float(y) for _, y in examples])
    embeddings = reward.embed(texts)  # (N, 384), frozen encoder: computed once
    head = reward.head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    losses = []
    for _ in range(config.epochs):
        logits = head(embeddings)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    head.eval()
    with torch.no_grad():
        accuracy = float(((head(embeddings) > 0).float() == (labels > 0.5).float()).float().mean())
    return reward, {"loss": losses[-1], "train_accuracy": accuracy, "examples": len(examples)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="train the neural reward head on the nature/built labelled set")
    parser.add_argument("--out", required=True, help="directory for reward_head.safetensors + .json")
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--seed", type=int, default=RewardTrainConfig.seed)
    args = parser.parse_args(argv)
    examples = nature_examples(args.examples, args.seed)
    reward, metrics = train_reward_model(examples, config=RewardTrainConfig(seed=args.seed))
    reward.save(args.out)
    print(metrics)


if __name__ == "__main__":
    main()
