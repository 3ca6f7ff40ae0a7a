"""Train the neural reward model's head on labelled texts (the encoder stays frozen).

Why so simple: all-MiniLM-L6-v2 already maps a sentence to a 384-d meaning vector, so a reward
model for one preference is a small classifier on top. The embeddings are computed once, then the
head is fit full-batch with AdamW and binary cross-entropy — seconds on a CPU.

:func:`nature_examples` makes a labelled set locally (nothing can be downloaded): sentences of the
reference corpus's filler grammar (:mod:`memory3.trainer.corpus`), labelled 1 when they are about
nature (river, forest, storm ...) and 0 when they are about built things (road, tower, door ...).
The reference model writes such sentences, so this reward model can judge its continuations.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from memory3.sdk.reward import NeuralReward, RewardHead

# ---------------------------------------------------------------- hyperparameters
EPOCHS = 300
LEARNING_RATE = 1e-2
WEIGHT_DECAY = 1e-3
HEAD_WIDTH = 64
SEED = 0

NATURE_WORDS = ("river", "garden", "field", "storm", "winter", "harbor", "forest", "horse", "song")
BUILT_WORDS = ("road", "window", "market", "bridge", "boat", "house", "tower", "lantern", "book", "door", "letter")


def nature_examples(n: int, seed: int = SEED) -> list[tuple[str, int]]:
    """``n`` filler sentences labelled 1 (nature nouns only) or 0 (built nouns only), balanced."""
    from memory3.trainer.corpus import _filler_sentence

    rng = random.Random(seed)
    by_label: dict[int, list[str]] = {0: [], 1: []}
    while min(len(v) for v in by_label.values()) < (n + 1) // 2:
        sentence = _filler_sentence(rng)
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
    epochs: int = EPOCHS,
    lr: float = LEARNING_RATE,
    width: int = HEAD_WIDTH,
    seed: int = SEED,
    name: str = "neural",
) -> tuple[NeuralReward, dict]:
    """Fit a :class:`RewardHead` on (text, label in [0, 1]); returns the reward and its metrics."""
    torch.manual_seed(seed)
    reward = NeuralReward(RewardHead(width=width), embedder, name=name)
    texts = [t for t, _ in examples]
    labels = torch.tensor([float(y) for _, y in examples])
    embeddings = reward.embed(texts)  # (N, 384), frozen encoder: computed once
    head = reward.head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    losses = []
    for _ in range(epochs):
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
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    reward, metrics = train_reward_model(nature_examples(args.examples, args.seed), seed=args.seed)
    reward.save(args.out)
    print(metrics)


if __name__ == "__main__":
    main()
