"""QA loss per codec scheme: the reference model answering from compressed memories.

Why: the codec's storage ratios only count if the model still reads the facts. The paper's
14-byte OPQ-PQ cost it under 0.5 point of QA accuracy; the ">= 500x" setting must not lose more.
This script takes a trained reference model (``runs/reference-tiny`` by default), encodes its
world's memory bank once, round-trips every memory through each scheme (encode_memory ->
decode_memory, PQ codebooks trained on the bank itself, as a bank's would be), and measures
held-out and train QA exact match in memory mode on the same questions and retrieved references
(:func:`memory3.trainer.evaluate.evaluate_qa`). The baseline is the same bank uncompressed, in
the same run; each scheme's loss is printed in points beside it. Exact match on ~130 questions
moves in steps of ~0.8 point, so a smoother figure sits beside it: the mean loss (nats) on the
held-out answer tokens with the question's own reference in memory
(:func:`memory3.trainer.memory_stage.answer_loss`), and the same without memory for scale.

PQ settings are matched to the Memory3 shape by *bits per dimension*: the paper's 14 bytes per
80-d vector is 1.4 bits/dim, the >= 500x setting (pq9 in bench_codec.py) 0.9 bits/dim; at this
model's head dimension D that is round(14 D / 80) and round(9 D / 80) bytes per vector.

Usage: python bench/bench_codec_qa.py [RUN_DIR] [--kmeans-iters N]
Writes bench/results/codec_qa.md.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

from memory3.sdk.codec import decode_memory, encode_memory
from memory3.sdk.pq import train_codebook
from memory3.trainer.config import TrainConfig
from memory3.trainer.corpus import HELDOUT, TRAIN, build_world, format_qa
from memory3.trainer.evaluate import encode_memory_bank, evaluate_qa
from memory3.trainer.memory_stage import answer_loss
from memory3.trainer.model import load_reference_model
from memory3.trainer.retrieval_index import ReferenceIndex

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_BITS, BEYOND_BITS = 14 / 80, 9 / 80  # bytes per dimension of the two PQ settings
MAX_LOSS_PT = 0.5


def dense_bf16_bytes(model, reference_length: int) -> int:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * config.num_key_value_heads * reference_length * head_dim * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("run_dir", nargs="?", default="runs/reference-tiny")
    parser.add_argument("--kmeans-iters", type=int, default=25)
    parser.add_argument("--opq-iters", type=int, default=0, help="OPQ rotation updates (0: PCA rotation only)")
    parser.add_argument("--train-questions", type=int, default=130)
    args = parser.parse_args()

    run_dir = Path(args.run_dir)
    config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    torch.manual_seed(0)
    model, tokenizer, spec = load_reference_model(run_dir / "model")
    world = build_world(config.world.seed, config.world.n_entities, config.world.heldout_fraction,
                        passages_per_entity=config.world.passages_per_entity)
    texts = [r.text for r in world.references]
    index = ReferenceIndex(texts)
    bank, _ = encode_memory_bank(model, tokenizer, spec, texts)
    splits = {HELDOUT: world.qa(HELDOUT)}
    train_pairs = world.qa(TRAIN)
    splits[TRAIN] = random.Random(0).sample(train_pairs, min(args.train_questions, len(train_pairs)))

    dim = spec.head_dim
    settings = [("uncompressed", None, None), ("fp16", "fp16", None), ("int8", "int8", None), ("int4", "int4", None),
                (f"pq{round(PAPER_BITS * dim)} (paper's 1.4 bits/dim)", "pq", round(PAPER_BITS * dim)),
                (f"pq{round(BEYOND_BITS * dim)} (>= 500x setting, 0.9 bits/dim)", "pq", round(BEYOND_BITS * dim))]
    dense = dense_bf16_bytes(model, spec.reference_length)
    heldout_docs = [format_qa(p.question, p.answer) for p in splits[HELDOUT]]
    no_memory_nll = answer_loss(model, tokenizer, spec, heldout_docs)
    rows = []
    for label, scheme, m in tqdm(settings, desc="schemes"):
        if scheme is None:
            decoded, size = bank, float("nan")
        else:
            codebook = train_codebook(bank, m, version=1, kmeans_iters=args.kmeans_iters,
                                      opq_iters=args.opq_iters) if scheme == "pq" else None
            blobs = [encode_memory(mem, scheme, codebook) for mem in bank]
            decoded = [decode_memory(b, codebook=codebook) for b in blobs]
            size = sum(map(len, blobs)) / len(blobs)
        scores = {}
        for split, pairs in splits.items():
            ev = evaluate_qa(model, tokenizer, spec, world, pairs, index, decoded, modes=("memory",), split=split)
            scores[split] = (ev.modes["memory"].correct, ev.modes["memory"].questions)
        nll = answer_loss(model, tokenizer, spec, heldout_docs,
                          memories=[[decoded[p.entity_id]] for p in splits[HELDOUT]])
        rows.append((label, size, scores, nll))

    base = rows[0][2]
    lines = [
        "# QA exact match from compressed memories",
        "",
        f"Generated by `python bench/bench_codec_qa.py {args.run_dir}`. Model: {run_dir / 'model'}, memory layers "
        f"{list(spec.memory_layers)}, {spec.kv_heads} KV heads x {spec.tokens_per_head} tokens x head dim {dim}; "
        f"dense bf16 KV of a whole {spec.reference_length}-token reference: {dense:,} bytes. "
        f"Baseline: the same bank uncompressed, same questions and references. Target: loss <= {MAX_LOSS_PT} pt. "
        f"Answer NLL: held-out answer tokens, own reference in memory (no memory: {no_memory_nll:.3f} nats).",
        "",
        "| scheme | bytes/memory | vs dense bf16 | held-out EM | loss (pt) | train EM | loss (pt) | answer NLL (nats) "
        "| vs uncompressed | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    base_nll = rows[0][3]
    for label, size, scores, nll in rows:
        cells = []
        losses = []
        for split in (HELDOUT, TRAIN):
            correct, total = scores[split]
            loss = 100 * (base[split][0] - correct) / total
            losses.append(loss)
            cells += [f"{100 * correct / total:.1f}% ({correct}/{total})", f"{loss:+.1f}"]
        ratio = "" if size != size else f"{dense / size:.1f}x"
        verdict = "" if size != size else ("met" if max(losses) <= MAX_LOSS_PT else "MISSED")
        lines.append(f"| {label} | {'' if size != size else f'{size:,.0f}'} | {ratio} | {' | '.join(cells)} "
                     f"| {nll:.3f} | {nll - base_nll:+.3f} | {verdict} |")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "codec_qa.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
