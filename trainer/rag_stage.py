"""The RAG twin's stage 2: the memory stage's steps and drills, references read as prompt text.

A fair RAG baseline must have learned to read retrieved text, as the memory model learned to read
memories. This stage (``memory: memory3.trainer.rag_stage:rag_stage``) trains on the memory stage's
documents and drills (:func:`~memory3.trainer.memory_stage.stage_documents`), and retrieves for
each document exactly as the memory stage does, chunk by chunk, with the same index and overlap
rule; the references its first :data:`CONTEXT_CHUNKS` chunks retrieve are written before it as
``Reference:`` lines — the layout the evaluation's RAG prompt uses. Those reference tokens carry
no loss (drills keep their answer-only loss), so the twin learns to answer from the text before
it, not to recite references. Same seed, steps, batch and window as the memory stage.
"""

from __future__ import annotations

import torch

from .config import StageConfig
from .corpus import TRAIN, format_reference
from .memory_stage import ChunkAlignedStream, ChunkRetriever, drill_label_mask, memory_drill, stage_documents
from .pretrain import MemoryHooks, TrainContext, register_memory_stage
from .retrieval_index import DEFAULT_CACHE_DIR, ReferenceIndex
from .tokenizer import encode_document

CONTEXT_CHUNKS = 2
"""A document's first chunks whose retrieved references are put before it (a drill's Q/A lines
fit in one or two chunks; the memory stage's chunks read their own and earlier chunks' memories)."""


def rag_documents(ctx: TrainContext, stage: StageConfig, cache_dir=DEFAULT_CACHE_DIR) -> tuple[list[str], list[list[bool]]]:
    """The stage's documents with their retrieved references before them, and per document the
    token label mask (for :func:`~memory3.trainer.tokenizer.encode_document`'s ids)."""
    config, world, tokenizer = ctx.config, ctx.world, ctx.tokenizer
    drill = memory_drill(world, config.drill, seed_offset=stage.drill_seed_offset)
    reference_texts = [r.text for r in world.references_for(TRAIN)] + list(drill.references)
    retriever = ChunkRetriever(ReferenceIndex(reference_texts, cache_dir=cache_dir), tokenizer,
                               stage.references_per_chunk)
    docs = stage_documents(world, config.include_train_references, drill, config.seed, config.drill.sheet_size)
    size, pad = stage.chunk_size, tokenizer.pad_token_id
    heads = []
    for doc in docs:
        ids = encode_document(tokenizer, doc)[: CONTEXT_CHUNKS * size]
        heads.append(torch.tensor(ids + [pad] * (-len(ids) % size)).view(-1, size))
    retriever.precompute(torch.cat(heads))
    drills = set(drill.documents)
    texts, masks = [], []
    for doc, head in zip(docs, heads):
        refs = list(dict.fromkeys(p for chunk in retriever(head) for p in chunk))
        context = "".join(format_reference(reference_texts[p]) + "\n" for p in refs)
        text = context + doc
        if config.drill.answer_only_loss and doc in drills:
            mask = drill_label_mask(tokenizer, text)
        else:
            offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
            mask = [start >= len(context) and end > start for start, end in offsets] + [True]  # + EOS
        texts.append(text)
        masks.append(mask)
    return texts, masks


def rag_stage(ctx: TrainContext, stage: StageConfig) -> MemoryHooks:
    """``memory: memory3.trainer.rag_stage:rag_stage``: the RAG twin's stage 2 (module docstring)."""
    texts, masks = rag_documents(ctx, stage)
    stream = ChunkAlignedStream(texts, ctx.tokenizer, ctx.config.seq_len, ctx.config.seed + 1, stage.chunk_size, masks)
    return MemoryHooks(chunk_memories=None, inject=None, position_offset=0, stream=stream)


register_memory_stage("rag", rag_stage)
