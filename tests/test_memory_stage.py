"""Stage 2 (continual training with memory): the overlap rule, per-chunk injection that keeps
autograd intact, memories that really feed the answers, and resumable checkpoints.

Real tokenizer, real models, real MiniLM retrieval; no mocks. Embeddings are cached under
~/.cache/memory3/embeddings, so reruns are faster than the first run.
"""

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from memory3.sdk.memory.encoder import MemoryEncoder
from memory3.sdk.memory.injection import MemoryInjector
from memory3.trainer.corpus import KINDS, TRAIN, TRAIN_OVERLAP_LIMIT, distinctive_words, token_overlap
from memory3.trainer.config import DrillConfig
from memory3.trainer.memory_stage import (ChunkAlignedStream, ChunkRetriever, answer_loss, chunk_reference_plan,
                                          chunk_visibility, drill_label_mask, entity_qa_document, memory_drill,
                                          stage_documents)
from memory3.trainer.model import build_model, default_memory_spec, load_reference_model
from memory3.trainer.pretrain import run_training, training_documents
from memory3.trainer.retrieval_index import ReferenceIndex
from memory3.trainer.tokenizer import encode_document

from helpers import small_world_and_tokenizer, two_stage_config

torch.set_num_threads(1)
@pytest.fixture(scope="module")
def small_world():
    world, tokenizer = small_world_and_tokenizer()
    return world, tokenizer


def test_overlap_rule_drops_references_restated_in_the_chunk(small_world):
    world, tokenizer = small_world
    texts = [r.text for r in world.references[:12]]
    index = ReferenceIndex(texts)
    retriever = ChunkRetriever(index, tokenizer, references_per_chunk=1)
    restated = texts[3]  # the chunk *is* reference 3: overlap 1.0 > 0.9
    partial = " ".join(restated.split()[: len(restated.split()) // 2])  # half of it: kept
    assert token_overlap(restated, restated) > TRAIN_OVERLAP_LIMIT
    assert token_overlap(restated, partial) <= TRAIN_OVERLAP_LIMIT
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:64] for t in (restated, partial)]
    ids = [i + [tokenizer.pad_token_id] * (64 - len(i)) for i in ids]
    got = retriever(torch.tensor(ids))
    assert got[0] and got[0][0] != 3  # best match excluded, the next one served
    assert got[1] == [3]  # the same reference, not restated: retrieved
    assert retriever.excluded >= 1


def test_chunk_plan_reads_own_and_previous_four_references():
    retrieved = [[10], [11], [12], [13], [14], [15]]
    plan = chunk_reference_plan(retrieved, previous_chunks=4)
    assert plan[0] == [10] and plan[1] == [11, 10]
    assert plan[5] == [15, 14, 13, 12, 11]  # own + previous 4; chunk 0's dropped
    assert chunk_reference_plan([[1], [1], [2]], 4)[2] == [2, 1]  # a repeated reference counts once
    # with the 2 chunks before the window: the window's first chunk reads them too
    assert chunk_reference_plan(retrieved, previous_chunks=4, preceding=2) == [[12, 11, 10], [13, 12, 11, 10],
                                                                               [14, 13, 12, 11, 10], plan[5]]


def test_stream_windows_carry_the_chunks_before_them(small_world):
    """With ``preceding_chunks`` every window starts after that many chunks and carries them, so a
    window's first chunk also has previous chunks to read; without, batches are as before."""
    world, tokenizer = small_world
    docs = [r.text for r in world.references[:40]]
    plain = ChunkAlignedStream(docs, tokenizer, seq_len=128, seed=1, chunk_size=16)
    carried = ChunkAlignedStream(docs, tokenizer, seq_len=128, seed=1, chunk_size=16, preceding_chunks=4)
    assert plain.batch(0, 8).preceding is None
    for step in range(3):
        batch = carried.batch(step, 8)
        assert batch.preceding.shape == (8, 4, 16)
        for row, before in zip(batch.input_ids, batch.preceding):
            start = next(s for s in range(4 * 16, len(carried.tokens), 16)
                         if torch.equal(carried.tokens[s : s + 128], row) and torch.equal(carried.tokens[s - 64 : s], before.flatten()))
            assert start >= 64


def test_chunk_visibility_lists_each_rows_memories_once_and_shows_each_chunk_its_own():
    a, b, c = object(), object(), object()  # only identity matters
    union, visible = chunk_visibility([[[a], [b, a]], [[c], []]], chunk_size=3)
    assert union == [[a, b], [c]]
    assert visible.dtype == torch.bool and visible.shape == (2, 6, 2)
    assert visible[0, :3].tolist() == [[True, False]] * 3 and visible[0, 3:].tolist() == [[True, True]] * 3
    assert visible[1, :3].tolist() == [[True, False]] * 3 and not visible[1, 3:].any()
    union, visible = chunk_visibility([[[], []]], chunk_size=4)
    assert union == [[]] and visible.shape == (1, 8, 0)


def test_chunk_visibility_matches_chunk_by_chunk_decoding_and_keeps_autograd(small_world):
    """One full-row forward with per-chunk memories (the injector's ``visible`` argument, built by
    :func:`chunk_visibility`) computes what a chunk-by-chunk forward computes (each chunk with its
    own memories set, earlier chunks in the KV cache: the decoding semantics), and the training
    loss still backpropagates (memories are constants)."""
    world, tokenizer = small_world
    model = build_model("tiny", len(tokenizer), seed=0)
    spec = default_memory_spec(model, (2, 3), tokens_per_head=8)
    a, b = MemoryEncoder(model, tokenizer, spec).encode([world.references[0].text, world.references[1].text])
    ids = torch.randint(5, len(tokenizer), (1, 128), generator=torch.Generator().manual_seed(0))
    model.eval()
    chunked = MemoryInjector(model, spec)
    union, visible = chunk_visibility([[[a], [b, a]]], chunk_size=64)
    with torch.no_grad():
        with chunked:
            chunked.set_memories(union, visible=visible)
            logits = model(input_ids=ids).logits
        cache = DynamicCache()
        with MemoryInjector(model, spec) as plain:
            plain.set_memories([[a]])
            first = model(input_ids=ids[:, :64], cache=cache, use_cache=True).logits
            plain.set_memories([[b, a]])
            second = model(input_ids=ids[:, 64:], cache=cache, use_cache=True,
                           position_ids=torch.arange(64, 128)[None]).logits
            plain.set_memories([[a]])
            only_a = model(input_ids=ids).logits
    torch.testing.assert_close(logits[:, :64], first, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits[:, 64:], second, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(only_a[:, 64:], second, atol=1e-4)  # chunk 1 really reads b

    model.train()
    with chunked:
        chunked.set_memories(union, visible=visible)
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    q_grad = model.model.layers[3].self_attn.q_proj.weight.grad
    assert q_grad is not None and q_grad.abs().sum() > 0  # reading memory is trained
    assert not a.kv.requires_grad


def test_differentiable_encoding_matches_encode_and_trains_the_encoding_side(small_world):
    """Stage 2's memories (``StageConfig.encode_with_grad``): the same tokens and numbers as ``encode``, but the
    reading loss reaches the weights that made the reference's keys and values."""
    world, tokenizer = small_world
    model = build_model("tiny", len(tokenizer), seed=0)
    spec = default_memory_spec(model, (2, 3), tokens_per_head=8)
    encoder = MemoryEncoder(model, tokenizer, spec)
    texts = [world.references[0].text, world.references[1].text]
    frozen = encoder.encode(texts)
    live = encoder.encode_differentiable(texts)
    for f, g in zip(frozen, live):
        assert torch.equal(f.positions, g.positions)
        torch.testing.assert_close(f.kv, g.kv.detach())
        assert g.kv.requires_grad and not f.kv.requires_grad
    assert not encoder.encode(texts)[0].kv.requires_grad  # the flag does not leak
    live[0].kv.sum().backward(retain_graph=True)  # the memory is a function of the weights
    assert model.model.layers[2].self_attn.k_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.v_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[3].self_attn.q_proj.weight.grad is None  # stops after the last memory layer
    model.zero_grad()
    ids = torch.randint(5, len(tokenizer), (1, 64), generator=torch.Generator().manual_seed(0))
    with MemoryInjector(model, spec) as injector:  # the injection path carries that gradient
        union, visible = chunk_visibility([[live]], chunk_size=64)
        injector.set_memories(union, visible=visible)
        loss = model(input_ids=ids, labels=ids).loss
    (grad,) = torch.autograd.grad(loss, live[0].kv)
    assert grad.abs().sum() > 0


def test_answer_loss_reads_given_memories_like_encoded_references(small_world):
    """``answer_loss(memories=...)`` (the codec QA bench's path) injects exactly what passing the
    references would encode; a different memory changes the loss; passing both is refused."""
    world, tokenizer = small_world
    model = build_model("tiny", len(tokenizer), seed=0).eval()
    spec = default_memory_spec(model, (2, 3), tokens_per_head=8)
    entities = world.entities[:4]
    import random

    rng = random.Random(0)
    docs = [entity_qa_document(e, rng) for e in entities]
    refs = [[world.references[e.id].text] for e in entities]
    encoded = MemoryEncoder(model, tokenizer, spec).encode([r for (r,) in refs])
    by_references = answer_loss(model, tokenizer, spec, docs, refs, batch_size=3)
    by_memories = answer_loss(model, tokenizer, spec, docs, batch_size=3, memories=[[m] for m in encoded])
    assert by_memories == pytest.approx(by_references, rel=1e-5)
    swapped = answer_loss(model, tokenizer, spec, docs, batch_size=3, memories=[[m] for m in encoded[::-1]])
    assert swapped != pytest.approx(by_references, rel=1e-5)
    with pytest.raises(ValueError, match="not both"):
        answer_loss(model, tokenizer, spec, docs, refs, memories=[[m] for m in encoded])


def test_memory_drills_never_state_main_world_facts_and_other_offsets_drill_other_entities(small_world):
    """No drill entity shares a distinctive name word with the main world, so no main-world fact is
    ever trained on; name-valued facts are drill-world names or *borrowed* main-world train names
    (never a held-out one); every kind is drilled; a later stage's ``drill_seed_offset`` drills
    entities the first never saw."""
    world, _ = small_world
    taken = set().union(*(distinctive_words(e.name) for e in world.entities)) | {c.lower() for c in world.countries}
    borrowable = {e.name for e in world.entities if e.split == TRAIN} | set(world.countries)
    first = memory_drill(world, n_entities=200)
    second = memory_drill(world, n_entities=200, seed_offset=15887)
    for drill in (first, second):
        assert drill.entities and len(drill.documents) == len(drill.entities) == len(drill.references)
        assert {e.kind for e in drill.entities} == set(KINDS)
        borrowed = 0
        for e, reference in zip(drill.entities, drill.references):
            assert not distinctive_words(e.name) & taken, e.name
            for value in e.facts.values():
                assert value in reference
                if value in borrowable:
                    borrowed += 1
                else:
                    assert not distinctive_words(value) & taken, (e.name, value)
        assert borrowed > 0.2 * len(drill.entities)
    shared = {e.name for e in first.entities} & {e.name for e in second.entities}
    assert len(shared) <= 0.1 * len(second.entities), shared
    unborrowed = memory_drill(world, DrillConfig(borrowed_value_fraction=0.0), n_entities=200)
    assert not any(v in borrowable for e in unborrowed.entities for v in e.facts.values())


def test_in_context_drills_can_show_same_kind_distractor_references(small_world):
    world, _ = small_world
    drill = memory_drill(world, DrillConfig(in_context_fraction=1.0, in_context_distractors=2), n_entities=200)
    kind_of = dict(zip(drill.references, (e.kind for e in drill.entities)))
    with_distractors = 0
    for doc, entity, reference in zip(drill.documents, drill.entities, drill.references):
        shown = [line.removeprefix("Reference: ") for line in doc.split("\n") if line.startswith("Reference: ")]
        assert reference in shown and len(shown) == len(set(shown)) <= 3
        assert all(kind_of[r] == entity.kind for r in shown)
        with_distractors += len(shown) == 3
    assert with_distractors >= len(drill.documents) - 2 * len(KINDS)


def test_stage_documents_keep_drills_in_sheets_of_one_kind(small_world):
    """Stage 2's stream has every stage-1 document and every drill once; drills come in runs of
    ``sheet_size`` about one kind of entity, so a chunk's previous chunks read same-kind references."""
    world, _ = small_world
    drill = memory_drill(world, n_entities=200)
    kind_of = dict(zip(drill.documents, drill.document_kinds))
    docs = stage_documents(world, True, drill, seed=3, sheet_size=4)
    assert sorted(docs) == sorted(training_documents(world, True) + drill.documents)
    sheets = drill.sheets(4, seed=3)
    assert all(len(sheet) <= 4 and len({kind_of[d] for d in sheet}) == 1 for sheet in sheets)
    assert sum(len(sheet) == 4 for sheet in sheets) >= len(drill.documents) // 4 - len(KINDS)
    position = {doc: i for i, doc in enumerate(docs)}
    for sheet in sheets:  # each sheet is one contiguous run of the stream
        start = position[sheet[0]]
        assert docs[start : start + len(sheet)] == sheet
    assert stage_documents(world, True, drill, seed=3, sheet_size=4) == docs


def test_drill_label_mask_counts_answers_and_the_token_after():
    world, tokenizer = small_world_and_tokenizer()
    doc = "Q: Where was Tom born?\nA: Brask\nQ: What did Tom do?\nA: painter"
    ids = encode_document(tokenizer, doc)
    mask = drill_label_mask(tokenizer, doc)
    assert len(mask) == len(ids) and mask[-1]  # EOS after the last answer
    labelled = tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
    assert labelled.replace(" ", "") == "Brask\npainter"


@pytest.mark.slow  # minutes of training on 2 cores: `make test-fast` skips it
def test_stage2_feeds_memories(tmp_path):
    """A small two-stage run (~3 minutes): after stage 2 the loss on reference-dependent tokens
    (drill answers about entities no training text states) is lower with the reference in memory
    than without it, and lower than the stage-1 model's.

    Sized by measurement (this config, a checkpoint every 100 steps): with vs without memory
    3.32 / 3.33 nats after 100 stage-2 steps, 2.11 / 2.35 after 500, 1.66 / 2.24 after 1000 (the
    end of this run: 0.57 nats, about twice the 0.3 asserted; the stage-1 model: 9.27); a
    2000-step stage 2 reached 1.31 / 2.10. Earlier sizes (60 + 160 or 400 steps, 8 tokens per
    head) left no gap (3.85 / 3.88, 2.43 / 2.45)."""
    config = two_stage_config(tmp_path / "run", stage1=300, stage2=1000, checkpoint_interval=300, keep_checkpoints=10,
                              memory_layers=[0, 1, 2, 3], tokens_per_head=16)  # the recipe's memory (tiny.yaml)
    result = run_training(config)
    assert result.finished and [r["stage"] for r in result.history][-1] == "memory"
    model, tokenizer, spec = load_reference_model(result.model_dir)
    assert spec.memory_layers == (0, 1, 2, 3)

    import random

    from memory3.trainer.pretrain import prepare
    world = prepare(config)[0]
    drill = memory_drill(world, config.drill)
    rng = random.Random(5)
    picks = rng.sample(range(len(drill.entities)), 48)
    docs = [entity_qa_document(drill.entities[i], rng) for i in picks]
    refs = [[drill.references[i]] for i in picks]
    with_memory = answer_loss(model, tokenizer, spec, docs, refs)
    without = answer_loss(model, tokenizer, spec, docs)

    ckpt = torch.load(Path(result.out_dir) / "checkpoints" / "ckpt_000300.pt", weights_only=False)
    model1, _, _ = load_reference_model(result.model_dir)
    model1.load_state_dict(ckpt["model"])
    stage1_loss = answer_loss(model1, tokenizer, spec, docs)
    assert with_memory < without - 0.3, (with_memory, without)
    assert with_memory < stage1_loss, (with_memory, stage1_loss)


def test_stage2_checkpoint_resume_is_exact(tmp_path):
    straight = run_training(two_stage_config(tmp_path / "a", stage1=3, stage2=4, checkpoint_interval=5))
    partial = run_training(two_stage_config(tmp_path / "b", stage1=3, stage2=4, checkpoint_interval=5), stop_at=5)
    assert not partial.finished and partial.history[-1]["stage"] == "memory"
    resumed = run_training(two_stage_config(tmp_path / "b", stage1=3, stage2=4, checkpoint_interval=5))
    assert resumed.finished and resumed.steps == 7
    a, _, _ = load_reference_model(straight.model_dir)
    b, _, _ = load_reference_model(resumed.model_dir)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert [r["loss"] for r in straight.history] == pytest.approx([r["loss"] for r in resumed.history])
