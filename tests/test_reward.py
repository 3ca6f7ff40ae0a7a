"""Rewards: rule rewards score what they say; the neural reward model (frozen all-MiniLM-L6-v2 +
a small head) fits a toy labelled set and generalises to held-out sentences; save/load."""

from __future__ import annotations

import pytest
import torch

from memory3.sdk.proxy.reward import (
    AvoidTokensReward, LengthReward, NeuralReward, ShortWordsReward, WordSetReward, episode_return, score_episodes,
)
from memory3.core.episodes import Episode
from memory3.trainer.reward_train import nature_examples, train_reward_model

from tiny_models import byte_tokenizer

torch.set_num_threads(1)


def test_rule_rewards():
    assert AvoidTokensReward([1, 2]).score([[0]], [[1, 3, 4, 2], []]) == [0.5, 0.0]
    assert WordSetReward(["river"]).score(["", ""], ["The river", "no"]) == [0.5, 0.0]
    assert WordSetReward(["river"], prefer=False).score([""], ["The river"]) == [0.5]
    assert ShortWordsReward(3).score([""], ["a tall tree"]) == [pytest.approx(1 / 3)]
    assert LengthReward(4).score([""], ["one two"]) == [-0.5]


def test_score_episodes_and_returns():
    tok = byte_tokenizer()
    episodes = [Episode(tok("Hi")["input_ids"], tok("the river")["input_ids"], [], "f" * 64, 0),
                Episode(tok("Hi")["input_ids"], tok("a road")["input_ids"], [], "f" * 64, 0)]
    score_episodes(WordSetReward(["river"], name="nature"), episodes, tok)
    score_episodes(AvoidTokensReward(tok("a")["input_ids"], name="no_a"), episodes)
    assert [e.rewards["nature"] for e in episodes] == [0.5, 0.0]
    assert episode_return(episodes[0], "nature") == 0.5
    assert episode_return(episodes[1]) == pytest.approx(0.0 + 1 - 2 / 6)
    with pytest.raises(KeyError):
        episode_return(episodes[0], "human")
    with pytest.raises(ValueError, match="tokenizer"):
        score_episodes(WordSetReward(["x"]), episodes)


@pytest.fixture(scope="module")
def trained():
    examples = nature_examples(240, seed=0)
    return train_reward_model(examples[:160], epochs=200, seed=0), examples[160:]


def test_reward_model_fits_and_generalises(trained):
    (reward, metrics), heldout = trained
    assert metrics["train_accuracy"] >= 0.95
    scores = reward.score([""] * len(heldout), [t for t, _ in heldout])
    accuracy = sum((s > 0.5) == bool(y) for s, (_, y) in zip(scores, heldout)) / len(heldout)
    assert accuracy >= 0.9
    nature, built = reward.score(["", ""], ["The river passed the quiet forest.", "A tall tower stood by the road."])
    assert nature > 0.5 > built


def test_reward_model_save_load(trained, tmp_path):
    (reward, _), heldout = trained
    texts = [t for t, _ in heldout[:8]]
    loaded = NeuralReward.load(reward.save(tmp_path / "rm"), embedder=reward.embedder)
    assert loaded.score([""] * 8, texts) == pytest.approx(reward.score([""] * 8, texts), abs=1e-6)
