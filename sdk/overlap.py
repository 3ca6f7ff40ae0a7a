"""Text overlap between a query and a reference, for Memory3's leakage rules.

Memory3 excludes training/reference pairs that overlap > 90% and, at evaluation, drops retrieved
references that overlap the question > 2/3. We measure overlap as the fraction of the query's
word tokens (lower-cased, as a multiset) that also occur in the reference: 1.0 means the
reference contains the whole query text.
"""

from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def overlap_fraction(query: str, reference: str) -> float:
    query_words = Counter(words(query))
    total = sum(query_words.values())
    if total == 0:
        return 0.0
    reference_words = Counter(words(reference))
    shared = sum(min(count, reference_words[word]) for word, count in query_words.items())
    return shared / total
