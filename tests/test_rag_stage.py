"""The RAG twin's stage 2: the memory stage's documents with their retrieved references as text.

Checks on a small world that each document is preceded by the references its first chunks
retrieve (in the evaluation's RAG layout), that only the document's own tokens carry loss (a drill:
its answers), that a drill usually gets its own entity's reference, and that no held-out reference
is ever put in training text.
"""

from __future__ import annotations

import torch

from memory3.trainer.config import DrillConfig
from memory3.trainer.corpus import HELDOUT, REFERENCE_MARKER
from memory3.trainer.memory_stage import drill_label_mask, memory_drill, stage_documents
from memory3.trainer.pretrain import TrainContext, run_training
from memory3.trainer.rag_stage import rag_documents

from helpers import small_world_and_tokenizer, two_stage_config

torch.set_num_threads(1)


def test_rag_documents_put_retrieved_references_before_each_document(tmp_path):
    world, tokenizer = small_world_and_tokenizer()
    config = two_stage_config(tmp_path, drill=DrillConfig(entities_per_entity=1, min_entities=40))
    stage = config.stages[1]
    ctx = TrainContext(config, world, tokenizer, None, None, torch.device("cpu"))
    texts, masks = rag_documents(ctx, stage)
    drill = memory_drill(world, config.drill)
    docs = stage_documents(world, config.include_train_references, drill, config.seed, config.drill.sheet_size)
    assert len(texts) == len(docs)
    heldout = [r.text for r in world.references_for(HELDOUT)]
    own = total = 0
    for text, mask, doc in zip(texts, masks, docs):
        assert text.endswith(doc) and text.startswith(REFERENCE_MARKER)
        context = text[: len(text) - len(doc)]
        assert all(line.startswith(REFERENCE_MARKER) for line in context.splitlines())
        assert not any(h in context for h in heldout)
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        assert len(mask) == len(ids)
        if doc in drill.documents:
            assert mask == drill_label_mask(tokenizer, text)
            if not doc.startswith(REFERENCE_MARKER):
                total += 1
                own += drill.references[drill.documents.index(doc)] in context
        else:
            labelled = tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
            assert labelled.strip() == tokenizer.decode(tokenizer(doc)["input_ids"], skip_special_tokens=True).strip()
    assert total and own / total >= 0.8, (own, total)


def test_the_rag_stage_trains_on_plain_loss_and_saves_the_stage_one_model(tmp_path):
    config = two_stage_config(tmp_path, stage1=3, stage2=3, drill=DrillConfig(entities_per_entity=1, min_entities=40))
    config.stages[1].memory = "memory3.trainer.rag_stage:rag_stage"
    result = run_training(config)
    assert result.finished and [r["stage"] for r in result.history][-1] == "memory"
    assert (tmp_path / "stages" / "warmup" / "model.safetensors").is_file()
    assert not (tmp_path / "stages" / "memory").exists()  # the last stage's model is model/
