"""QA loss per codec scheme: the reference model answering from compressed memories.

The codec's storage ratios only count if the model still reads the facts. This encodes a trained
reference model's memory bank once, round-trips every memory through each scheme, and measures
held-out and train QA exact match in memory mode (top-5, and top-1 for held-out questions) and the
held-out answer loss, against the same bank uncompressed in the same run. PQ codebooks are trained
on memories of another generated world (as a bank's are on a sample), and PQ bytes match the Memory3
setting in bits per dimension. ``--baseline-run`` adds a second baseline for a model trained to read
coded memories.

Usage: python bench/bench_codec_qa.py [RUN_DIR] [--baseline-run RUN_DIR] [--kmeans-iters N] [--name NAME]
Writes bench/results/NAME.md (default ``codec_qa``).
Measurements: docs/experiments.md ("Codec QA on the reference model", "Quantization-aware reading").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from memory3.sdk.memory.codec import decode_memory, encode_memory
from memory3.sdk.memory.pq import train_codebook
from memory3.sdk.model.positions import probe_geometry
from memory3.trainer.corpus import HELDOUT, TRAIN, format_qa
from memory3.trainer.evaluate import RunUnderTest, encode_memory_bank, evaluate_qa
from memory3.trainer.memory_stage import answer_loss
from memory3.trainer.quantization_aware import sample_references

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_BITS, BEYOND_BITS = 14 / 80, 9 / 80  # bytes per dimension of the two PQ settings
MAX_LOSS_PT = 0.5
EVALUATIONS = {"held-out top-5": (HELDOUT, 5), "held-out top-1": (HELDOUT, 1), "train top-5": (TRAIN, 5)}
"""Name -> (questions, memories read per question). Top-5 is the reference model report's mode;
top-1 (the retrieved best, the question's own reference for 96 %) measures reading without the
distractors the small model cannot tell apart (its top-5 answers flip both ways with any noise)."""


def score(run: RunUnderTest, splits: dict, memories: list) -> tuple[dict, float]:
    """Per evaluation, which questions ``run``'s model answers from ``memories`` (one per
    reference of its world); and the held-out answer NLL with each question's own memory."""
    scores = {}
    for name, (split, top_k) in EVALUATIONS.items():
        ev = evaluate_qa(run.model, run.tokenizer, run.spec, run.world, splits[split], run.index, memories, top_k,
                         modes=("memory",), split=split)
        scores[name] = ev.modes["memory"].hits
    docs = [format_qa(p.question, p.answer) for p in splits[HELDOUT]]
    nll = answer_loss(run.model, run.tokenizer, run.spec, docs, memories=[[memories[p.entity_id]] for p in splits[HELDOUT]])
    return scores, nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("run_dir", nargs="?", default="runs/reference-tiny")
    parser.add_argument("--baseline-run", help="a second baseline: this run's model reading its uncompressed bank")
    parser.add_argument("--kmeans-iters", type=int, default=25)
    parser.add_argument("--name", default="codec_qa", help="results file name in bench/results (without suffix)")
    parser.add_argument("--opq-iters", type=int, default=0, help="OPQ rotation updates (0: PCA rotation only)")
    parser.add_argument("--train-questions", type=int, default=130)
    parser.add_argument("--codebook-sample", type=int, default=2000,
                        help="memories (of another generated world's references) the PQ codebooks are trained on")
    args = parser.parse_args()

    torch.manual_seed(0)
    run = RunUnderTest.load(args.run_dir, num_threads=2)
    model, tokenizer, spec, world, bank = run.model, run.tokenizer, run.spec, run.world, run.bank
    splits = {HELDOUT: world.qa(HELDOUT, all_phrasings=True), TRAIN: run.train_questions(args.train_questions)}
    baselines = {"own": score(run, splits, bank)}  # name -> (scores, nll) every row is compared with
    if args.baseline_run:
        other = RunUnderTest.load(args.baseline_run, num_threads=2)
        if other.config.world != run.config.world:
            raise SystemExit(f"--baseline-run {args.baseline_run} was trained on another world")
        baselines[args.baseline_run] = score(other, splits, other.bank)
        del other

    dim = spec.head_dim
    paper, beyond = round(PAPER_BITS * dim), round(BEYOND_BITS * dim)
    rotary = probe_geometry(model).codebook_angles(spec.memory_layers)
    settings = [("fp16", "fp16", None, None, None), ("int8", "int8", None, None, None),
                ("int4", "int4", None, None, None),
                (f"pq{paper} (paper's setting, {8 * paper / dim:.2f} bits/dim)", "pq", paper, rotary, "product"),
                (f"pq{beyond} (>= 500x setting, {8 * beyond / dim:.2f} bits/dim)", "pq", beyond, rotary, "product"),
                (f"pq{beyond}, keys as stored", "pq", beyond, None, "product"),
                (f"pq{paper} residual", "pq", paper, rotary, "residual"),
                (f"pq{beyond} residual (>= 500x setting)", "pq", beyond, rotary, "residual")]
    sample, _ = encode_memory_bank(model, tokenizer, spec, sample_references(world, args.codebook_sample))
    dense = spec.dense_kv_bytes(model.config.num_hidden_layers)
    no_memory_nll = answer_loss(model, tokenizer, spec, [format_qa(p.question, p.answer) for p in splits[HELDOUT]])
    rows = [("uncompressed", float("nan"), *baselines["own"])]
    if args.baseline_run:
        rows.append((f"uncompressed, {args.baseline_run}'s model", float("nan"), *baselines[args.baseline_run]))
    for label, scheme, m, key_rope, quantizer in tqdm(settings, desc="schemes"):
        codebook = train_codebook(sample, m, version=1, kmeans_iters=args.kmeans_iters, opq_iters=args.opq_iters,
                                  key_rope=key_rope, quantizer=quantizer) if scheme == "pq" else None
        blobs = [encode_memory(mem, scheme, codebook) for mem in bank]
        decoded = [decode_memory(b, codebook=codebook) for b in blobs]
        rows.append((label, sum(map(len, blobs)) / len(blobs), *score(run, splits, decoded)))

    def losses(scores: dict, baseline: dict) -> dict:
        return {name: 100 * (sum(baseline[name]) - sum(scores[name])) / len(scores[name]) for name in EVALUATIONS}

    base, base_nll = baselines["own"]
    others = [name for name in baselines if name != "own"]
    lines = [
        "# QA exact match from compressed memories",
        "",
        f"Generated by `python bench/bench_codec_qa.py {args.run_dir}"
        + (f" --baseline-run {args.baseline_run}" if args.baseline_run else "")
        + (f" --name {args.name}" if args.name != "codec_qa" else "") + "`. "
        f"Model: {Path(args.run_dir) / 'model'}, memory layers "
        f"{list(spec.memory_layers)}, {spec.kv_heads} KV heads x {spec.tokens_per_head} tokens x head dim {dim}; "
        f"dense bf16 KV of a whole {spec.reference_length}-token reference: {dense:,} bytes. "
        f"Baseline: the same bank uncompressed, same questions and references"
        + (f"; and {', '.join(others)}'s model reading its own uncompressed bank (worst loss against it in the "
           f"last columns)" if others else "")
        + f". Target: loss <= {MAX_LOSS_PT} pt against every baseline. "
        f"Answer NLL: held-out answer tokens, own reference in memory (no memory: {no_memory_nll:.3f} nats).",
        "",
        "| scheme | bytes/memory | vs dense bf16 | "
        + " | ".join(f"{name} EM | loss (pt) | lost / gained" for name in EVALUATIONS)
        + " | answer NLL (nats) | vs uncompressed | "
        + "".join(f"worst loss vs {name} (pt) | NLL vs {name} | " for name in others) + "target |",
        "|---|---:|---:|" + "---:|---:|---:|" * len(EVALUATIONS) + "---:|---:|" + "---:|---:|" * len(others) + "---|",
    ]
    for label, size, scores, nll in rows:
        cells = []
        own = losses(scores, base)
        for name in EVALUATIONS:
            hits, total = scores[name], len(scores[name])
            lost = sum(b and not h for b, h in zip(base[name], hits))
            gained = sum(h and not b for b, h in zip(base[name], hits))
            cells += [f"{100 * sum(hits) / total:.1f}% ({sum(hits)}/{total})", f"{own[name]:+.1f}", f"{lost} / {gained}"]
        cells += [f"{nll:.3f}", f"{nll - base_nll:+.3f}"]
        worst = max(own.values())
        for name in others:
            other_scores, other_nll = baselines[name]
            vs_other = max(losses(scores, other_scores).values())
            worst = max(worst, vs_other)
            cells += [f"{vs_other:+.1f}", f"{nll - other_nll:+.3f}"]
        compressed = size == size
        verdict = ("met" if worst <= MAX_LOSS_PT else "MISSED") if compressed else ""
        lines.append(f"| {label} | {f'{size:,.0f}' if compressed else ''} | {f'{dense / size:.1f}x' if compressed else ''} "
                     f"| {' | '.join(cells)} | {verdict} |")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
