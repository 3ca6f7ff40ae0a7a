"""The generated world: deterministic, and held-out facts never leak into training text."""

import re

import pytest

from memory3.trainer.corpus import (
    ATTRIBUTES,
    EVAL_OVERLAP_LIMIT,
    HELDOUT,
    QUESTIONS,
    TRAIN,
    TRAIN_OVERLAP_LIMIT,
    build_world,
    format_qa,
    format_reference,
    normalize_answer,
    token_overlap,
)
from memory3.trainer.pretrain import training_documents


@pytest.fixture(scope="module")
def world():
    return build_world(seed=7, n_entities=120, heldout_fraction=0.25)


def _snapshot(w):
    return ([(e.kind, e.name, e.split, dict(e.facts)) for e in w.entities],
            [r.text for r in w.references], w.training_texts, [(q.question, q.answer) for q in w.qa(TRAIN)])


def test_same_seed_same_world_different_seed_different_world():
    a = build_world(seed=3, n_entities=60, heldout_fraction=0.2)
    b = build_world(seed=3, n_entities=60, heldout_fraction=0.2)
    c = build_world(seed=4, n_entities=60, heldout_fraction=0.2)
    assert _snapshot(a) == _snapshot(b)
    assert _snapshot(a)[1] != _snapshot(c)[1]
    assert _snapshot(a)[2] != _snapshot(c)[2]


def test_split_sizes_and_every_kind_has_both_splits(world):
    assert len(world.entities) == 120
    held = world.split_entities(HELDOUT)
    assert 0.15 * 120 <= len(held) <= 0.35 * 120
    for kind in ATTRIBUTES:
        splits = {e.split for e in world.entities if e.kind == kind}
        assert splits == {TRAIN, HELDOUT}, kind


def test_names_are_unique_words(world):
    words = [w for e in world.entities for w in e.name.split() if w[0].isupper() and w not in
             ("Works", "Company", "Industries", "Trading", "Foundry", "Guild", "Holdings")]
    assert len(words) == len(set(words))


def test_no_heldout_fact_in_any_training_text(world):
    corpus = "\n".join(training_documents(world, include_train_references=True))
    for e in world.split_entities(HELDOUT):
        assert not re.search(rf"\b{re.escape(e.name)}\b", corpus), f"held-out name {e.name!r} leaked"
        for statement in world.statements(e):
            assert statement not in corpus
    # ...while every train fact is really taught: its statement or a Q/A line is in the corpus
    for e in world.split_entities(TRAIN):
        assert re.search(rf"\b{re.escape(e.name)}\b", corpus)
        for attr, value in e.facts.items():
            taught = [format_qa(q.format(n=e.name), value) for q in QUESTIONS[attr]]
            taught += [s for s in world.statements(e) if value in s]
            assert any(t in corpus for t in taught), (e.name, attr)


def test_train_relations_point_to_train_entities(world):
    for e in world.split_entities(TRAIN):
        for target in e.relations.values():
            assert world.entity(target).split == TRAIN


def test_references_cover_every_entity_and_state_its_facts(world):
    assert sorted(r.entity_id for r in world.references) == [e.id for e in world.entities]
    for r in world.references:
        e = world.entity(r.entity_id)
        assert r.split == e.split
        assert e.name in r.text
        for value in e.facts.values():
            assert value in r.text
    assert all(r.split == HELDOUT for r in world.references_for(HELDOUT))


def test_qa_pairs_are_exact_matchable(world):
    for split in (TRAIN, HELDOUT):
        pairs = world.qa(split)
        assert len(pairs) == sum(len(ATTRIBUTES[e.kind]) for e in world.split_entities(split))
        for q in pairs:
            assert world.entity(q.entity_id).split == split
            assert q.answer and "\n" not in q.answer
            assert normalize_answer(" " + q.answer + ".\nQ: next") == q.answer.lower()
            assert q.prompt.endswith("A:")
        every = world.qa(split, all_phrasings=True)
        assert len(every) == sum(len(QUESTIONS[a]) for e in world.split_entities(split) for a in ATTRIBUTES[e.kind])
        assert set(pairs) < set(every) and len({q.question for q in every}) == len(every)


def test_token_overlap():
    q = "Where was Zorvan Telik born?"
    good_ref = "Zorvan Telik was born in Mirath. Zorvan Telik worked as a poet."
    copy_ref = "Where was Zorvan Telik born? In Mirath."
    assert token_overlap(q, q) == 1.0
    assert token_overlap(q, good_ref) <= EVAL_OVERLAP_LIMIT  # a useful reference is kept
    assert token_overlap(q, copy_ref) > EVAL_OVERLAP_LIMIT  # a restated question is dropped
    assert token_overlap("", good_ref) == 0.0
    assert token_overlap("two words", "two words here") == 1.0  # shorter than an n-gram
    ids = list(range(50))
    assert token_overlap(ids, ids[:46]) > 0.9 >= token_overlap(ids, ids[:40])
    assert TRAIN_OVERLAP_LIMIT == 0.9


def test_format_reference_starts_with_marker(world):
    assert format_reference(world.references[0].text).startswith("Reference: ")


def test_bad_arguments():
    with pytest.raises(ValueError):
        build_world(0, n_entities=5)
    with pytest.raises(ValueError):
        build_world(0, heldout_fraction=1.0)
    with pytest.raises(ValueError):
        build_world(0, 40).qa("test")
