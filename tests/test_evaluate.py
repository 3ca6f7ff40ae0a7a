"""Evaluation: the > 2/3 overlap rule drops exactly the references that restate the question,
the three modes run on the same questions with a real (tiny) model, and one call writes the report.

Real tokenizer, model, MiniLM retrieval and injection; no mocks.
"""

import json

import pytest
import torch

from helpers import small_world_and_tokenizer
from memory3.trainer.config import EvaluationConfig, StageConfig, TrainConfig, WorldConfig
from memory3.trainer.corpus import EVAL_OVERLAP_LIMIT, HELDOUT, token_overlap
from memory3.trainer.evaluate import (
    MODES,
    evaluate_qa,
    evaluate_run,
    prompt_ids,
    report_markdown,
    retrieve_for_questions,
)
from memory3.trainer.model import build_model, default_memory_spec
from memory3.trainer.pretrain import run_training
from memory3.trainer.retrieval_index import ReferenceIndex

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup():
    world, tokenizer = small_world_and_tokenizer()
    model = build_model("tiny", len(tokenizer), seed=0)
    spec = default_memory_spec(model, (2, 3), tokens_per_head=8)
    index = ReferenceIndex([r.text for r in world.references])
    return world, tokenizer, model, spec, index


def test_overlap_filter_drops_references_restating_the_question(setup):
    world, *_ = setup
    question = "Where was Zorvan Telik born?"
    restating = f"Someone asked: where was Zorvan Telik born? {world.references[0].text}"
    unrelated = world.references[1].text
    index = ReferenceIndex([restating, unrelated, world.references[2].text])
    assert token_overlap(question, restating) > EVAL_OVERLAP_LIMIT
    assert token_overlap(question, unrelated) <= EVAL_OVERLAP_LIMIT
    kept, dropped = retrieve_for_questions(index, [question], top_k=5)
    assert 0 not in kept[0] and sorted(kept[0]) == [1, 2]
    assert dropped == 1
    # without the rule the restating reference would have been the best match
    assert index.search([question], 1)[0] == [0]


def test_heldout_questions_retrieve_their_own_reference(setup):
    world, _, _, _, index = setup
    pairs = world.qa(HELDOUT)
    kept, _ = retrieve_for_questions(index, [p.question for p in pairs], top_k=5)
    hits = sum(p.entity_id in k for p, k in zip(pairs, kept))
    assert hits / len(pairs) > 0.8  # MiniLM finds the entity by its syllable name


def test_three_modes_run_on_the_same_questions(setup):
    world, tokenizer, model, spec, index = setup
    pairs = world.qa(HELDOUT)[:6]
    ev = evaluate_qa(model, tokenizer, spec, world, pairs, index, top_k=3, new_tokens=4, batch_size=4)
    assert set(ev.modes) == set(MODES)
    for r in ev.modes.values():
        assert r.questions == 6 and 0.0 <= r.exact_match <= 1.0
        assert r.generated_tokens == 6 * 4 and r.tokens_per_s > 0
    # the memory mode reads the memories it is given: its answers are not the plain model's (this
    # untrained model ignores text in its context, so RAG answers as plain does)
    got = {mode: [e["got"] for e in ev.examples if e["mode"] == mode] for mode in MODES}
    assert all(len(answers) == 3 for answers in got.values())
    assert got["memory"] != got["plain"], got
    rag = prompt_ids(tokenizer, pairs[0].question, "rag", [world.references[0].text])
    plain = prompt_ids(tokenizer, pairs[0].question, "plain", [world.references[0].text])
    assert len(rag) > len(plain) and rag[-len(plain) + 1 :] == plain[1:]  # same question, after the texts
    text = report_markdown([ev], {"model_dir": "m", "parameters": 1e6, "layers": 4, "memory_layers": [2, 3],
                                  "tokens_per_head": 8, "entities": 40, "heldout_entities": 8, "references": 40,
                                  "corpus_tokens": 1, "steps": 0, "train_time_s": 0.0, "device": "cpu"})
    assert "| explicit memory (top-k) |" in text and "explicit memory (top-k) ≥ RAG − 2 pt" in text
    assert "| explicit memory (top-k), retrieval prior |" in text
    assert "explicit memory (top-k), retrieval prior ≥ no memory + 50 pt" in text


def test_retrieval_scores_come_with_the_positions_best_first(setup):
    world, _, _, _, index = setup
    questions = [p.question for p in world.qa(HELDOUT)[:8]]
    positions, scores, dropped = retrieve_for_questions(index, questions, top_k=4, with_scores=True)
    assert (positions, dropped) == retrieve_for_questions(index, questions, top_k=4)
    vectors = index.embed_queries(questions)
    for q, row, row_scores in zip(vectors, positions, scores):
        assert row_scores == sorted(row_scores, reverse=True)
        assert row_scores == pytest.approx([float(q @ index.vectors[i]) for i in row], abs=1e-5)


@pytest.mark.slow  # minutes of training on 2 cores: `make test-fast` skips it
def test_evaluate_run_writes_the_report(tmp_path):
    config = TrainConfig(
        out_dir=str(tmp_path / "run"), world=WorldConfig(seed=0, n_entities=40, passages_per_entity=2),
        vocab_size=1024, preset="tiny", memory_layers=[2, 3], tokens_per_head=8, seq_len=128, batch_size=4,
        stages=[StageConfig(name="warmup", steps=2, warmup_steps=1),
                StageConfig(name="memory", steps=2, warmup_steps=1,
                            memory="memory3.trainer.memory_stage:retrieval_stage")],
        eval_questions=0, num_threads=1, device="cpu", progress=False,
    )
    run_training(config)
    out = tmp_path / "report"
    data = evaluate_run(config.out_dir, EvaluationConfig(top_k=2, train_questions=4, batch_size=16, new_tokens=2),
                        out_dir=out)
    assert [e.split for e in data["evaluations"]] == ["heldout", "train"]
    for name in ("reference_model.md", "reference_model.png", "reference_model.json"):
        assert (out / name).exists(), name
    saved = json.loads((out / "reference_model.json").read_text())
    assert saved["info"]["parameters"] > 0 and set(saved["evaluations"][0]["modes"]) == set(MODES)
    held = data["evaluations"][0]
    by_k = saved["info"]["memory_by_top_k"]
    assert set(by_k) == {"1", "2"} and by_k["2"] == [held.modes["memory"].correct, held.questions]
    assert "top-1 " in (out / "reference_model.md").read_text()
