"""Text overlap between a query and a reference, for Memory3's leakage rules: the one
definition the service (Retrieve's ``max_overlap``), the SDK and the trainer share.

Memory3 excludes training/reference pairs that overlap > 90% and, at evaluation, drops retrieved
references that overlap the question > 2/3.
"""

from __future__ import annotations

import re
from typing import Sequence

OVERLAP_NGRAM = 3
"""Overlap is measured on word trigrams, not single words: a good reference necessarily repeats
the entity's name and the question's key words ("Zorvan Telik ... born"), so unigram overlap would
drop exactly the references a question needs. Trigrams catch copies (the question or the training
passage restated nearly verbatim), which is what the paper's filter is for."""


_WORD = re.compile(r"\w+", re.UNICODE)


def _units(x: str | Sequence) -> list:
    """Lower-cased words of a string, or the items of a token-id sequence as they are."""
    if isinstance(x, str):
        return [w.lower() for w in _WORD.findall(x)]
    return [int(t) if not isinstance(t, str) else t for t in x]


def _ngrams(units: list, n: int) -> list[tuple]:
    if not units:
        return []
    n = min(n, len(units))
    return [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]


def token_overlap(a: str | Sequence, b: str | Sequence, n: int = OVERLAP_NGRAM) -> float:
    """Fraction of ``a``'s word n-grams that also occur in ``b`` (0.0 .. 1.0).

    Asymmetric on purpose: it answers "how much of ``a`` does ``b`` repeat?". Callers:

    * evaluation: ``token_overlap(question, reference) > EVAL_OVERLAP_LIMIT`` → drop reference;
    * stage 2: ``token_overlap(reference, chunk) > TRAIN_OVERLAP_LIMIT`` → exclude the pair
      (the reference is restated in the chunk it would help to predict).

    Strings are compared as lower-cased words (tokenizer-independent, so service, SDK and trainer
    agree); sequences of token ids are compared as they are. If ``a`` is shorter than ``n`` words
    it counts as one n-gram of its own length. An empty ``a`` overlaps nothing (0.0).
    """
    ua, ub = _units(a), _units(b)
    grams_a = _ngrams(ua, n)
    if not grams_a:
        return 0.0
    n_eff = len(grams_a[0])
    grams_b = set(_ngrams(ub, n_eff)) if len(ub) >= n_eff else set()
    hits = sum(1 for g in grams_a if g in grams_b)
    return hits / len(grams_a)


def overlapping(
    query: str, texts: Sequence[str], limit: float, n: int = OVERLAP_NGRAM, max_words: int | None = None
) -> list[bool]:
    """For each text, whether ``token_overlap(query, text) > limit`` — the query split into
    n-grams once, however many texts it is compared with (the service's ``max_overlap`` filter).
    ``max_words`` compares only the first words of the query and of each text (bounded cost)."""
    grams_query = _ngrams(_units(query)[:max_words], n)
    if not grams_query:
        return [False] * len(texts)
    n_eff = len(grams_query[0])
    result = []
    for text in texts:
        units = _units(text)[:max_words]
        grams_text = set(_ngrams(units, n_eff)) if len(units) >= n_eff else set()
        hits = sum(1 for g in grams_query if g in grams_text)
        result.append(hits / len(grams_query) > limit)
    return result
