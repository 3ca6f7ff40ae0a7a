"""Stage 2 of pretraining: continual training with explicit memory (Memory3 §3.4), registered
as ``memory: retrieval`` with :func:`memory3.trainer.pretrain.register_memory_stage`.

What one training step does (the seam is :func:`memory3.trainer.pretrain.batch_loss`):

1. **Retrieve.** Every ``chunk_size``-token chunk of every row is decoded to text and used as the
   query of an in-process MiniLM index (:class:`~memory3.trainer.retrieval_index.ReferenceIndex`)
   over the *training* references: the train entities' references plus the memory-drill entities'
   (below) — never a held-out one. The best ``references_per_chunk`` references are kept after
   dropping every (chunk, reference) pair with ``token_overlap(reference, chunk) >
   TRAIN_OVERLAP_LIMIT`` (0.9: the reference is restated in the very text it would help predict).
2. **Encode.** The batch's distinct references are encoded into sparse memories by
   :class:`memory3.sdk.encoder.MemoryEncoder` with the model being trained, i.e. the *current*
   weights, **with autograd on** (:data:`ENCODE_WITH_GRAD`, ``encode_differentiable``): the loss
   of text that reads a memory also trains how the reference's kept keys/values are computed
   (the top-k *selection* stays a hard choice). Why: with memories as per-step constants only the
   reading side learned, and it did not learn to read (drill-answer loss with memory = without,
   after 400 steps); its effect alone was not ablated in the final recipe. The extra graph over
   the batch's ~64 references of ~37 tokens is small next to the 16 x 256-token forward.
   Memories are re-encoded from the weights of *this* step, so they never go stale (the
   injector's fingerprint check holds every step).
3. **Inject.** Chunk ``c`` attends to the memories of its own reference and of the references of
   the previous ``previous_chunks`` chunks (the paper: 1 + 4). The SDK's
   :class:`~memory3.sdk.injection.MemoryInjector` reads one memory set per batch row; the row's
   set here is the union of its chunks' memories, and :class:`ChunkMemoryInjector` (a thin
   subclass, same hook and mask path) additionally hides from each query position the memory
   slots its chunk may not read. Parallel positions: the injector rotates memory keys, so the
   context keeps positions ``0..T-1`` (``position_offset = 0``).

Why stage 2 trains on *extra* text (:func:`memory_drill`): held-out facts live only in
references, so memory helps on held-out questions only if the model has learned to read answers
out of memory. Stage 1's facts are already in the weights (train QA ~0.9), so with stage 1's text
alone the model has no reason to look at memory. Stage 2 therefore mixes stage 1's documents
(so nothing is forgotten) with Q/A drills about *memory-drill entities*: a second generated
world (another seed) whose facts appear in no training text and whose references sit in the
training index. A drill answer is predictable only from the retrieved reference, which is the
skill held-out evaluation needs. What the measurements (from the stage-1 model, held-out answer
loss with vs without the reference in memory, and held-out QA) taught:

* few drill entities drilled often get memorised, not read: ~600 entities x 4 documents gave no
  gap at all; now 7958 (:data:`DRILL_ENTITIES_PER_ENTITY`), one document each;
* the loss counts only a drill's answer tokens (:data:`ANSWER_ONLY_DRILL_LOSS`): the question
  lines are mostly unpredictable names that drown the few tokens memory can help with;
* half the drills carry their reference as text first (:data:`DRILL_IN_CONTEXT_FRACTION`): the
  in-context look-up uses the same keys/values as the memory;
* memory in every layer (trainer/configs/tiny.yaml) opened the gap ~5x faster than layers 2-3;
* every kind must be drilled: the drill filter once compared whole names, kind words included
  ("Tranfa Foundry"), and dropped every drill company and most inventions, so company and
  invention questions were never read (0 of 58 held-out); names now compare by
  :func:`~memory3.trainer.corpus.distinctive_words`;
* drill answers must be the tokens evaluation answers are: half of the name-valued drill facts
  borrow a main-world train name (:data:`DRILL_BORROWED_VALUE_FRACTION`); without, the model
  copied drill-world names only (held-out EM with the question's own memory: 29 -> 61 of 130);
* drills in same-kind sheets (:data:`DRILL_SHEET_SIZE`): own memory 61 -> 69 of 130, top-5
  18 -> 22. Still open: picking the right memory among similar ones. With the top-1 retrieved
  memory held-out EM is 65 of 130, with the top-2 29, with the top-5 22 — the model reads the
  value of the asked type from whichever memory; a second retrieved reference per chunk in
  training (``references_per_chunk: 2``: top-1 55, top-5 17), look-back across windows and
  in-context distractors (see their constants) did not teach it. A stage 2 twice as long (3000
  steps, trainer/configs/tiny.yaml) did, partly: top-1 87, top-2 65, top-5 24. Continuing that
  model did not: 1500 more steps of the same recipe (lr 1e-3 -> 3e-4) gave top-1 80, top-2 51,
  top-5 22 (the drills get memorised); 1500 more with every chunk reading its own top-5 retrieved
  references and no previous chunks' (the evaluation's condition: ``references_per_chunk: 5,
  previous_chunks: 0``) gave top-1 58, top-2 33, top-5 16. Every way of showing this 1M-parameter
  model more distractors made it read less, not pick better.

Drill entities sharing a name word with the main world are dropped, so no held-out name or fact
is ever trained on.

Stage 2's stream (:class:`ChunkAlignedStream`) starts every document, and every window, on a
chunk boundary: a chunk then belongs to one document, so its retrieved reference is that
document's, and every chunk the model ever sees is one of a fixed set, so each chunk's retrieval
is computed once per run (embedded in one batch, cached on disk) instead of running MiniLM on 64
texts per step; the query is still exactly the chunk's own text.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from memory3.sdk.encoder import MemoryEncoder
from memory3.sdk.injection import MemoryInjector
from memory3.sdk.memory import ExplicitMemory
from memory3.sdk.memory_spec import MemorySpec
from memory3.trainer.config import StageConfig
from memory3.trainer.corpus import (ATTRIBUTES, QUESTIONS, RELATIONS, TRAIN, TRAIN_OVERLAP_LIMIT, Entity, World,
                                    build_world, distinctive_words, format_qa, format_reference, render_reference,
                                    token_overlap)
from memory3.trainer.pretrain import (Batch, ChunkMemories, MemoryHooks, TokenStream, TrainContext,
                                      register_memory_stage, training_documents)
from memory3.trainer.quantization_aware import CodebookRoundTrip, sample_references
from memory3.trainer.retrieval_index import DEFAULT_CACHE_DIR, ReferenceIndex
from memory3.trainer.tokenizer import encode_document

# ------------------------------------------------------------------ hyperparameters (stage 2 data)
DRILL_ENTITIES_PER_ENTITY = 40
"""Memory-drill entities per entity of the main world (tiny: 200 -> 8000 generated, 7958 kept).
Many entities, each drilled rarely: measured with 5 (~600 kept, 4 documents each, ~20 exposures
per entity in 300 steps) the drill loss fell while the held-out answer loss with memory stayed
equal to without: the drill facts went into the weights instead of being read."""
DRILL_DOCS_PER_ENTITY = 1
"""Q/A drill documents per drill entity (each asks all its facts, in random phrasing and order)."""
DRILL_IN_CONTEXT_FRACTION = 0.5
"""Share of drill documents that start with their reference as text (``Reference: ...``, the RAG
prompt's format) before the Q/A lines. Why: reading a reference in context and reading its memory
use the same keys/values (a memory *is* the reference's K/V in the memory layers), so drills
with the reference in context teach the attention heads to look up answers in reference tokens,
with a dense gradient into those tokens' keys, and memory reading rides on the same circuit.
Measured 0.25 (same stage 1; 130 held-out questions, own reference / top-1 / top-2 / top-5
memories): better at 1500 stage-2 steps (72 / 69 / 47 / 25 vs 69 / 65 / 29 / 22 at 0.5), much
worse at the recipe's 3000 (55 / 51 / 32 / 13 vs 91 / 87 / 65 / 24): 0.5 stays."""
DRILL_SEED_OFFSET = 7919
"""The drill world's seed is the main world's plus this: a different, still reproducible world."""
DRILL_BORROWED_VALUE_FRACTION = 0.5
"""Share of a drill entity's name-valued facts (country, birthplace, founder, headquarters,
inventor, invented_in) that name a main-world train entity or country instead of a drill-world
one. Why: a held-out answer is a main-world name, a single token the weights tie to the train
facts they memorised; drills answered only with drill-world names taught copying those tokens
from memory and no others (held-out EM with the question's own reference in memory: 0 of 8
country questions, 4 of 16 birthplaces, while one-token common words like "honey" were read
8 of 8). Measured (own reference in memory, 130 held-out questions): 29 without, 61 with."""
DRILL_SHEET_SIZE = 5
"""Drill documents follow each other in stage 2's stream in runs ("sheets") of this many about
entities of one kind. Why: a chunk reads its own reference and the previous 4 chunks'; in a sheet
those are references about other entities of the same kind, phrased alike, which is what the
top-5 memories of an evaluation question are. With drills shuffled one by one the previous
chunks' references were about random kinds, and held-out EM with the top-5 memories was a
third of that with the question's own reference alone (18 vs 61 of 130). Measured with sheets:
22 vs 69."""
PREVIOUS_CHUNKS_ACROSS_WINDOWS = False
"""When on, a window's first chunks also read the references of the stream's chunks before the
window (``Batch.preceding``), so every chunk reads its own and the previous ``previous_chunks``
chunks' references (1 + 4) instead of 1 + 1.5 on average. Off: measured on the tiny recipe (same
stage 1, 1500 stage-2 steps), held-out EM with the top-5 memories fell from 22 to 15 of 130 and
with the top-1 memory from 65 to 40: more distractors per chunk did not teach the model to pick
the right memory, it read worse."""
DRILL_IN_CONTEXT_DISTRACTORS = 0
"""References of other same-kind drill entities shown, in random order with the drill's own, before
an in-context drill's Q/A lines (see :data:`DRILL_IN_CONTEXT_FRACTION`). 0: measured with 3 (and
:data:`PREVIOUS_CHUNKS_ACROSS_WINDOWS` on), memory reading collapsed (held-out EM 1-2 of 130 with
any number of memories)."""
MIN_DRILL_ENTITIES = 40  # build_world needs >= 20; keep tiny test worlds meaningful
ANSWER_ONLY_DRILL_LOSS = True
"""Stage-2 loss on drill documents counts only answer tokens (:func:`drill_label_mask`); stage-1
documents keep every token. Measured: see the module docstring."""
ENCODE_WITH_GRAD = True
"""Memories of the training step are encoded with autograd on
(:meth:`memory3.sdk.encoder.MemoryEncoder.encode_differentiable`), so the loss also trains how
references are encoded. See the module docstring (its effect alone was not measured)."""


# ------------------------------------------------------------------ stage 2 data


@dataclass
class MemoryDrill:
    """Text whose answers are only in references: documents and the references that answer them."""

    documents: list[str]
    references: list[str]
    entities: list[Entity]
    document_kinds: list[str]  # the kind of entity each document drills

    def sheets(self, sheet_size: int, seed: int) -> list[list[str]]:
        """The documents in shuffled runs of ``sheet_size`` about entities of one kind
        (:data:`DRILL_SHEET_SIZE`)."""
        by_kind: dict[str, list[str]] = {}
        for doc, kind in zip(self.documents, self.document_kinds):
            by_kind.setdefault(kind, []).append(doc)
        rng = random.Random(seed)
        sheets = []
        for kind in sorted(by_kind):
            docs = by_kind[kind]
            rng.shuffle(docs)
            sheets += [docs[i : i + sheet_size] for i in range(0, len(docs), sheet_size)]
        return sheets


def _name_words(world: World) -> set[str]:
    """The distinctive words of every main-world name and country (train and held-out)."""
    return set().union(*(distinctive_words(e.name) for e in world.entities)) | {c.lower() for c in world.countries}


def _borrowable_values(world: World) -> dict[str, list[str]]:
    """Per name-valued attribute, the main-world values a drill fact may take: the countries, and
    the names of the *train* entities of the attribute's kind (never a held-out one)."""
    values = {"country": list(world.countries)}
    for attr, kind in RELATIONS.items():
        values[attr] = [e.name for e in world.entities if e.kind == kind and e.split == TRAIN]
    return values


def entity_qa_document(entity: Entity, rng: random.Random) -> str:
    """Every fact of one entity as Q/A lines, in random order and phrasing.

    One entity per document (unlike stage 1's mixed drills), so a chunk's one retrieved
    reference can answer the whole chunk.
    """
    attrs = list(ATTRIBUTES[entity.kind])
    rng.shuffle(attrs)
    return "\n".join(format_qa(rng.choice(QUESTIONS[a]).format(n=entity.name), entity.facts[a]) for a in attrs)


def memory_drill(world: World, n_entities: int | None = None, docs_per_entity: int = DRILL_DOCS_PER_ENTITY,
                 seed_offset: int = DRILL_SEED_OFFSET, in_context_fraction: float | None = None,
                 borrowed_fraction: float | None = None, in_context_distractors: int | None = None) -> MemoryDrill:
    """Q/A drills about a second world's entities, and their references (see module docstring).

    All entities of the drill world are used, whatever their split there: none of their facts is
    in the main world's training text. An entity is dropped when its name, or a value of its own
    world, shares a distinctive word (:func:`~memory3.trainer.corpus.distinctive_words`) with a
    main-world name, so a drill never states a main-world (possibly held-out) fact. A
    ``borrowed_fraction`` of the name-valued facts instead take a main-world *train* name or
    country (:data:`DRILL_BORROWED_VALUE_FRACTION`): the drill entity is still fictional, so that
    is a fact about no main-world entity.
    """
    n_entities = n_entities or max(MIN_DRILL_ENTITIES, DRILL_ENTITIES_PER_ENTITY * len(world.entities))
    in_context_fraction = DRILL_IN_CONTEXT_FRACTION if in_context_fraction is None else in_context_fraction
    borrowed_fraction = DRILL_BORROWED_VALUE_FRACTION if borrowed_fraction is None else borrowed_fraction
    drill_world = build_world(world.seed + seed_offset, n_entities, heldout_fraction=0.2, passages_per_entity=0,
                              qa_docs=0, filler_docs=0)
    taken = _name_words(world)
    borrowable = _borrowable_values(world)
    rng = random.Random(world.seed + seed_offset)
    distractor_rng = random.Random(world.seed + seed_offset + 1)
    distractors = DRILL_IN_CONTEXT_DISTRACTORS if in_context_distractors is None else in_context_distractors
    entities, documents, references, kinds = [], [], [], []
    by_kind: dict[str, list[str]] = {}
    for e in drill_world.entities:
        words = distinctive_words(e.name).union(*(distinctive_words(v) for v in e.facts.values()))
        if words & taken:
            continue
        reference = drill_world.references[e.id].text
        borrowed = {a: rng.choice(borrowable[a]) for a in e.facts if a in borrowable and rng.random() < borrowed_fraction}
        if borrowed:
            e = replace(e, facts={**e.facts, **borrowed},
                        relations={a: t for a, t in e.relations.items() if a not in borrowed})
            reference = render_reference(e, rng)
        same_kind = by_kind.setdefault(e.kind, [])  # references of earlier kept entities of this kind
        earlier = len(same_kind)
        entities.append(e)
        references.append(reference)
        same_kind.append(reference)
        for _ in range(docs_per_entity):
            doc = entity_qa_document(e, rng)
            if rng.random() < in_context_fraction:
                shown = [reference]
                if distractors and earlier:
                    shown += distractor_rng.sample(same_kind[:earlier], min(distractors, earlier))
                    distractor_rng.shuffle(shown)
                doc = "\n".join(format_reference(r) for r in shown) + "\n" + doc
            documents.append(doc)
            kinds.append(e.kind)
    return MemoryDrill(documents, references, entities, kinds)


def stage_documents(world: World, include_train_references: bool, drill: MemoryDrill, seed: int,
                    sheet_size: int | None = None) -> list[str]:
    """Stage 2's documents: stage 1's (pretrain's own list) plus the drills in sheets of one kind
    (:data:`DRILL_SHEET_SIZE`), shuffled as units."""
    sheet_size = DRILL_SHEET_SIZE if sheet_size is None else sheet_size
    units = [[d] for d in training_documents(world, include_train_references)] + drill.sheets(sheet_size, seed)
    random.Random(seed).shuffle(units)
    return [d for unit in units for d in unit]


class ChunkAlignedStream(TokenStream):
    """Stage 2's token stream: every document starts on a chunk boundary; windows start on one.

    Each document (``<s> doc </s>``, as in stage 1) is padded to a multiple of ``chunk_size``
    with pad tokens whose labels are ignored (-100). Why: a chunk then holds one document, or a
    piece of one, so the reference its text retrieves is that document's entity's — a drill's
    answers are then really predictable from memory, and a Q/A prompt at evaluation (a document
    start) looks like a training chunk. The set of distinct chunks is fixed (:meth:`chunk_ids`), so
    their retrieval is precomputed once. Batches are a function of (seed, step), hence resumable.
    """

    def __init__(self, documents: Sequence[str], tokenizer, seq_len: int, seed: int, chunk_size: int,
                 label_masks: Sequence[Sequence[bool] | None] | None = None, preceding_chunks: int = 0):
        if seq_len % chunk_size:
            raise ValueError(f"seq_len {seq_len} is not a multiple of chunk_size {chunk_size}")
        pad = tokenizer.pad_token_id
        ids: list[int] = []
        real: list[bool] = []
        for i, doc in enumerate(documents):
            tokens = encode_document(tokenizer, doc)
            labelled = label_masks[i] if label_masks is not None else None
            labelled = [True] * len(tokens) if labelled is None else labelled
            if len(labelled) != len(tokens):
                raise ValueError(f"label mask of document {i} has {len(labelled)} entries for {len(tokens)} tokens")
            fill = -len(tokens) % chunk_size
            ids += tokens + [pad] * fill
            real += list(labelled) + [False] * fill
        self.tokens = torch.tensor(ids, dtype=torch.long)
        self.real = torch.tensor(real, dtype=torch.bool)  # tokens that carry a label (loss)
        self.seq_len, self.seed, self.chunk_size = seq_len, seed, chunk_size
        self.n_chunks = len(self.tokens) // chunk_size
        self.window_chunks = seq_len // chunk_size
        self.preceding_chunks = preceding_chunks
        if self.n_chunks < self.window_chunks + preceding_chunks:
            raise ValueError("stream is shorter than one window and its preceding chunks")

    def chunk_ids(self) -> torch.Tensor:
        """(n_chunks, chunk_size): every chunk a window can contain."""
        return self.tokens.view(self.n_chunks, self.chunk_size)

    def batch(self, step: int, batch_size: int) -> Batch:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        p = self.preceding_chunks
        starts = torch.randint(p, self.n_chunks - self.window_chunks + 1, (batch_size,), generator=gen) * self.chunk_size
        window = torch.stack([self.tokens[s : s + self.seq_len] for s in starts.tolist()])
        real = torch.stack([self.real[s : s + self.seq_len] for s in starts.tolist()])
        preceding = None
        if p:
            before = torch.stack([self.tokens[s - p * self.chunk_size : s] for s in starts.tolist()])
            preceding = before.view(batch_size, p, self.chunk_size)
        return Batch(window, window.masked_fill(~real, -100), step, preceding)


# ------------------------------------------------------------------ retrieval per chunk


class ChunkRetriever:
    """Chunk token ids -> positions of the references it retrieves (after the overlap rule).

    Results are memoised by the chunk's token ids: the same chunk always gets the same
    references, and :meth:`precompute` fills the table for a whole stream in one embedding pass.
    ``excluded`` counts (chunk, reference) candidates dropped by the > 90 % overlap rule.
    """

    def __init__(self, index: ReferenceIndex, tokenizer, references_per_chunk: int = 1,
                 overlap_limit: float = TRAIN_OVERLAP_LIMIT):
        self.index = index
        self.tokenizer = tokenizer
        self.k = references_per_chunk
        self.overlap_limit = overlap_limit
        self.table: dict[tuple[int, ...], list[int]] = {}
        self.excluded = 0
        self.queries = 0

    def excludes(self, chunk_text: str, position: int) -> bool:
        """The paper's training rule: the reference must not be (> 90 %) restated in the chunk."""
        drop = token_overlap(self.index.texts[position], chunk_text) > self.overlap_limit
        self.excluded += drop
        return drop

    def _fill(self, chunks: list[tuple[int, ...]], cache: bool) -> None:
        todo = list(dict.fromkeys(c for c in chunks if c not in self.table))
        if not todo:
            return
        texts = [self.tokenizer.decode(list(c), skip_special_tokens=True) for c in todo]
        vectors = self.index.embed_queries(texts, cache=cache)
        for chunk, refs in zip(todo, self.index.search(texts, self.k, self.excludes, query_vectors=vectors)):
            self.table[chunk] = refs
        self.queries += len(todo)

    def precompute(self, chunk_ids: torch.Tensor) -> None:
        """Retrieve for every row of ``chunk_ids`` (n, chunk_size) at once; embeddings cached."""
        self._fill([tuple(r) for r in chunk_ids.tolist()], cache=True)

    def __call__(self, chunks: torch.Tensor) -> list[list[int]]:
        """(n, chunk_size) ids -> per chunk, the reference positions it retrieves (best first)."""
        keys = [tuple(r) for r in chunks.tolist()]
        self._fill(keys, cache=False)
        return [self.table[k] for k in keys]


# ------------------------------------------------------------------ injection per chunk


class ChunkMemoryInjector(MemoryInjector):
    """The SDK's injector, plus per-chunk visibility of memory slots for full-sequence forwards.

    :meth:`set_chunk_memories` takes, per row, per chunk, the memories that chunk may read. The
    row's distinct memories go to :meth:`MemoryInjector.set_memories` (one rotation to parallel
    positions, one K/V concatenation in front of the context, unchanged); in memory layers the
    mask the base injector built is then narrowed so that a query in chunk ``c`` sees only chunk
    ``c``'s slots. Everything else (hook, mask kinds, padding of rows, fingerprint check) is the
    base class's. Meant for training forwards over whole rows (queries at positions 0..T-1).
    """

    def __init__(self, model: torch.nn.Module, spec: MemorySpec, verify_fingerprint: bool = True):
        super().__init__(model, spec, verify_fingerprint)
        self._visible: torch.Tensor | None = None  # (batch, chunks, slots) bool
        self._chunk_size = 0
        self._narrowed: tuple | None = None  # (mask object, narrowed mask)

    def clear(self) -> None:
        super().clear()
        self._visible = None
        self._narrowed = None

    def set_chunk_memories(self, rows: Sequence[Sequence[Sequence[ExplicitMemory]]], chunk_size: int) -> None:
        union: list[list[ExplicitMemory]] = []
        slot_of: list[dict[int, int]] = []
        for row in rows:
            seen: dict[int, int] = {}
            members: list[ExplicitMemory] = []
            for chunk in row:
                for m in chunk:
                    if id(m) not in seen:
                        seen[id(m)] = len(members)
                        members.append(m)
            union.append(members)
            slot_of.append(seen)
        self.set_memories(union)
        if self._keys is None:
            return
        tokens = self.spec.tokens_per_head
        n_chunks = max(len(r) for r in rows)
        visible = torch.zeros(len(rows), n_chunks, self._valid.shape[1], dtype=torch.bool, device=self._valid.device)
        for b, row in enumerate(rows):
            for c, chunk in enumerate(row):
                for m in chunk:
                    start = slot_of[b][id(m)] * tokens
                    visible[b, c, start : start + tokens] = True
        self._visible, self._chunk_size, self._narrowed = visible, chunk_size, None

    def _narrow(self, mask: torch.Tensor, q_len: int) -> torch.Tensor:
        cached = self._narrowed
        if cached is not None and cached[0] is mask:
            return cached[1]
        slots = self._visible.shape[-1]
        per_query = self._visible.repeat_interleave(self._chunk_size, dim=1)
        if per_query.shape[1] != q_len:
            raise ValueError(f"chunk memories cover {per_query.shape[1]} positions, the forward has {q_len} queries")
        allowed = per_query[:, None]  # (batch, 1, q_len, slots)
        mem = mask[..., :slots]
        mem = mem & allowed if mem.dtype == torch.bool else mem.masked_fill(~allowed, torch.finfo(mem.dtype).min)
        out = torch.cat((mem.expand(-1, mask.shape[1], -1, -1) if mem.shape[1] != mask.shape[1] else mem,
                         mask[..., slots:].expand(mem.shape[0], -1, -1, -1)), dim=-1)
        self._narrowed = (mask, out)
        return out

    def _attend(self, base_fn, base_name, module, query, key, value, attention_mask, **kwargs):
        if self._visible is None or self._keys is None or self.spec.layer_slot(module.layer_idx) is None:
            return super()._attend(base_fn, base_name, module, query, key, value, attention_mask, **kwargs)

        def narrowed(mod, q, k, v, mask, **kw):
            return base_fn(mod, q, k, v, self._narrow(mask, q.shape[2]), **kw)

        return super()._attend(narrowed, base_name, module, query, key, value, attention_mask, **kwargs)


# ------------------------------------------------------------------ the stage


def chunk_reference_plan(retrieved: Sequence[Sequence[int]], previous_chunks: int, preceding: int = 0) -> list[list[int]]:
    """Per chunk of one row, the reference positions it reads: its own, then the previous chunks'
    (nearest first), each once. The first ``preceding`` entries of ``retrieved`` are chunks before
    the row's window: read by the window's chunks, planned for none."""
    plan = []
    for c in range(preceding, len(retrieved)):
        refs: dict[int, None] = {}
        for j in range(c, max(-1, c - previous_chunks - 1), -1):
            refs.update(dict.fromkeys(retrieved[j]))
        plan.append(list(refs))
    return plan


class RetrievalMemoryStage:
    """The stage-2 hooks: retrieval per chunk, encoding with the current weights, injection."""

    def __init__(self, ctx: TrainContext, stage: StageConfig, drill: MemoryDrill | None = None,
                 cache_dir=DEFAULT_CACHE_DIR, precompute: bool = True):
        config, world = ctx.config, ctx.world
        self.stage = stage
        self.spec = ctx.spec
        self.tokenizer = ctx.tokenizer
        if drill is None:
            offset = DRILL_SEED_OFFSET if stage.drill_seed_offset is None else stage.drill_seed_offset
            drill = memory_drill(world, seed_offset=offset)
        self.drill = drill
        train_refs = world.references_for(TRAIN)
        self.reference_texts = [r.text for r in train_refs] + list(self.drill.references)
        self.index = ReferenceIndex(self.reference_texts, cache_dir=cache_dir)
        self.retriever = ChunkRetriever(self.index, ctx.tokenizer, stage.references_per_chunk)
        docs = stage_documents(world, config.include_train_references, self.drill, config.seed)
        masks = None
        if ANSWER_ONLY_DRILL_LOSS:
            drills = set(self.drill.documents)
            masks = [drill_label_mask(ctx.tokenizer, d) if d in drills else None for d in docs]
        preceding = stage.previous_chunks if PREVIOUS_CHUNKS_ACROSS_WINDOWS else 0
        self.stream = ChunkAlignedStream(docs, ctx.tokenizer, config.seq_len, config.seed + 1, stage.chunk_size, masks,
                                         preceding)
        if precompute:
            self.retriever.precompute(self.stream.chunk_ids())
        self.encoder = MemoryEncoder(ctx.model, ctx.tokenizer, ctx.spec, batch_size=64)
        self.injector = ChunkMemoryInjector(ctx.model, ctx.spec)
        self.round_trip = None  # quantization-aware reading: memories as a PQ codebook returns them
        if stage.pq_bytes:
            self.round_trip = CodebookRoundTrip(self.encoder, sample_references(world, stage.pq_sample),
                                                stage.pq_bytes, stage.pq_quantizer, stage.pq_refresh)

    def plan(self, batch: Batch) -> list[list[list[int]]]:
        """[row][chunk] -> reference positions (into ``reference_texts``) that chunk reads."""
        chunks = batch.chunks(self.stage.chunk_size).cpu()
        p = 0 if batch.preceding is None else batch.preceding.shape[1]
        if p:  # the window's first chunks also read the references of the chunks before it
            chunks = torch.cat((batch.preceding.cpu(), chunks), dim=1)
        b, n, size = chunks.shape
        retrieved = self.retriever(chunks.reshape(b * n, size))
        return [chunk_reference_plan(retrieved[r * n : (r + 1) * n], self.stage.previous_chunks, p) for r in range(b)]

    def chunk_memories(self, model: torch.nn.Module, batch: Batch) -> ChunkMemories:
        plan = self.plan(batch)
        distinct = sorted({p for row in plan for chunk in row for p in chunk})
        trainable = ENCODE_WITH_GRAD and torch.is_grad_enabled()
        encode = self.encoder.encode_differentiable if trainable else self.encoder.encode
        encoded = encode([self.reference_texts[p] for p in distinct]) if distinct else []
        if self.round_trip is not None:
            encoded = self.round_trip(encoded)
        memory = dict(zip(distinct, encoded))
        return [[[memory[p] for p in chunk] for chunk in row] for row in plan]

    @contextlib.contextmanager
    def inject(self, model: torch.nn.Module, memories: ChunkMemories, batch: Batch):
        with self.injector:
            self.injector.set_chunk_memories(memories, self.stage.chunk_size)
            yield self.injector

    def hooks(self) -> MemoryHooks:
        return MemoryHooks(self.chunk_memories, self.inject, position_offset=0, stream=self.stream)


def retrieval_stage(ctx: TrainContext, stage: StageConfig) -> MemoryHooks:
    """``memory: retrieval``: the paper's stage 2 (see the module docstring)."""
    return RetrievalMemoryStage(ctx, stage).hooks()


register_memory_stage("retrieval", retrieval_stage)


# ------------------------------------------------------------------ does memory feed the answers?


def answer_token_mask(tokenizer, documents: Sequence[str]) -> tuple[list[list[int]], list[list[bool]]]:
    """Token ids (BOS + document) and, per token, whether it is part of an answer ("A: <here>").

    Answers are the reference-dependent tokens of a drill: predictable only from the entity's
    reference. Found through the fast tokenizer's character offsets, so the ids are exactly the
    document's own tokenization.
    """
    ids_out, mask_out = [], []
    for doc in documents:
        enc = tokenizer(doc, return_offsets_mapping=True)
        spans, start = [], 0
        for line in doc.split("\n"):
            if line.startswith("A: "):
                spans.append((start + 3, start + len(line)))
            start += len(line) + 1
        mask = [any(s < b and e > a for a, b in spans) and e > s for s, e in enc["offset_mapping"]]
        ids_out.append(list(enc["input_ids"]))
        mask_out.append(mask)
    return ids_out, mask_out


def drill_label_mask(tokenizer, document: str) -> list[bool]:
    """Per token of ``encode_document(document)``: does the stage-2 loss count it?

    Only a drill's answer tokens, plus the token right after each answer (the newline, or EOS):
    the question lines (mostly a random entity name) are unpredictable noise that would drown
    the few tokens memory can actually help with, and the token after an answer teaches where
    the answer stops (exact match reads the answer up to the newline).
    """
    _, (mask,) = answer_token_mask(tokenizer, [document])
    mask = list(mask) + [False]  # encode_document appends EOS
    for i in range(len(mask) - 2, -1, -1):
        if mask[i] and not mask[i + 1]:
            mask[i + 1] = True
    return mask


@torch.no_grad()
def answer_loss(model: torch.nn.Module, tokenizer, spec: MemorySpec, documents: Sequence[str],
                references: Sequence[Sequence[str]] | None = None, batch_size: int = 32,
                memories: Sequence[Sequence[ExplicitMemory]] | None = None) -> float:
    """Mean next-token loss on the answer tokens of ``documents``; with ``references`` (per
    document) their memories, encoded by ``model`` now, are injected through the SDK's injector;
    ``memories`` (per document) injects given memories instead (e.g. after a codec round trip).

    The measure of "stage 2 really feeds memories": on drills about entities the weights never
    saw, the loss with the right reference in memory must fall below the loss without it.
    """
    if references is not None and memories is not None:
        raise ValueError("pass references or memories, not both")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids, masks = answer_token_mask(tokenizer, documents)
    encoder = MemoryEncoder(model, tokenizer, spec) if references is not None else None
    per_document = memories
    total, count = 0.0, 0
    try:
        for i in range(0, len(ids), batch_size):
            rows, row_masks = ids[i : i + batch_size], masks[i : i + batch_size]
            width = max(len(r) for r in rows)
            pad = tokenizer.pad_token_id
            input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
            attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
            target = torch.tensor([m + [False] * (width - len(m)) for m in row_masks], device=device)
            rows_memories = per_document[i : i + batch_size] if per_document is not None else None
            if encoder is not None:
                refs = references[i : i + batch_size]
                encoded = iter(encoder.encode([t for row in refs for t in row]))
                rows_memories = [[next(encoded) for _ in row] for row in refs]
            injector = MemoryInjector(model, spec) if rows_memories is not None else None
            with injector if injector is not None else contextlib.nullcontext():
                if injector is not None:
                    injector.set_memories(rows_memories)
                logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                       input_ids[:, 1:].reshape(-1), reduction="none")
            keep = target[:, 1:].reshape(-1)
            total += float(losses[keep].sum())
            count += int(keep.sum())
    finally:
        model.train(was_training)
    return total / max(1, count)
