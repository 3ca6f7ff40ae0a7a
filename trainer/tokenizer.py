"""The reference model's tokenizer: byte-level BPE trained locally on the generated corpus.

Nothing can be downloaded, and a small vocabulary fitted to the corpus keeps the embedding table
(most of a tiny model's parameters) small. Saved as a Hugging Face fast tokenizer, so memory3
loads it with ``AutoTokenizer.from_pretrained(dir)``. Special tokens: ``<s>``, ``</s>``, ``<pad>``,
``<unk>``, ``<sep>`` and the one-token reference marker
(:data:`~memory3.core.memory_spec.REFERENCE_MARKER`); encoding prepends BOS and appends nothing
(training documents get ``</s>`` explicitly); ``decode(encode(text)) == text``.

Measurements: docs/experiments.md
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from memory3.core.memory_spec import REFERENCE_MARKER

BOS = "<s>"
EOS = "</s>"
PAD = "<pad>"
UNK = "<unk>"
SEP = "<sep>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, REFERENCE_MARKER, SEP]
"""In id order: ``<pad>`` is 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, marker 4, ``<sep>`` 5."""

DEFAULT_VOCAB_SIZE = 2048


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
                    min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it as a Hugging Face fast tokenizer.

    Deterministic for the same texts in the same order (the BPE trainer breaks ties by order).
    """
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {SEP} $B", special_tokens=[(BOS, bos_id), (SEP, tok.token_to_id(SEP))]
    )
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """A ``tokenizers.Tokenizer`` as a transformers tokenizer with the project's special tokens."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        sep_token=SEP,
        additional_special_tokens=[REFERENCE_MARKER],
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    return fast


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return directory


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`save_tokenizer` (or any HF tokenizer directory)."""
    return AutoTokenizer.from_pretrained(str(directory))


def reference_marker_id(tokenizer: PreTrainedTokenizerFast) -> int:
    return tokenizer.convert_tokens_to_ids(REFERENCE_MARKER)


def encode_document(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Token ids of one training document: ``<s> text </s>``."""
    return tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
