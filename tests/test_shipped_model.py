"""The shipped reference model (models/reference-tiny) is what its provenance says, and it answers
held-out questions from memory.

``scripts/ship_reference_model.py`` packaged a finished ``memory3 train tiny`` run; these tests keep
the shipped files honest: the weights hash and the model fingerprint match ``provenance.json``, and
the model, reading the memory of each question's own reference, answers held-out questions (facts
that appear nowhere in its training text) far more often than without it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from memory3.sdk.model.fingerprint import model_fingerprint
from memory3.trainer.corpus import normalize_answer
from memory3.trainer.evaluate import encode_memory_bank, generate_answers, prompt_ids
from memory3.trainer.model import load_reference_model

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "reference-tiny"
QUESTIONS = 60
MEMORY_EM, PLAIN_EM = 0.5, 0.1  # well inside what the shipped model scores (docs/experiments.md, "Shipped")


def _lines(name: str) -> list[dict]:
    return [json.loads(line) for line in (SHIPPED / name).read_text().splitlines() if line.strip()]


def test_the_shipped_files_are_what_the_provenance_says():
    provenance = json.loads((SHIPPED / "provenance.json").read_text())
    assert hashlib.sha256((SHIPPED / "model.safetensors").read_bytes()).hexdigest() == provenance["weights_sha256"]
    model, _, spec = load_reference_model(SHIPPED)
    assert model_fingerprint(model) == provenance["model_fingerprint"]
    assert provenance["result"]["finished"] and provenance["command"].startswith("memory3 train")
    assert list(spec.memory_layers) == provenance["config"]["memory_layers"]


def test_it_answers_held_out_questions_from_memory():
    torch.set_num_threads(1)
    model, tokenizer, spec = load_reference_model(SHIPPED)
    references = {r["id"]: r["text"] for r in _lines("references.jsonl")}
    questions = _lines("questions.jsonl")[:QUESTIONS]
    memories, _ = encode_memory_bank(model, tokenizer, spec, [references[q["reference"]] for q in questions])
    prompts = [prompt_ids(tokenizer, q["question"], "plain") for q in questions]

    def exact_match(answers):
        return sum(normalize_answer(a) == normalize_answer(q["answer"]) for a, q in zip(answers, questions)) / len(questions)

    with_memory = exact_match(generate_answers(model, tokenizer, prompts, [[m] for m in memories], spec)[0])
    without = exact_match(generate_answers(model, tokenizer, prompts)[0])
    assert with_memory >= MEMORY_EM and without <= PLAIN_EM, (with_memory, without)
