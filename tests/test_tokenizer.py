"""The project's byte-level BPE: exact round trip, special tokens, HF save/load, reference length."""

import pytest
import torch
from transformers import AutoTokenizer

from memory3.core.memory_spec import REFERENCE_MARKER
from memory3.trainer.corpus import build_world, format_reference
from memory3.trainer.tokenizer import (BOS, EOS, PAD, SEP, SPECIAL_TOKENS, encode_document,
                                       reference_marker_id, save_tokenizer, train_tokenizer)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world():
    return build_world(seed=0, n_entities=200, heldout_fraction=0.2)


@pytest.fixture(scope="module")
def tokenizer(world):
    texts = world.training_texts + [format_reference(r.text) for r in world.references]
    return train_tokenizer(texts, vocab_size=2048)


def test_round_trip(tokenizer, world):
    samples = [
        world.training_texts[0],
        format_reference(world.references[-1].text),
        "Q: Where was Zorvan Telik born?\nA: Mirath",
        "  leading spaces, tabs\tand\nnewlines  ",
        "Unicode: café, naïve, 東京, emoji 🙂 — and digits 1234567890.",
        "",
    ]
    for text in samples:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids[1:]) == text


def test_special_tokens(tokenizer):
    assert tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == SPECIAL_TOKENS
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.sep_token) == (PAD, BOS, EOS, SEP)
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    ids = tokenizer(format_reference("Mirath is a city."))["input_ids"]
    # <s>Reference: — the marker is a single special token right after BOS
    assert ids[:2] == [tokenizer.bos_token_id, reference_marker_id(tokenizer)]
    assert tokenizer.convert_ids_to_tokens(ids[1]) == REFERENCE_MARKER
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "Mirath is a city."
    assert encode_document(tokenizer, "a b")[-1] == tokenizer.eos_token_id
    assert len(tokenizer) <= 2048


def test_references_fit_in_128_tokens(tokenizer, world):
    lengths = [len(tokenizer(format_reference(r.text))["input_ids"]) for r in world.references]
    assert max(lengths) <= 128
    assert min(lengths) > 8


def test_save_and_load_as_hugging_face_tokenizer(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    text = format_reference("The Timkon valve was invented in 1779.") + "\nQ: Who?\nA: x"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.pad_token_id == tokenizer.pad_token_id
    assert loaded.convert_tokens_to_ids(REFERENCE_MARKER) == reference_marker_id(tokenizer)
    assert loaded.padding_side == "right"


def test_training_is_deterministic(world):
    texts = world.training_texts[:200]
    a, b = train_tokenizer(texts, 512), train_tokenizer(texts, 512)
    assert a.get_vocab() == b.get_vocab()
