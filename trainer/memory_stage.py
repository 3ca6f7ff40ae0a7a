"""Stage 2 of pretraining: continual training with explicit memory (Memory3 §3.4), registered
as ``memory: retrieval`` with :func:`memory3.trainer.pretrain.register_memory_stage`.

Each step: every ``chunk_size``-token chunk retrieves training references from an in-process
MiniLM index (pairs overlapping > ``TRAIN_OVERLAP_LIMIT`` dropped); the batch's references are
encoded into memories with the current weights (autograd on: ``StageConfig.encode_with_grad``);
chunk ``c`` reads its own and the previous ``previous_chunks`` chunks' memories through the SDK
injector's per-query ``visible`` mask (:func:`chunk_visibility`). The stream mixes stage 1's
documents with Q/A drills about a second world (:func:`memory_drill`, :class:`~memory3.trainer.config.DrillConfig`)
whose answers are only in references, so the model learns to read answers out of memory. With
``retriever_weight > 0`` the stage also trains the model's retrieval head on its chunks (InfoNCE,
:meth:`RetrievalMemoryStage.train_retriever`) and saves it beside the final model.

Measurements: docs/experiments.md
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from memory3.core.memory_spec import MemorySpec
from memory3.sdk.memory.encoder import MemoryEncoder
from memory3.sdk.memory.injection import MemoryInjector
from memory3.sdk.memory.retrieval_head import RetrievalHead
from memory3.sdk.model.fingerprint import model_fingerprint
from memory3.sdk.memory.tensors import ExplicitMemory

from .config import DrillConfig, StageConfig
from .corpus import (
    ATTRIBUTES,
    QUESTIONS,
    RELATIONS,
    TRAIN,
    TRAIN_OVERLAP_LIMIT,
    Entity,
    World,
    build_world,
    distinctive_words,
    format_qa,
    format_reference,
    render_reference,
    token_overlap,
)
from .pretrain import (
    Batch,
    ChunkMemories,
    MemoryHooks,
    TokenStream,
    TrainContext,
    register_memory_stage,
    training_documents,
)
from .quantization_aware import CodebookRoundTrip, sample_references
from .retrieval_index import DEFAULT_CACHE_DIR, ReferenceIndex
from .tokenizer import encode_document

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
        (``DrillConfig.sheet_size``)."""
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


def memory_drill(world: World, config: DrillConfig | None = None, n_entities: int | None = None,
                 seed_offset: int | None = None) -> MemoryDrill:
    """Q/A drills about a second world's entities, and their references (see module docstring).

    ``config`` defaults to :class:`~memory3.trainer.config.DrillConfig`'s defaults; ``n_entities``
    (drill entities generated) and ``seed_offset`` override what it derives. All entities of the
    drill world are used, whatever their split there: none of their facts is in the main world's
    training text. An entity is dropped when its name, or a value of its own world, shares a
    distinctive word (:func:`~memory3.trainer.corpus.distinctive_words`) with a main-world name, so
    a drill never states a main-world (possibly held-out) fact. A ``borrowed_value_fraction`` of
    the name-valued facts instead take a main-world *train* name or country: the drill entity is
    still fictional, so that is a fact about no main-world entity.
    """
    config = config or DrillConfig()
    n_entities = n_entities or max(config.min_entities, config.entities_per_entity * len(world.entities))
    seed_offset = config.seed_offset if seed_offset is None else seed_offset
    in_context_fraction = config.in_context_fraction
    borrowed_fraction = config.borrowed_value_fraction
    docs_per_entity = config.docs_per_entity
    drill_world = build_world(world.seed + seed_offset, n_entities, heldout_fraction=0.2, passages_per_entity=0,
                              qa_docs=0, filler_docs=0)
    taken = _name_words(world)
    borrowable = _borrowable_values(world)
    rng = random.Random(world.seed + seed_offset)
    distractor_rng = random.Random(world.seed + seed_offset + 1)
    distractors = config.in_context_distractors
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
                    sheet_size: int = DrillConfig.sheet_size) -> list[str]:
    """Stage 2's documents: stage 1's (pretrain's own list) plus the drills in sheets of
    ``sheet_size`` about one kind, shuffled as units."""
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


def chunk_visibility(rows: Sequence[Sequence[Sequence[ExplicitMemory]]],
                     chunk_size: int) -> tuple[list[list[ExplicitMemory]], torch.Tensor]:
    """Per-chunk memories -> what :meth:`MemoryInjector.set_memories` takes for a full-row forward.

    ``rows[b][c]``: the memories chunk ``c`` of row ``b`` may read. Returns each row's distinct
    memories (first appearance order; the same object counts once) and ``visible`` (bool,
    (batch, chunks * chunk_size, max distinct per row)): a query in chunk ``c`` reads exactly chunk
    ``c``'s memories. Rows with fewer chunks read nothing at the missing chunks' positions.
    """
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
    n_chunks = max((len(r) for r in rows), default=0)
    width = max((len(u) for u in union), default=0)
    per_chunk = torch.zeros(len(rows), n_chunks, width, dtype=torch.bool)
    for b, row in enumerate(rows):
        for c, chunk in enumerate(row):
            for m in chunk:
                per_chunk[b, c, slot_of[b][id(m)]] = True
    return union, per_chunk.repeat_interleave(chunk_size, dim=1)


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
            drill = memory_drill(world, config.drill, seed_offset=stage.drill_seed_offset)
        self.drill = drill
        train_refs = world.references_for(TRAIN)
        self.reference_texts = [r.text for r in train_refs] + list(self.drill.references)
        self.index = ReferenceIndex(self.reference_texts, cache_dir=cache_dir)
        self.retriever = ChunkRetriever(self.index, ctx.tokenizer, stage.references_per_chunk)
        docs = stage_documents(world, config.include_train_references, self.drill, config.seed,
                               config.drill.sheet_size)
        masks = None
        if config.drill.answer_only_loss:
            drills = set(self.drill.documents)
            masks = [drill_label_mask(ctx.tokenizer, d) if d in drills else None for d in docs]
        preceding = stage.previous_chunks if stage.previous_chunks_across_windows else 0
        self.stream = ChunkAlignedStream(docs, ctx.tokenizer, config.seq_len, config.seed + 1, stage.chunk_size, masks,
                                         preceding)
        if precompute:
            self.retriever.precompute(self.stream.chunk_ids())
        self.encoder = MemoryEncoder(ctx.model, ctx.tokenizer, ctx.spec, batch_size=64)
        self.injector = MemoryInjector(ctx.model, ctx.spec)
        self.head = self.head_optimizer = None  # the model's retrieval head, when the stage trains one
        self.retriever_losses: list[float] = []
        if stage.retriever_weight > 0:
            self.head = RetrievalHead.for_model(ctx.model, stage.retriever_dim, seed=config.seed).to(ctx.device)
            self.head_optimizer = torch.optim.Adam(self.head.parameters(), lr=stage.retriever_lr)
            self.reference_ids = self.encoder.tokenize(self.reference_texts)
            self.special_ids = set(ctx.tokenizer.all_special_ids)
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
        if self.head is not None and torch.is_grad_enabled():
            self.train_retriever(model, batch)
        plan = self.plan(batch)
        distinct = sorted({p for row in plan for chunk in row for p in chunk})
        trainable = self.stage.encode_with_grad and torch.is_grad_enabled()
        encode = self.encoder.encode_differentiable if trainable else self.encoder.encode
        encoded = encode([self.reference_texts[p] for p in distinct]) if distinct else []
        if self.round_trip is not None:
            encoded = self.round_trip(encoded)
        memory = dict(zip(distinct, encoded))
        return [[[memory[p] for p in chunk] for chunk in row] for row in plan]

    @contextlib.contextmanager
    def inject(self, model: torch.nn.Module, memories: ChunkMemories, batch: Batch):
        with self.injector:
            union, visible = chunk_visibility(memories, self.stage.chunk_size)
            self.injector.set_memories(union, visible=visible)
            yield self.injector

    def train_retriever(self, model: torch.nn.Module, batch: Batch) -> float | None:
        """One step of the retrieval head on this batch (stage config ``retriever_weight``): each
        chunk's query (its tokens, special ones out, as decoding makes it) against the key of the
        reference it retrieved, the batch's other retrieved references as negatives (a sheet of
        drills about one kind gives same-kind ones). The model's states are read detached, and the
        head has its own optimizer: the model's loss and update are untouched."""
        from .retriever import info_nce

        size = self.stage.chunk_size
        chunks = batch.chunks(size).cpu().reshape(-1, size)
        queries, positives = [], []
        for ids, refs in zip(chunks.tolist(), self.retriever(chunks)):
            kept = [t for t in ids if t not in self.special_ids]
            if kept and refs:
                queries.append(kept)
                positives.append(refs[0])
        distinct = list(dict.fromkeys(positives))
        if len(distinct) < 2:  # nothing to tell apart
            return None
        slot = {p: i for i, p in enumerate(distinct)}
        prefix = len(self.encoder.prefix_ids)
        head = self.head.train()
        q = head.keys_of(model, queries, detach_states=True)
        k = head.keys_of(model, [self.reference_ids[p] for p in distinct], [prefix] * len(distinct), detach_states=True)
        loss = self.stage.retriever_weight * info_nce(head, q, k, torch.tensor([slot[p] for p in positives],
                                                                              device=q.device))
        self.head_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.head_optimizer.step()
        self.retriever_losses.append(float(loss.detach()))
        return self.retriever_losses[-1]

    def head_state(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.head_optimizer.state_dict(),
                "losses": list(self.retriever_losses)}

    def load_head_state(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.head_optimizer.load_state_dict(state["optimizer"])
        self.retriever_losses = list(state.get("losses", []))

    def save_head(self, model: torch.nn.Module, model_dir) -> None:
        """The head, bound to the final model's fingerprint (it trained beside those weights)."""
        final = RetrievalHead(replace(self.head.config, model_fingerprint=model_fingerprint(model)), seed=None)
        final.load_state_dict(self.head.state_dict())
        final.save(model_dir)

    def hooks(self) -> MemoryHooks:
        extras = {}
        if self.head is not None:
            extras = {"extra_state": self.head_state, "load_extra_state": self.load_head_state,
                      "on_model_saved": self.save_head}
        return MemoryHooks(self.chunk_memories, self.inject, position_offset=0, stream=self.stream, **extras)


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
