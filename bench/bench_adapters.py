"""Adapters (``memory3 adapt``) against the fully trained model and a RAG twin, on held-out questions.

    python bench/bench_adapters.py --reference runs/reference-tiny --base runs/ref-stage1/stages/warmup \
        --adapter runs/adapter-qo-r8 --rag-twin runs/ref-rag-twin [--adapter DIR ...] [--rag-adapter DIR]

Same world and held-out questions as bench/bench_reference_model.py. Rows: the base (stage 1, never
saw memory) without memory and reading memories unadapted; the base with each adapter reading the
*same bank* (encoded once by the base); the full stage-2 model reading its own bank; the RAG twin
(and RAG adapter) reading the top-k texts. Columns: own-reference, top-1 and top-5 exact match
(memory rows also top-5 under the retrieval prior), tok/s at top-5, trainable parameters and
training time. An adapter trained to also encode (``memories: adapted``) reads its own bank. ``--time-steps N`` also times N steps of stage-2 training and of adapter training on
the same batches in this run (the training-cost ratio). Writes bench/results/adapters.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from memory3.sdk.model.adapters import load_adapter, read_adapter_metadata
from memory3.sdk.model.fingerprint import model_fingerprint
from memory3.trainer.corpus import HELDOUT, build_world, normalize_answer
from memory3.trainer.evaluate import encode_memory_bank, evaluate_qa, generate_answers, load_run_config, prompt_ids
from memory3.trainer.model import count_parameters, load_reference_model
from memory3.trainer.retrieval_index import ReferenceIndex

KS = (1, 5)


def own_reference_em(model, tokenizer, spec, world, pairs, bank, batch_size) -> float:
    """Exact match reading only the memory of each question's own reference (no retrieval)."""
    prompts = [prompt_ids(tokenizer, p.question, "plain") for p in pairs]
    answers, _, _ = generate_answers(model, tokenizer, prompts, [[bank[p.entity_id]] for p in pairs], spec,
                                     batch_size=batch_size)
    return sum(normalize_answer(a) == normalize_answer(p.answer) for a, p in zip(answers, pairs)) / len(pairs)


def evaluate_row(label, model, tokenizer, spec, world, pairs, index, bank, reading, settings, facts) -> dict:
    row = {"label": label, "reading": reading, **facts}
    plain = evaluate_qa(model, tokenizer, spec, world, pairs, index, None, 1, modes=("plain",),
                        new_tokens=settings.new_tokens, batch_size=settings.batch_size)
    row["plain"] = plain.modes["plain"].exact_match
    row["plain_tok_s"] = plain.modes["plain"].tokens_per_s
    if reading == "memory":
        row["own"] = own_reference_em(model, tokenizer, spec, world, pairs, bank, settings.batch_size)
    for k in KS:
        modes = ("memory", "memory_prior") if reading == "memory" and k > 1 else (reading,)
        ev = evaluate_qa(model, tokenizer, spec, world, pairs, index, bank, k, modes=modes,
                         new_tokens=settings.new_tokens, batch_size=settings.batch_size,
                         retrieval_bias=settings.retrieval_prior_bias)
        row[f"top{k}"] = ev.modes[reading].exact_match
        row[f"top{k}_tok_s"] = ev.modes[reading].tokens_per_s
        if "memory_prior" in ev.modes:
            row[f"top{k}_prior"] = ev.modes["memory_prior"].exact_match
    print(json.dumps(row), flush=True)
    return row


def adapter_facts(directory) -> dict:
    meta = read_adapter_metadata(directory)
    return {"trainable": meta["trainable_parameters"], "train_time_s": meta["train_time_s"], "steps": meta["steps"],
            "targets": "+".join(meta["target_modules"]) + f" r{meta['rank']}"}


def stage_time(run_dir: Path, stage: str) -> tuple[float, int]:
    """(seconds, steps) a run's stage took, from its loss.csv."""
    import csv

    rows = list(csv.DictReader(open(run_dir / "loss.csv")))
    mine = [r for r in rows if r["stage"] == stage]
    before = [r for r in rows if int(r["step"]) < int(mine[0]["step"]) and r["stage"] != stage]
    start = float(before[-1]["elapsed_s"]) if before else 0.0
    return float(mine[-1]["elapsed_s"]) - start, int(mine[-1]["step"]) - (int(before[-1]["step"]) if before else 0)


def time_training_steps(reference: Path, base_dir: Path, adapter_dir: Path, steps: int) -> dict:
    """Seconds per step of stage 2 (all weights, memories encoded with grad) and of the adapter
    (LoRA only, memories encoded by the frozen base), on the same batches, steps alternating so a
    shared machine's load falls on both alike."""
    from memory3.trainer.adapt import AdaptConfig, add_adapter
    from memory3.trainer.memory_stage import RetrievalMemoryStage
    from memory3.trainer.pretrain import Batch, TrainContext, batch_loss, optimizer_step

    config = load_run_config(reference)
    stage = config.stages[-1]
    world = build_world(config.world.seed, config.world.n_entities, config.world.heldout_fraction,
                        passages_per_entity=config.world.passages_per_entity)
    meta = read_adapter_metadata(adapter_dir)
    runners = {}
    for name in ("stage 2", "adapter"):
        model, tokenizer, spec = load_reference_model(base_dir)
        model.train()
        if name == "adapter":
            peft_model = add_adapter(model, AdaptConfig(base=str(base_dir), rank=meta["rank"],
                                                        target_modules=meta["target_modules"]))
            params = [p for p in peft_model.parameters() if p.requires_grad]
            stage_config = replace(stage, encode_with_grad=False)
        else:
            params, stage_config = list(model.parameters()), stage
        hooks = RetrievalMemoryStage(TrainContext(config, world, tokenizer, model, spec, torch.device("cpu")),
                                     stage_config).hooks()
        runners[name] = (model, hooks, torch.optim.AdamW(params, lr=1e-4))
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for step in range(steps + 1):  # the first step (allocation, caches) is not counted
        for name, (model, hooks, optimizer) in runners.items():
            batch = hooks.stream.batch(800 + step, config.batch_size)
            t0 = time.perf_counter()
            loss = batch_loss(model, Batch(batch.input_ids, batch.labels, step, batch.preceding), hooks)
            optimizer_step(loss, optimizer, [], grad_clip=0.0)
            if step:
                seconds[name].append(time.perf_counter() - t0)
    return {name: sum(values) / len(values) for name, values in seconds.items()}


def report(rows, info) -> str:
    lines = ["# Adapters: teaching a frozen model to read memories (held-out QA exact match)", "",
             f"{info['questions']} held-out questions of the reference world (facts in no training text); "
             f"memories of every reference encoded once by the base ({info['base_fingerprint'][:12]}…) for the base "
             f"and its adapters, by the full model for itself. {info['machine']}.", "",
             "| model | reads | trainable params | training | no memory | own ref | top-1 | top-5 | top-5 + prior "
             "| top-1 gain | tok/s top-5 | vs no memory |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        pct = lambda key: f"{100 * r[key]:.1f}%" if r.get(key) is not None else "–"  # noqa: E731
        train = f"{r['train_time_s'] / 60:.1f} min / {r['steps']} steps" if r.get("train_time_s") else "–"
        gain = 100 * (r["top1"] - r["plain"])
        lines.append(f"| {r['label']} | {r['reading']} | {r.get('trainable') or '–'} | {train} | {pct('plain')} | "
                     f"{pct('own')} | {pct('top1')} | {pct('top5')} | {pct('top5_prior')} | {gain:+.1f} pt | "
                     f"{r['top5_tok_s']:.0f} | {r['top5_tok_s'] / r['plain_tok_s']:.2f}× |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reference", default="runs/reference-tiny", help="the full two-stage run (has model/)")
    parser.add_argument("--base", default="runs/ref-stage1/stages/warmup", help="the stage-1 model (the user's base)")
    parser.add_argument("--adapter", action="append", default=[], help="an adapter directory (repeatable)")
    parser.add_argument("--rag-twin", help="the RAG twin's run directory (has model/)")
    parser.add_argument("--rag-adapter", action="append", default=[], help="an adapter trained with reading=rag")
    parser.add_argument("--time-steps", type=int, default=0, help="also time this many training steps of each")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reference = Path(args.reference)
    config = load_run_config(reference)
    settings = config.evaluation
    world = build_world(config.world.seed, config.world.n_entities, config.world.heldout_fraction,
                        passages_per_entity=config.world.passages_per_entity)
    texts = [r.text for r in world.references]
    index = ReferenceIndex(texts)
    pairs = world.qa(HELDOUT)
    base, tokenizer, spec = load_reference_model(args.base)

    base_bank, _ = encode_memory_bank(base, tokenizer, spec, texts)
    stage2_s, stage2_steps = stage_time(reference, config.stages[-1].name)
    rows = [evaluate_row("base (stage 1), unadapted", base, tokenizer, spec, world, pairs, index, base_bank, "memory",
                         settings, {})]
    for directory in args.adapter:
        model = load_adapter(load_reference_model(args.base)[0], directory)
        bank, label = base_bank, f"base + adapter {Path(directory).name}"
        if read_adapter_metadata(directory).get("memories") == "adapted":  # it encodes too: its own bank
            bank, _ = encode_memory_bank(model, tokenizer, spec, texts)
            label += " (own bank)"
        rows.append(evaluate_row(label, model, tokenizer, spec, world, pairs, index, bank, "memory", settings,
                                 adapter_facts(directory)))
    full, full_tokenizer, full_spec = load_reference_model(reference / "model")
    full_bank, _ = encode_memory_bank(full, full_tokenizer, full_spec, texts)
    rows.append(evaluate_row("full stage-2 model", full, full_tokenizer, full_spec, world, pairs, index, full_bank,
                             "memory", settings, {"trainable": count_parameters(full), "train_time_s": stage2_s,
                                                  "steps": stage2_steps}))
    if args.rag_twin:
        twin_dir = Path(args.rag_twin)
        twin, twin_tokenizer, twin_spec = load_reference_model(twin_dir / "model")
        twin_s, twin_steps = stage_time(twin_dir, load_run_config(twin_dir).stages[-1].name)
        rows.append(evaluate_row("RAG twin (stage 2 on texts)", twin, twin_tokenizer, twin_spec, world, pairs, index,
                                 None, "rag", settings, {"trainable": count_parameters(twin), "train_time_s": twin_s,
                                                         "steps": twin_steps}))
    rows.append(evaluate_row("base (stage 1), RAG", base, tokenizer, spec, world, pairs, index, None, "rag", settings, {}))
    for directory in args.rag_adapter:
        model = load_adapter(load_reference_model(args.base)[0], directory)
        rows.append(evaluate_row(f"base + RAG adapter {Path(directory).name}", model, tokenizer, spec, world, pairs,
                                 index, None, "rag", settings, adapter_facts(directory)))
    info = {"questions": len(pairs), "base_fingerprint": model_fingerprint(base), "base_parameters": count_parameters(base),
            "machine": f"CPU, {args.threads} thread(s)"}
    text = report(rows, info)
    if args.time_steps and args.adapter:
        timing = time_training_steps(reference, Path(args.base), Path(args.adapter[0]), args.time_steps)
        info["seconds_per_step"] = timing
        text += (f"\n\nTraining cost, timed in this run on the same {args.time_steps} batches: stage 2 "
                 f"{timing['stage 2']:.3f} s/step, adapter {timing['adapter']:.3f} s/step — "
                 f"{timing['adapter'] / timing['stage 2']:.2f}× (target ≤ 0.50×).")
    text += "\n\n" + targets(rows, info)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapters.md").write_text(text + "\n")
    (out / "adapters.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    print(text)
    return 0


def targets(rows, info) -> str:
    by = {r["label"]: r for r in rows}
    full = by["full stage-2 model"]
    full_gain = full["top1"] - full["plain"]
    lines = ["## Targets"]
    for r in rows:
        if r["label"].startswith("base + adapter"):
            gain = r["top1"] - r["plain"]
            lines.append(f"- {r['label']}: trainable {r['trainable']} = {100 * r['trainable'] / info['base_parameters']:.2f}% "
                         f"of the base (target ≤ 2%); top-1 gain {100 * gain:+.1f} pt = "
                         f"{gain / full_gain if full_gain else float('nan'):.2f} of the full model's {100 * full_gain:+.1f} pt "
                         f"(target ≥ 0.90)")
    twin = by.get("RAG twin (stage 2 on texts)")
    if twin:
        for k in KS:
            lines.append(f"- top-{k}: full model reading memories {100 * full[f'top{k}']:.1f}% vs RAG twin "
                         f"{100 * twin[f'top{k}']:.1f}% (target ≥ twin − 2 pt), at "
                         f"{full[f'top{k}_tok_s'] / twin[f'top{k}_tok_s']:.2f}× its tok/s (target ≥ 3×)")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
