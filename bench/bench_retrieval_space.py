"""Benchmark retrieval in the model's own space against the text embedder (issue 17), same run.

Each figure beside its baseline measured in the same process:

1. Retrieval quality (needs a trained model, ``--model DIR``): recall@1 and recall@5 of each
   held-out question's own reference among every reference of the model's world, with the
   model's retrieval head (``retrieval_head.safetensors`` in ``--head`` or DIR; trained here if missing)
   and with all-MiniLM-L6-v2, plus the time to make one batch's query vectors each way; and
   held-out QA exact match with memories retrieved either way (trainer.evaluate's one loop and
   retrieval rule), top-1 and top-5, with and without the retrieval prior.
2. Decoding speed, the paper's strict schedule (memories every 64 tokens, no lag, no prefetch),
   batch 1 and 8, through a real server on loopback: plain, RAG, and memory with a text bank
   (MiniLM on the server) and with a model-space bank (vector queries, no text embedder), cold
   and warm cache, with the mean retrieval step (search, fetch, decode, inject, wait) of each.
   A random model of ``--preset`` serves for speed when no ``--model`` is given (its head is
   untrained: speed does not depend on it).

Usage: python bench/bench_retrieval_space.py [--model DIR [--head HEAD_DIR] | --preset small] [--split-cores]
Writes bench/results/NAME.md and NAME.json (``--name``, default ``retrieval_space``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import secrets
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decoding import CHUNK, PROMPT_TOKENS, TOP_K, LoopbackServer, load_model, step_breakdown  # noqa: E402

from memory3.sdk import generation as decoding  # noqa: E402
from memory3.sdk.client import BankInfo  # noqa: E402
from memory3.sdk.client.client import Client  # noqa: E402
from memory3.sdk.generation import DecodingOptions, MemoryOptions  # noqa: E402
from memory3.sdk.memory.encoder import MemoryEncoder  # noqa: E402
from memory3.sdk.memory.retrieval_head import RetrievalHead, load_retrieval_head  # noqa: E402
from memory3.sdk.memory.supply import MemorySupply  # noqa: E402
from memory3.sdk.memory.writer import MemoryWriter  # noqa: E402
from memory3.sdk.model.fingerprint import model_fingerprint  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = (  # (row name, generation mode, bank, cache)
    ("plain", "plain", None, None),
    ("RAG (MiniLM)", "rag", "text", None),
    ("memory, MiniLM, cold", "memory", "text", "cold"),
    ("memory, MiniLM, warm", "memory", "text", "warm"),
    ("memory, model space, cold", "memory", "model", "cold"),
    ("memory, model space, warm", "memory", "model", "warm"),
)


@dataclass
class Row:
    name: str
    batch: int
    tokens_per_s: float
    steps: list


# ------------------------------------------------------------------ part 1: recall


def recall_part(model, tokenizer, spec, head, model_dir: Path, steps: int,
                head_dir: Path | None = None) -> tuple[dict, RetrievalHead]:
    """Held-out recall, model space vs MiniLM (trainer.retriever.evaluate_head), and the cost of
    one batch of 8 query vectors each way; and the head (trained here when ``head`` is None)."""
    from memory3.trainer.corpus import build_world
    from memory3.trainer.retriever import RetrieverConfig, _world_settings, evaluate_head, train_head, training_pairs
    from memory3.trainer.retrieval_index import builtin_embedder

    seed, entities, heldout = _world_settings(model_dir)
    world = build_world(seed, entities, heldout)
    trained_here = None
    if head is None:
        config = RetrieverConfig(steps=steps)
        extra = build_world(seed + config.extra_seed_offset, config.extra_entities, 0.2, passages_per_entity=0,
                            qa_docs=0, filler_docs=0)
        t0 = time.perf_counter()
        head, _ = train_head(model, tokenizer, spec, training_pairs(world, extra), config)
        trained_here = time.perf_counter() - t0
    out = evaluate_head(head, model, tokenizer, spec, world, compare_minilm=True)
    questions = [f"Q: Where was person {i} born?\nA:" for i in range(8)]
    ids = [tokenizer(q)["input_ids"] for q in questions]
    embedder = builtin_embedder()
    embedder.embed(questions)  # loaded and warm
    out["ms_per_batch_of_8"] = {
        "model_space": _best_ms(lambda: head.vectors(model, ids, tokenizer.all_special_ids)),
        "minilm": _best_ms(lambda: embedder.embed(questions)),
    }
    out["head"] = {"space": head.space, "trained_here_s": trained_here}
    made = head_dir / "retrieval_head.json" if head_dir is not None and trained_here is None else None
    if made is not None and made.is_file():  # memory3 train-retriever's record of how the head was trained
        record = json.loads(made.read_text())
        out["head"] |= {"directory": str(head_dir), "config": record.get("config"),
                        "train_seconds": record.get("train_seconds")}
    return out, head


def qa_part(model_dir: Path, head: RetrievalHead, top_ks=(1, 5), queries=("question", "prompt"),
            biases=(10.0, 20.0, 40.0, 80.0)) -> dict:
    """Held-out QA exact match of the run beside ``model_dir`` (its world, questions, memory bank
    and retrieval prior bias, as trainer.evaluate), each mode with references retrieved by MiniLM
    and in the model's space, searched with the question's text (trainer.evaluate's rule) and with
    the prompt the model reads: {retriever: {query: {top_k: Evaluation as a dict}}}; and memory +
    prior EM at top-5 with the prompt as query by retrieval prior bias ("bias_sweep": the bias was
    set on MiniLM's scores; another space's cosines have other margins)."""
    from memory3.trainer.corpus import HELDOUT
    from memory3.trainer.evaluate import RunUnderTest, evaluate_qa
    from memory3.trainer.retriever import ModelSpaceIndex

    run = RunUnderTest.load(model_dir.parent, num_threads=torch.get_num_threads())
    settings = run.config.evaluation
    indexes = {"minilm": run.index,
               "model_space": ModelSpaceIndex(run.index.texts, head, run.model, run.tokenizer, run.spec)}
    out: dict = {"retrieval_prior_bias": settings.retrieval_prior_bias, "new_tokens": settings.new_tokens}
    for name, index in indexes.items():
        for query in queries:
            for k in top_ks:
                ev = evaluate_qa(run.model, run.tokenizer, run.spec, run.world, run.world.qa(HELDOUT), index, run.bank,
                                 k, new_tokens=settings.new_tokens, batch_size=settings.batch_size,
                                 retrieval_bias=settings.retrieval_prior_bias, query=query)
                out.setdefault(name, {}).setdefault(query, {})[k] = {
                    **{f: v for f, v in ev.to_dict().items() if f not in ("modes", "examples")},
                    "exact_match": {m: r.exact_match for m, r in ev.modes.items()},
                    "correct": {m: r.correct for m, r in ev.modes.items()}}
                print(f"QA {name:12s} {query:8s} top-{k}: own reference kept {ev.retrieval_hit_rate:.3f}, EM "
                      + ", ".join(f"{m} {r.exact_match:.3f}" for m, r in ev.modes.items()))
        for bias in biases:
            ev = evaluate_qa(run.model, run.tokenizer, run.spec, run.world, run.world.qa(HELDOUT), index, run.bank,
                             max(top_ks), modes=("memory_prior",), new_tokens=settings.new_tokens,
                             batch_size=settings.batch_size, retrieval_bias=bias, query=queries[-1])
            out.setdefault("bias_sweep", {}).setdefault(name, {})[bias] = ev.modes["memory_prior"].exact_match
    return out


def _best_ms(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1000 * best


# ------------------------------------------------------------------ part 2: decoding


def prepare_banks(target: str, api_key: str, model, tokenizer, spec, head, references) -> dict[str, str]:
    """Two banks holding the same references and memories: one in MiniLM's text space, one in the
    model's space (keys from the encoding forward). Returns {"text": name, "model": name}."""
    suffix = secrets.token_hex(3)
    banks = {"text": f"text-{suffix}", "model": f"model-{suffix}"}
    fingerprint = model_fingerprint(model)
    with Client(target, api_key) as client:
        client.create_bank(BankInfo(banks["text"], fingerprint, spec))
        client.create_bank(BankInfo(banks["model"], fingerprint, spec, head.space, head.dim, "cosine"))
        writer = MemoryWriter(MemoryEncoder(model, tokenizer, spec, retrieval_head=head), skip_short=True)
        items = [(f"e{i}", t) for i, t in enumerate(references)]
        for bank in banks.values():
            client.run(writer.write(client.aio, bank, items, progress=False))
    return banks


def decode_all(model, tokenizer, supply, bank, prompts, batch: int, mode: str, new_tokens: int) -> tuple[float, int]:
    """Strict schedule: every batch's retrievals start when generate() starts; (seconds, tokens)."""
    options = DecodingOptions(max_new_tokens=new_tokens, chunk=CHUNK, stop_at_eos=False)
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        group = prompts[i : i + batch]
        memory = MemoryOptions(supply, bank, top_k=TOP_K) if mode != "plain" else None
        out = decoding.generate(model, tokenizer, group, mode=mode, memory=memory, decoding=options)
        tokens += sum(len(r.token_ids) for r in out)
    return time.perf_counter() - start, tokens


def rpc_profile(target, api_key, model, tokenizer, head, banks, prompts, repeats: int = 30) -> dict[str, float]:
    """Median milliseconds of single RPCs as the supply makes them (one decoding step's search,
    the 8 rows' first chunks, top-5), beside a Stats call (the round trip's floor): where a
    model-space step's search time goes."""
    import statistics

    chunks = [p[:CHUNK] for p in prompts[:8]]
    vectors = head.vectors(model, chunks, tokenizer.all_special_ids)
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in chunks]
    calls = {
        "Stats (round-trip floor)": (lambda c: c.stats(banks["model"]), repeats),
        "RetrieveBatch, 1 vector": (lambda c: c.retrieve_batch(banks["model"], vectors[:1], top_k=TOP_K,
                                                              include_text=False), repeats),
        "RetrieveBatch, 8 vectors": (lambda c: c.retrieve_batch(banks["model"], vectors, top_k=TOP_K,
                                                               include_text=False), repeats),
        "RetrieveBatch, 8 vectors + memories": (lambda c: c.retrieve_batch(banks["model"], vectors, top_k=TOP_K,
                                                                          include_text=False, include_memory=True),
                                                repeats),
        "RetrieveBatch, 8 texts (MiniLM)": (lambda c: c.retrieve_batch(banks["text"], texts, top_k=TOP_K,
                                                                      include_text=False), max(3, repeats // 6)),
    }
    out = {}
    with Client(target, api_key) as client:
        for name, (call, n) in calls.items():
            call(client)  # warm (connection, server caches)
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                call(client)
                times.append(1000 * (time.perf_counter() - t0))
            out[name] = statistics.median(times)
    return out


def decoding_part(target, api_key, model, tokenizer, spec, head, references, prompts, *, batches=(1, 8),
                  prompts_b1: int = 4, repeats: int = 2, new_tokens: int = 128,
                  profile_out: dict | None = None) -> list[Row]:
    """Every variant at every batch size (rounds interleave them; best of ``repeats``); with
    ``profile_out``, also :func:`rpc_profile` into it."""
    banks = prepare_banks(target, api_key, model, tokenizer, spec, head, references)
    if profile_out is not None:
        profile_out.update(rpc_profile(target, api_key, model, tokenizer, head, banks, prompts))
    rows: list[Row] = []
    with MemorySupply(target, api_key, model, spec, tokenizer=tokenizer, retrieval_head=head) as supply:
        warm = DecodingOptions(max_new_tokens=8, chunk=CHUNK, stop_at_eos=False)
        for bank in banks.values():  # warm up the server (its embedder), the model and the code paths
            decoding.generate(model, tokenizer, prompts[:1], memory=MemoryOptions(supply, bank), decoding=warm)
        for batch in batches:
            group = prompts if batch > 1 else prompts[:prompts_b1]
            best: dict[str, tuple[float, list]] = {}
            for _ in range(repeats):  # rounds interleave the variants: load drift hits all alike
                for name, mode, space, cache in VARIANTS:
                    bank = banks[space] if space else banks["text"]
                    if cache == "cold":
                        supply.cache.clear()
                    elif cache == "warm":
                        decode_all(model, tokenizer, supply, bank, group, batch, mode, new_tokens)
                    supply.timings.clear()
                    seconds, tokens = decode_all(model, tokenizer, supply, bank, group, batch, mode, new_tokens)
                    if name not in best or tokens / seconds > best[name][0]:
                        best[name] = (tokens / seconds, list(supply.timings) if mode == "memory" else [])
            for name, *_ in VARIANTS:
                rows.append(Row(name, batch, *best[name]))
                print(f"batch {batch} {name:28s} {best[name][0]:8.1f} tok/s")
    return rows


# ------------------------------------------------------------------ report


TARGET_PLAIN, TARGET_RAG_B8, TARGET_STEP_MS = 0.95, 1.5, 10.0  # issue 17's targets (× RAG and step: large, batch 8)


def _em(result: dict, mode: str) -> str:
    return f"{result['exact_match'][mode]:.3f} ({result['correct'][mode]}/{result['questions']})"


def _made(head: dict) -> str:
    config = head.get("config")
    if not config:
        return ""
    shown = ", ".join(f"{k} {config[k]}" for k in ("steps", "batch_size", "hard_negatives", "token_codes",
                                                    "extra_entities", "dim") if k in config)
    return (f", from `{head['directory']}` (memory3 train-retriever: {shown}; trained in "
            f"{head.get('train_seconds') or 0:.0f} s)")


def qa_lines(qa: dict) -> list[str]:
    modes = ("plain", "rag", "memory", "memory_prior")
    lines = ["## Held-out QA exact match: memories retrieved in the model's space vs by MiniLM", "",
             f"trainer.evaluate's loop and retrieval rule (the > 2/3 overlap rule, exact cosine search over the world's "
             f"references in process), the run's {qa['new_tokens']} greedy tokens, retrieval prior bias "
             f"{qa['retrieval_prior_bias']:g}. Query \"question\": the question's text, as trainer.evaluate has always "
             "searched; \"prompt\": the QA prompt the model reads (`Q: …\\nA:`), what a decoding chunk sends. The overlap "
             "rule compares the question either way. Model space: the head's vector of the query's tokens; MiniLM: "
             "its embedding of the query's text.", "",
             "| retriever | query | top-k | own reference kept | no memory | RAG | memory | memory + prior |",
             "|---|---|---|---|---|---|---|---|"]
    for name, label in (("minilm", "all-MiniLM-L6-v2"), ("model_space", "model space")):
        for query, by_k in qa[name].items():
            for k, r in by_k.items():
                lines.append(f"| {label} | {query} | {k} | {r['retrieval_hit_rate']:.3f} | "
                             + " | ".join(_em(r, m) for m in modes) + " |")
    lines.append("")
    for query, by_k in qa["minilm"].items():
        for k, mini in by_k.items():
            ms = qa["model_space"][query][k]
            diff = {m: ms["exact_match"][m] - mini["exact_match"][m] for m in ("memory", "memory_prior")}
            lines.append(f"- query {query}, top-{k}: memory EM model space − MiniLM {100 * diff['memory']:+.1f} pt, "
                         f"with the prior {100 * diff['memory_prior']:+.1f} pt (target ≥ 0: "
                         f"{'met' if min(diff.values()) >= 0 else 'NOT met'})")
    if qa.get("bias_sweep"):
        sweep = qa["bias_sweep"]
        lines += ["", "Memory + prior EM at top-5, query prompt, by retrieval prior bias (the run's bias was chosen on "
                  "MiniLM's scores; chosen here on the same held-out questions, so a ceiling, not a held-out figure):",
                  "", "| retriever | " + " | ".join(f"bias {b:g}" for b in sweep["minilm"]) + " |",
                  "|---|" + "---|" * len(sweep["minilm"])]
        for name, label in (("minilm", "all-MiniLM-L6-v2"), ("model_space", "model space")):
            lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in sweep[name].values()) + " |")
    return lines + [""]


def report(recall: dict | None, rows: list[Row], header: str, qa: dict | None = None,
           profile: dict | None = None) -> str:
    lines = ["# Retrieval in the model's space vs the text embedder", "", header, ""]
    if recall:
        ms, mini = recall["model_space"], recall["minilm"]
        lines += [
            f"## Retrieval quality: {recall['questions']} held-out questions, {recall['references']} references",
            "", "| retriever | recall@1 | recall@5 | ms per batch of 8 queries |", "|---|---|---|---|",
            f"| model space (retrieval head, on the model's device) | {ms['recall@1']:.3f} | {ms['recall@5']:.3f} | "
            f"{recall['ms_per_batch_of_8']['model_space']:.2f} |",
            f"| all-MiniLM-L6-v2 (baseline, in process) | {mini['recall@1']:.3f} | {mini['recall@5']:.3f} | "
            f"{recall['ms_per_batch_of_8']['minilm']:.2f} |", "",
            f"Head: `{recall['head']['space']}`" + (f", trained in this run ({recall['head']['trained_here_s']:.0f} s)"
                                                    if recall['head']['trained_here_s'] else "") + _made(recall['head'])
            + ".", "",
        ]
    if qa:
        lines += qa_lines(qa)
    if rows:
        rate = {(r.name, r.batch): r.tokens_per_s for r in rows}
        lines += ["## Decoding speed, strict schedule", "",
                  "| batch | mode | tok/s | × plain | × RAG | × memory MiniLM (same cache) |", "|---|---|---|---|---|---|"]
        for r in rows:
            plain, rag = rate[("plain", r.batch)], rate[("RAG (MiniLM)", r.batch)]
            same = ""
            if "model space" in r.name:
                same = f"{r.tokens_per_s / rate[(r.name.replace('model space', 'MiniLM'), r.batch)]:.2f}"
            lines.append(f"| {r.batch} | {r.name} | {r.tokens_per_s:.1f} | {r.tokens_per_s / plain:.2f} | "
                         f"{r.tokens_per_s / rag:.2f} | {same} |")
        lines += ["", "Retrieval steps, mean milliseconds per step (one step: all rows of a batch, one RetrieveBatch; "
                  "search: the RPC, for a MiniLM bank embedding included; step: request to result + inject):",
                  "", "| batch | mode | steps | search | fetch | decode | inject | wait (not hidden) | step |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            b = step_breakdown(r.steps)
            if b:
                lines.append(f"| {r.batch} | {r.name} | {b['steps']} | {b['search']:.1f} | {b['fetch']:.1f} | "
                             f"{b['decode']:.1f} | {b['inject']:.2f} | {b['wait']:.1f} | {b['total'] + b['inject']:.1f} |")
        if profile:
            lines += ["", "Single RPCs as a step makes them (8 rows' first chunks, top-5, no texts back), median ms, "
                      "the same server before the decoding runs:", "", "| call | ms |", "|---|---|"]
            lines += [f"| {name} | {ms:.2f} |" for name, ms in profile.items()]
        lines += ["", "Targets (issue 17), memory with a model-space bank:", ""] + target_lines(rows)
    return "\n".join(lines) + "\n"


def target_lines(rows: list[Row]) -> list[str]:
    rate = {(r.name, r.batch): r for r in rows}
    out = []
    for batch in sorted({r.batch for r in rows}):
        plain, rag = rate[("plain", batch)].tokens_per_s, rate[("RAG (MiniLM)", batch)].tokens_per_s
        for cache in ("cold", "warm"):
            r = rate[(f"memory, model space, {cache}", batch)]
            x = r.tokens_per_s / plain
            out.append(f"- batch {batch}, {cache}: {x:.2f}× plain (target ≥ {TARGET_PLAIN}: "
                       f"{'met' if x >= TARGET_PLAIN else f'NOT met, short by {TARGET_PLAIN - x:.2f}'}), "
                       f"{r.tokens_per_s / rag:.2f}× RAG" + (f" (target at batch 8 on large ≥ {TARGET_RAG_B8}: "
                       f"{'met' if r.tokens_per_s / rag >= TARGET_RAG_B8 else 'NOT met'})" if batch == 8 else ""))
        cold = step_breakdown(rate[("memory, model space, cold", batch)].steps)
        if batch == 8 and cold:
            step = cold["total"] + cold["inject"]
            out.append(f"- batch 8 cold retrieval step {step:.1f} ms (target on large ≤ {TARGET_STEP_MS:g} ms: "
                       f"{'met' if step <= TARGET_STEP_MS else 'NOT met'})")
    return out


def _commit() -> str:
    """The checkout's commit (``+`` when tracked files differ from it), or ``unknown``."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+" if dirty else "")


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="trained model directory (memory3 train's RUN_DIR/model): recall and speed")
    parser.add_argument("--head", help="directory of the model's retrieval head (memory3 train-retriever --out DIR; "
                                       "default: --model)")
    parser.add_argument("--preset", default="small", help="without --model: random model of this preset (speed only)")
    parser.add_argument("--head-steps", type=int, default=300, help="train a head for this many steps when --model has none")
    parser.add_argument("--entities", type=int, default=120, help="references in the decoding banks (one per entity)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per batch-8 measurement (a multiple of 8)")
    parser.add_argument("--prompts-b1", type=int, default=4, help="prompts per batch-1 measurement")
    parser.add_argument("--new-tokens", type=int, default=128, help="generated tokens per prompt")
    parser.add_argument("--batches", default="1,8", help="batch sizes, comma separated")
    parser.add_argument("--repeats", type=int, default=2, help="measure each figure this many times, keep the best")
    parser.add_argument("--skip-decoding", action="store_true", help="recall (and QA) only")
    parser.add_argument("--skip-qa", action="store_true", help="with --model: no held-out QA exact match")
    parser.add_argument("--split-cores", action="store_true", help="service and PostgreSQL on the last core")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--name", default="retrieval_space", help="results file name in bench/results")
    args = parser.parse_args(argv)
    command = "python bench/bench_retrieval_space.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    service_cores = None
    if args.split_cores:
        cores = sorted(os.sched_getaffinity(0))
        service_cores = {cores[-1]}
        os.sched_setaffinity(0, set(cores[:-1]))
        torch.set_num_threads(args.threads or max(1, len(cores) - 1))
    elif args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer, spec, references, prompts = load_model(args)
    head_dir = Path(args.head or args.model) if args.model else None
    head = load_retrieval_head(head_dir, model) if head_dir else None
    recall = qa = None
    if args.model:
        recall, head = recall_part(model, tokenizer, spec, head, Path(args.model), args.head_steps, head_dir)
        if not args.skip_qa:
            qa = qa_part(Path(args.model), head)
    else:
        head = RetrievalHead.for_model(model, seed=0)  # a random model: speed only, the head's weights do not matter
    rows: list[Row] = []
    query_ms = None
    profile: dict[str, float] = {}
    if not args.skip_decoding:
        chunks = [p[:CHUNK] for p in prompts[:8]]
        query_ms = _best_ms(lambda: head.vectors(model, chunks, tokenizer.all_special_ids), repeats=20)
        data_dir = Path(tempfile.mkdtemp(prefix="m3-bench-space-"))
        server = LoopbackServer(data_dir, query_cache_size=0)
        if service_cores:
            server.pin(service_cores)
        try:
            admin = Client(server.target, server.admin_key)
            admin.create_tenant("bench")
            api_key = admin.issue_key("bench", "bench")[1]
            admin.close()
            rows = decoding_part(server.target, api_key, model, tokenizer, spec, head, references, prompts,
                                 batches=tuple(int(b) for b in args.batches.split(",")), prompts_b1=args.prompts_b1,
                                 repeats=args.repeats, new_tokens=args.new_tokens, profile_out=profile)
        finally:
            server.stop()
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    load_after = os.getloadavg()
    header = (f"Model: {'`' + args.model + '`' if args.model else f'random Llama (preset {args.preset}, untrained weights: speed only)'}, "
              f"{params / 1e6:.1f}M parameters, memory layers {list(spec.memory_layers)}. ")
    if rows:
        header += (f"Decoding: {len(references)} references in each bank, {PROMPT_TOKENS} prompt + {args.new_tokens} "
                   f"generated tokens, chunk {CHUNK}, top-{TOP_K}, strict schedule; {args.prompts_b1} prompts at batch 1, "
                   f"{args.prompts} at batch 8; server on loopback in its own process (query-embedding cache off)"
                   f"{', service and PostgreSQL pinned to their own core' if args.split_cores else ''}; best of "
                   f"{args.repeats}. Model-space query vectors of 8 chunks of {CHUNK} tokens on the model's device: "
                   f"{query_ms:.2f} ms (before each request, not in the step). ")
    header += (f"Code at commit {_commit()}. CPU, torch threads {torch.get_num_threads()}, {os.cpu_count()} cores; load average (1, 5, 15 min) "
               f"{', '.join(f'{x:.2f}' for x in load_before)} at the start, {', '.join(f'{x:.2f}' for x in load_after)} "
               f"at the end; started {started}.\n\nReproduce: `{command}`")
    text = report(recall, rows, header, qa, profile)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(text)
    data = {"command": command, "started": started, "load_before": load_before, "load_after": load_after,
            "model": args.model or f"random:{args.preset}", "parameters": params, "torch_threads": torch.get_num_threads(),
            "recall": recall, "qa": qa, "query_vectors_ms_batch8": query_ms, "rpc_profile_ms": profile,
            "decoding": [{"name": r.name, "batch": r.batch, "tokens_per_s": r.tokens_per_s,
                          "steps": step_breakdown(r.steps), "step_timings": [asdict(t) for t in r.steps]} for r in rows]}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(data, indent=1) + "\n")
    return text


if __name__ == "__main__":
    main()
