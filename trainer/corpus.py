"""A generated knowledge world: the corpus the reference model is trained and evaluated on.

Nothing can be downloaded, and memory3 must show knowledge living *outside* the weights, so the
world is fictional entities with syllable names, split into **train** entities (facts in the
training text, also as Q/A lines) and **held-out** entities (facts only in references: answerable
only by reading them as RAG text or explicit memory). Train relations point only to train
entities, so no held-out name appears in training text. Everything is a pure function of
``seed``. Answers are short and exact-matchable; :func:`token_overlap` is the project's one
overlap measure (:data:`TRAIN_OVERLAP_LIMIT` in stage 2, :data:`EVAL_OVERLAP_LIMIT` in evaluation).

Measurements: docs/experiments.md
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from memory3.core.memory_spec import REFERENCE_MARKER
from memory3.core.overlap import OVERLAP_NGRAM, token_overlap  # noqa: F401 (re-exported: the one definition)

TRAIN = "train"
HELDOUT = "heldout"

TRAIN_OVERLAP_LIMIT = 0.9
"""Stage 2 excludes a (training chunk, reference) pair whose overlap exceeds this (the paper)."""

EVAL_OVERLAP_LIMIT = 2 / 3
"""Evaluation drops a retrieved reference whose overlap with the question exceeds this."""



# --------------------------------------------------------------------------------------------
# The world's vocabulary: syllables for names, value lists for attributes.
# --------------------------------------------------------------------------------------------

# Short pronounceable syllables keep names to a few BPE tokens, so a tiny model can memorise them.
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr",
           "th", "sh", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "o", "ai", "ou"]
_CODAS = ["", "", "", "", "n", "r", "l", "s", "k", "m"]

OCCUPATIONS = ["painter", "chemist", "sailor", "architect", "astronomer", "composer", "merchant",
               "physician", "poet", "engineer", "cartographer", "weaver", "botanist", "judge",
               "sculptor", "historian", "brewer", "glassmaker", "mathematician", "diplomat"]
PRODUCTS = ["salt", "glass", "wool", "copper", "silk", "timber", "tea", "marble", "pottery",
            "cheese", "paper", "iron", "honey", "wine", "rope", "clocks"]
INDUSTRIES = ["shipbuilding", "textiles", "mining", "printing", "banking", "brewing", "railways",
              "optics", "insurance", "farming", "publishing", "pharmacy", "shipping", "clockmaking"]
DEVICES = ["engine", "lens", "loom", "compass", "press", "lamp", "pump", "telescope", "clock",
           "scale", "kiln", "valve", "sextant", "bellows"]
COMPANY_SUFFIXES = ["Works", "Company", "Industries", "Trading", "Foundry", "Guild", "Holdings"]
GENERIC_NAME_WORDS = frozenset(w.lower() for w in COMPANY_SUFFIXES + DEVICES)
"""Words that names share by design ("Tranfa Foundry", "Vorvu compass"): they say what kind of
thing is named, not which one, so they do not make two names the same."""

KINDS = ("person", "city", "company", "invention")
KIND_SHARES = {"city": 0.2, "person": 0.4, "company": 0.25, "invention": 0.15}


# Attributes per kind; value kinds: a kind name (relation), "year", or a literal list name.
ATTRIBUTES: dict[str, list[str]] = {
    "person": ["birthplace", "birth_year", "occupation"],
    "city": ["country", "founded_year", "known_for"],
    "company": ["founder", "founded_year", "headquarters", "industry"],
    "invention": ["inventor", "invented_year", "invented_in"],
}

RELATIONS = {  # attribute -> the entity kind it points to
    "birthplace": "city",
    "founder": "person",
    "headquarters": "city",
    "inventor": "person",
    "invented_in": "city",
}

# Statement templates: {n} the entity's name, {v} the value. Several phrasings per fact.
STATEMENTS: dict[str, list[str]] = {
    "birthplace": ["{n} was born in {v}.", "{n} came into the world in the city of {v}.",
                   "The birthplace of {n} is {v}.", "{v} is where {n} was born."],
    "birth_year": ["{n} was born in the year {v}.", "{n} was born in {v}.",
                   "The year {n} was born was {v}.", "In {v}, {n} was born."],
    "occupation": ["{n} worked as a {v}.", "By trade, {n} was a {v}.",
                   "{n} earned a living as a {v}.", "The occupation of {n} was {v}."],
    "country": ["{n} is a city in {v}.", "{n} lies in the country of {v}.",
                "The city of {n} belongs to {v}.", "{v} is the country where {n} lies."],
    "founded_year": ["{n} was founded in {v}.", "The founding year of {n} is {v}.",
                     "In {v}, {n} was founded.", "{n} was established in the year {v}."],
    "known_for": ["{n} is known for its {v}.", "{n} is famous for {v}.",
                  "People know {n} for its {v}.", "The pride of {n} is its {v}."],
    "founder": ["{n} was founded by {v}.", "{v} founded {n}.", "The founder of {n} is {v}.",
                "{v} is the person who founded {n}."],
    "headquarters": ["{n} is headquartered in {v}.", "The headquarters of {n} are in {v}.",
                     "{n} has its head office in {v}.", "{v} is home to the head office of {n}."],
    "industry": ["{n} works in {v}.", "{n} is a {v} business.", "The trade of {n} is {v}.",
                 "{n} made its name in {v}."],
    "inventor": ["The {n} was invented by {v}.", "{v} invented the {n}.",
                 "The inventor of the {n} is {v}.", "{v} is the person who invented the {n}."],
    "invented_year": ["The {n} was invented in {v}.", "In {v}, the {n} was invented.",
                      "The {n} dates from the year {v}.", "The year the {n} was invented is {v}."],
    "invented_in": ["The {n} was invented in {v}.", "{v} is the city where the {n} was invented.",
                    "The {n} first appeared in {v}.", "The {n} was built first in {v}."],
}

# Question templates; the first is canonical (what :meth:`World.qa` asks), all appear in training.
QUESTIONS: dict[str, list[str]] = {
    "birthplace": ["Where was {n} born?", "In which city was {n} born?"],
    "birth_year": ["In what year was {n} born?", "When was {n} born?"],
    "occupation": ["What was the occupation of {n}?", "What did {n} do for a living?"],
    "country": ["In which country is {n}?", "Which country is {n} in?"],
    "founded_year": ["In what year was {n} founded?", "When was {n} founded?"],
    "known_for": ["What is {n} known for?", "What is {n} famous for?"],
    "founder": ["Who founded {n}?", "Who was the founder of {n}?"],
    "headquarters": ["Where is {n} headquartered?", "In which city is the head office of {n}?"],
    "industry": ["What industry is {n} in?", "What is the trade of {n}?"],
    "inventor": ["Who invented the {n}?", "Who was the inventor of the {n}?"],
    "invented_year": ["In what year was the {n} invented?", "When was the {n} invented?"],
    "invented_in": ["In which city was the {n} invented?", "Where was the {n} invented?"],
}

_INTROS = {
    "person": ["{n} is a person.", "This is about {n}.", "A short note on {n}.", ""],
    "city": ["{n} is a city.", "This is about the city of {n}.", "A note on {n}.", ""],
    "company": ["{n} is a company.", "This is about the firm {n}.", "A note on {n}.", ""],
    "invention": ["The {n} is an invention.", "This is about the {n}.", "A note on the {n}.", ""],
}

# Filler: a small grammar of plain English so the model learns language, not only templates.
_F_DET = ["the", "a", "every", "one", "that", "this"]
_F_ADJ = ["old", "quiet", "bright", "small", "heavy", "green", "cold", "narrow", "busy", "gentle",
          "wooden", "distant", "broken", "warm", "tall", "early"]
_F_NOUN = ["river", "road", "window", "garden", "market", "bridge", "boat", "house", "field",
           "teacher", "child", "letter", "storm", "village", "tower", "lantern", "horse", "song",
           "winter", "harbor", "forest", "book", "door", "traveler"]
_F_VERB = ["crossed", "followed", "watched", "opened", "carried", "painted", "found", "left",
           "remembered", "passed", "closed", "reached", "visited", "built"]
_F_IVERB = ["waited", "slept", "rested", "sang", "changed", "returned", "shone", "stayed"]
_F_PREP = ["near", "behind", "beside", "under", "past", "across", "beyond", "inside"]
_F_TIME = ["In the morning", "Later that day", "Every spring", "Long ago", "At night",
           "After the rain", "Before dawn", "In those years"]
_F_ADV = ["slowly", "quietly", "again", "together", "at last", "without a word"]
FILLER_WORDS = frozenset(w.lower() for lst in (_F_DET, _F_ADJ, _F_NOUN, _F_VERB, _F_IVERB, _F_PREP,
                                               _F_ADV) for w in lst)


# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entity:
    """One fictional entity. ``facts`` maps attribute -> value as printed (name, year, word)."""

    id: int
    kind: str
    name: str
    split: str
    facts: dict[str, str] = field(hash=False)
    relations: dict[str, int] = field(hash=False, default_factory=dict)  # attribute -> entity id


@dataclass(frozen=True)
class Reference:
    """A reference text about one entity (marker *not* included: see :func:`format_reference`)."""

    id: int
    entity_id: int
    split: str
    text: str


@dataclass(frozen=True)
class QAPair:
    entity_id: int
    attribute: str
    question: str
    answer: str
    split: str

    @property
    def prompt(self) -> str:
        """What the model is given; it should continue with ``" " + answer``."""
        return format_qa_prompt(self.question)


def format_qa_prompt(question: str) -> str:
    return f"Q: {question}\nA:"


def format_qa(question: str, answer: str) -> str:
    return f"Q: {question}\nA: {answer}"


def format_reference(text: str) -> str:
    """The text a reference is encoded from: the reference marker, a space, the reference.

    BOS is added by the tokenizer (its post-processor), giving ``<s>Reference: ...`` as in the
    paper. The marker is a special token of the project's tokenizer.
    """
    return f"{REFERENCE_MARKER} {text}"


def normalize_answer(text: str) -> str:
    """Exact-match normalisation: first line, stripped, trailing period dropped, lower case."""
    line = text.strip().split("\n", 1)[0].strip()
    return line.rstrip(".").strip().lower()


# --------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------


@dataclass
class World:
    """A generated world: entities, references, training text and Q/A pairs.

    ``training_texts`` is everything stage 1 trains on (fact passages about train entities, Q/A
    drills on train entities, filler), already shuffled; ``fact_texts``, ``qa_texts`` and
    ``filler_texts`` are its parts. ``references`` holds one reference per entity of both splits.
    """

    seed: int
    entities: list[Entity]
    references: list[Reference]
    fact_texts: list[str]
    qa_texts: list[str]
    filler_texts: list[str]
    training_texts: list[str]
    countries: list[str]

    def entity(self, entity_id: int) -> Entity:
        return self.entities[entity_id]

    def split_entities(self, split: str) -> list[Entity]:
        _check_split(split)
        return [e for e in self.entities if e.split == split]

    def references_for(self, split: str | None = None) -> list[Reference]:
        if split is None:
            return list(self.references)
        _check_split(split)
        return [r for r in self.references if r.split == split]

    def qa(self, split: str, all_phrasings: bool = False) -> list[QAPair]:
        """One canonical question per fact of the split's entities, in entity order; with
        ``all_phrasings``, every phrasing of :data:`QUESTIONS` (a larger set, for finer measures)."""
        _check_split(split)
        pairs = []
        for e in self.split_entities(split):
            for attr in ATTRIBUTES[e.kind]:
                for question in QUESTIONS[attr] if all_phrasings else QUESTIONS[attr][:1]:
                    pairs.append(QAPair(e.id, attr, question.format(n=e.name), e.facts[attr], split))
        return pairs

    def facts(self, split: str | None = None) -> list[tuple[int, str, str]]:
        """(entity id, attribute, value) triples, optionally of one split."""
        return [(e.id, a, v) for e in self.entities if split is None or e.split == split
                for a, v in e.facts.items()]

    def statements(self, entity: Entity) -> list[str]:
        """Every phrasing of every fact of an entity (used by the leak tests)."""
        return [_articles(t.format(n=entity.name, v=v)) for a, v in entity.facts.items()
                for t in STATEMENTS[a]]


def _check_split(split: str) -> None:
    if split not in (TRAIN, HELDOUT):
        raise ValueError(f"split must be {TRAIN!r} or {HELDOUT!r}, got {split!r}")


class _Names:
    """Unique syllable names. Every name *word* is used once in the world, so searching for a
    name (word-bounded) in a text finds that entity and no other."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, min_syl: int = 2, max_syl: int = 2) -> str:
        for _ in range(10_000):
            n = self.rng.randint(min_syl, max_syl)
            w = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                        for _ in range(n))
            w = w.capitalize()
            if w.lower() in self.used or w.lower() in FILLER_WORDS or len(w) < 4:
                continue
            self.used.add(w.lower())
            return w
        raise RuntimeError("ran out of names")

    def name(self, kind: str) -> str:
        if kind == "person":
            return f"{self.word()} {self.word()}"
        if kind == "city":
            return self.word()
        if kind == "company":
            return f"{self.word()} {self.rng.choice(COMPANY_SUFFIXES)}"
        if kind == "invention":
            return f"{self.word()} {self.rng.choice(DEVICES)}"
        raise ValueError(kind)


def build_world(seed: int = 0, n_entities: int = 200, heldout_fraction: float = 0.2,
                passages_per_entity: int = 3, qa_docs: int | None = None,
                filler_docs: int | None = None) -> World:
    """Generate a world deterministically from ``seed``.

    ``n_entities`` counts all kinds (cities 20 %, people 40 %, companies 25 %, inventions 15 %);
    ``heldout_fraction`` of each kind is held out. ``passages_per_entity`` fact passages are
    written per train entity (each with fresh phrasings); ``qa_docs`` Q/A drill documents and
    ``filler_docs`` filler documents default to scale with the world.
    """
    if n_entities < 20:
        raise ValueError("n_entities must be at least 20 (every kind needs train and held-out members)")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError("heldout_fraction must be in (0, 1)")
    rng = random.Random(seed)
    names = _Names(rng)
    countries = [names.word(2, 2) for _ in range(8)]

    # 1. entities by kind, with a per-kind split
    counts = {k: max(2, round(n_entities * KIND_SHARES[k])) for k in KINDS}
    counts["person"] += n_entities - sum(counts.values())
    kinds_order: list[tuple[str, str]] = []
    for kind in KINDS:
        n_held = min(counts[kind] - 1, max(1, round(counts[kind] * heldout_fraction)))
        splits = [HELDOUT] * n_held + [TRAIN] * (counts[kind] - n_held)
        rng.shuffle(splits)
        kinds_order += [(kind, s) for s in splits]

    # cities first so relations have targets; ids are positions in the final list
    order = sorted(range(len(kinds_order)), key=lambda i: ("city", "person", "company", "invention")
                   .index(kinds_order[i][0]))
    protos = [kinds_order[i] for i in order]
    by_kind_split: dict[tuple[str, str], list[int]] = {}
    for eid, (kind, split) in enumerate(protos):
        by_kind_split.setdefault((kind, split), []).append(eid)

    entities: list[Entity] = []
    for eid, (kind, split) in enumerate(protos):
        name = names.name(kind)
        facts: dict[str, str] = {}
        relations: dict[str, int] = {}
        for attr in ATTRIBUTES[kind]:
            if attr in RELATIONS:
                target_kind = RELATIONS[attr]
                pool = list(by_kind_split[(target_kind, TRAIN)])
                if split == HELDOUT:  # held-out entities may relate to anyone
                    pool += by_kind_split[(target_kind, HELDOUT)]
                target = rng.choice(pool)
                relations[attr] = target
                facts[attr] = ""  # filled below once the target has a name
            elif attr == "birth_year":
                facts[attr] = str(rng.randint(1700, 1960))
            elif attr in ("founded_year",):
                facts[attr] = str(rng.randint(1100, 1890) if kind == "city" else rng.randint(1780, 1990))
            elif attr == "invented_year":
                facts[attr] = str(rng.randint(1750, 1990))
            elif attr == "occupation":
                facts[attr] = rng.choice(OCCUPATIONS)
            elif attr == "country":
                facts[attr] = rng.choice(countries)
            elif attr == "known_for":
                facts[attr] = rng.choice(PRODUCTS)
            elif attr == "industry":
                facts[attr] = rng.choice(INDUSTRIES)
            else:  # pragma: no cover - table and code out of sync
                raise AssertionError(attr)
        entities.append(Entity(eid, kind, name, split, facts, relations))
    for e in entities:
        for attr, target in e.relations.items():
            e.facts[attr] = entities[target].name

    # 2. references: one per entity, all facts, shuffled order and phrasings
    references = [Reference(e.id, e.id, e.split, render_reference(e, rng)) for e in entities]

    # 3. training text about train entities only
    train_entities = [e for e in entities if e.split == TRAIN]
    fact_texts = []
    for e in train_entities:
        for _ in range(passages_per_entity):
            fact_texts.append(_render_passage(e, entities, rng))
    n_qa_docs = qa_docs if qa_docs is not None else max(10, len(train_entities) * 2)
    qa_texts = [_render_qa_doc(train_entities, rng) for _ in range(n_qa_docs)]
    n_filler = filler_docs if filler_docs is not None else max(10, len(train_entities))
    filler_texts = [_render_filler(rng, rng.randint(3, 6)) for _ in range(n_filler)]
    training_texts = fact_texts + qa_texts + filler_texts
    rng.shuffle(training_texts)
    return World(seed, entities, references, fact_texts, qa_texts, filler_texts, training_texts,
                 countries)


_A_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[aeiou])")


def _articles(text: str) -> str:
    """"a astronomer" -> "an astronomer": filler and templates should read as English."""
    return _A_BEFORE_VOWEL.sub(lambda m: m.group(1) + "n ", text)


def _statement(e: Entity, attr: str, rng: random.Random) -> str:
    return _articles(rng.choice(STATEMENTS[attr]).format(n=e.name, v=e.facts[attr]))


def distinctive_words(name: str) -> set[str]:
    """The lower-cased words of a name that tell it apart (without :data:`GENERIC_NAME_WORDS`)."""
    return {w.lower() for w in name.split()} - GENERIC_NAME_WORDS


def render_reference(e: Entity, rng: random.Random) -> str:
    """A reference text stating all of ``e``'s facts, in random order and phrasings."""
    attrs = list(ATTRIBUTES[e.kind])
    rng.shuffle(attrs)
    intro = rng.choice(_INTROS[e.kind]).format(n=e.name)
    parts = ([intro] if intro else []) + [_statement(e, a, rng) for a in attrs]
    return " ".join(parts)


def _render_passage(e: Entity, entities: list[Entity], rng: random.Random) -> str:
    """A paragraph that uses an entity's facts in context: its facts (a random subset, at least
    two), a related train entity's fact, and filler sentences around them."""
    attrs = list(ATTRIBUTES[e.kind])
    rng.shuffle(attrs)
    attrs = attrs[: rng.randint(2, len(attrs))]
    sentences = [_statement(e, a, rng) for a in attrs]
    if e.relations:
        attr = rng.choice(sorted(e.relations))
        other = entities[e.relations[attr]]
        sentences.append(_statement(other, rng.choice(ATTRIBUTES[other.kind]), rng))
    for _ in range(rng.randint(0, 2)):
        sentences.insert(rng.randint(0, len(sentences)), filler_sentence(rng))
    return " ".join(sentences)


def _render_qa_doc(train_entities: list[Entity], rng: random.Random) -> str:
    """A drill of Q/A lines about train entities, in every question phrasing, so the format and
    the facts are both learned; questions of held-out entities are never asked in training."""
    lines = []
    for _ in range(rng.randint(3, 6)):
        e = rng.choice(train_entities)
        attr = rng.choice(ATTRIBUTES[e.kind])
        lines.append(format_qa(rng.choice(QUESTIONS[attr]).format(n=e.name), e.facts[attr]))
    return "\n".join(lines)


def filler_sentence(rng: random.Random) -> str:
    """One sentence of the filler grammar (plain English about rivers, roads, towers ...)."""
    c = rng.choice
    form = rng.randrange(4)
    if form == 0:
        s = f"{c(_F_DET)} {c(_F_ADJ)} {c(_F_NOUN)} {c(_F_VERB)} {c(_F_DET)} {c(_F_NOUN)}"
    elif form == 1:
        s = f"{c(_F_TIME)}, {c(_F_DET)} {c(_F_NOUN)} {c(_F_IVERB)} {c(_F_PREP)} {c(_F_DET)} {c(_F_ADJ)} {c(_F_NOUN)}"
    elif form == 2:
        s = f"{c(_F_DET)} {c(_F_NOUN)} {c(_F_IVERB)} {c(_F_ADV)}"
    else:
        s = (f"{c(_F_DET)} {c(_F_NOUN)} {c(_F_PREP)} {c(_F_DET)} {c(_F_NOUN)} was {c(_F_ADJ)} "
             f"and {c(_F_ADJ)}")
    s = _articles(s)
    return s[0].upper() + s[1:] + "."


def _render_filler(rng: random.Random, n_sentences: int) -> str:
    return " ".join(filler_sentence(rng) for _ in range(n_sentences))
