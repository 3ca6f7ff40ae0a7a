"""Benchmark decoding speed: plain vs RAG vs explicit memory, batch 1 and 8, service on loopback.

Memory3 (arXiv 2407.01178) lost part of plain decoding speed to its memory reads, and RAG lost more.
This runs the three modes through one decode loop (:mod:`memory3.sdk.generation`) on the same model and
prompts against a real memory3 server in this process: the paper's 128 + 128 tokens, memories every 64
tokens with a cold and a warm cache, "strict" and "pipelined" schedules, and the mean retrieval step
breakdown of :class:`memory3.sdk.memory.supply.StepTiming`. The model is ``--model DIR`` or a random
Llama of ``--preset`` (fine for speed); ``--split-cores`` gives the service and PostgreSQL their own
core, as when the model decodes on an accelerator.

Usage: python bench/bench_decoding.py [--model DIR] [--preset large] [--split-cores] [--lag 16]
Writes bench/results/NAME.md and NAME.png (``--name``, default ``decoding``).
Measurements: docs/experiments.md ("Decoding speed").
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import secrets
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from memory3.sdk import generation as decoding
from memory3.sdk.client import BankInfo
from memory3.sdk.client.client import Client
from memory3.sdk.generation import DecodingOptions, MemoryOptions
from memory3.sdk.memory.encoder import MemoryEncoder
from memory3.sdk.memory.supply import MemorySupply, Retrieved, StepTiming
from memory3.sdk.memory.writer import MemoryWriter
from memory3.sdk.model.fingerprint import model_fingerprint

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_TOKENS = 128
NEW_TOKENS = 128
CHUNK = 64
TOP_K = 5
TARGETS = {("plain", 1): 0.9, ("plain", 8): 0.9, ("rag", 1): 1.1, ("rag", 8): 1.5}


class LoopbackServer:
    """`memory3 serve` in its own process (as deployed: no GIL shared with the decoder), with an
    embedded PostgreSQL under a temp dir, on loopback."""

    def __init__(self, data_dir: Path, query_cache_size: int = 0, embed_batch_max: int = 8) -> None:
        from memory3.service.child_process import ServiceProcess
        from memory3.service.embedded_pg import EmbeddedPostgres

        self.admin_key = "bench-admin-" + secrets.token_hex(16)
        self.pg = EmbeddedPostgres(data_dir / "db")
        self.process = ServiceProcess(
            self.pg.url, data_dir, self.admin_key, torch_threads=1, log_level="WARNING",
            query_cache_size=query_cache_size,  # 0: every query is embedded (the repeated prompts would hit)
            embed_batch_max=embed_batch_max,
        )
        self.target = self.process.target

    def pin(self, cores: set[int]) -> None:
        """Restrict the service and PostgreSQL (every process and thread) to ``cores``."""
        pids = [self.process.pid, self.pg.pid]  # PostgreSQL backends fork from the postmaster: they inherit
        pids += [int(p) for pid in pids for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        for pid in pids:
            for task in Path(f"/proc/{pid}/task").iterdir():
                os.sched_setaffinity(int(task.name), cores)

    def stop(self) -> None:
        self.process.stop()
        self.pg.stop()


def load_model(args):
    """(model, tokenizer, spec, reference texts, prompt token lists)."""
    from memory3.trainer.corpus import build_world

    world = build_world(seed=0, n_entities=args.entities)
    by_entity: dict[int, list[str]] = {}
    for ref in world.references_for():
        by_entity.setdefault(ref.entity_id, []).append(ref.text)
    references = [" ".join(texts) for texts in by_entity.values()]
    if args.model:
        from memory3.trainer.model import load_reference_model

        model, tokenizer, spec = load_reference_model(args.model)
    else:
        from memory3.trainer.model import build_model, default_memory_spec
        from memory3.trainer.tokenizer import train_tokenizer

        tokenizer = train_tokenizer(references, vocab_size=2048)
        ids = {k: getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
        model = build_model(args.preset, len(tokenizer), seed=0, **{f"{k}_token_id": v for k, v in ids.items()})
        spec = default_memory_spec(model)
    model.set_attn_implementation("sdpa")
    model.eval()
    # Prompts: 128 tokens each, from the corpus statements (different text than any single reference).
    stream = tokenizer(" ".join(references[::-1]), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = PROMPT_TOKENS - len(bos)
    prompts = [bos + stream[i * body + 7 : (i + 1) * body + 7] for i in range(args.prompts)]
    return model, tokenizer, spec, references, prompts


class InjectionOnly:
    """Stands in for the supply to isolate the decode loop's own cost: every request is answered at
    once with the same 5 already-decoded memories (no query embedding, search, fetch or decode).
    The difference between this row and "memory warm" is what retrieval costs the decoder."""

    def __init__(self, supply: MemorySupply, memories, ids) -> None:
        self.spec, self.timings = supply.spec, supply.timings
        self.memories, self.ids = list(memories), list(ids)

    def model_space(self, bank) -> bool:
        return False  # queries stay texts, which request() never looks at

    def request(self, bank, queries, top_k=5):
        future = concurrent.futures.Future()
        future.timing = StepTiming(rows=len(queries))
        self.timings.append(future.timing)
        scores = [0.0] * len(self.memories[:top_k])
        rows = [Retrieved(q, [], self.memories[:top_k], self.ids[:top_k], scores) if q else Retrieved(q) for q in queries]
        future.set_result(rows)
        return future


@dataclass
class Row:
    mode: str
    batch: int
    tokens_per_s: float
    steps: list


def run_mode(model, tokenizer, supply, bank, prompts, batch, mode, *, lag=0, pipelined=False) -> tuple[float, int]:
    """Generate for all prompts in batches; (seconds, generated tokens)."""
    batches = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    options = DecodingOptions(max_new_tokens=NEW_TOKENS, chunk=CHUNK, stop_at_eos=False)
    tokens = 0
    start = time.perf_counter()
    ahead = decoding.prefetch(tokenizer, supply, bank, batches[0], CHUNK, TOP_K) if pipelined else None
    for i, group in enumerate(batches):
        current = ahead
        if pipelined and i + 1 < len(batches):
            ahead = decoding.prefetch(tokenizer, supply, bank, batches[i + 1], CHUNK, TOP_K)
        if mode == "plain":
            out = decoding.generate_plain(model, tokenizer, group, options)
        elif mode == "rag":
            out = decoding.generate_rag(model, tokenizer, group, MemoryOptions(supply, bank, top_k=TOP_K), options)
        else:
            memory = MemoryOptions(supply, bank, top_k=TOP_K, lag=lag, prefetch=current)
            out = decoding.generate_with_memory(model, tokenizer, group, memory, options)
        tokens += sum(len(r.token_ids) for r in out)
    return time.perf_counter() - start, tokens


def step_breakdown(timings) -> dict[str, float]:
    if not timings:
        return {}
    keys = ("search", "fetch", "decode", "inject", "wait", "total")
    return {k: 1000 * statistics.fmean(getattr(t, k) for t in timings) for k in keys} | {"steps": len(timings)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="reference model directory (trainer/ output); default: random small Llama")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per batch-8 measurement (a multiple of 8)")
    parser.add_argument("--prompts-b1", type=int, default=4, help="prompts per batch-1 measurement")
    parser.add_argument("--preset", default="small", help="trainer model preset for the random model (small, base, ...)")
    parser.add_argument("--entities", type=int, default=120, help="knowledge-world entities (one reference each)")
    parser.add_argument("--lag", type=int, default=8, help="pipelined mode: tokens between a chunk boundary and its switch")
    parser.add_argument("--repeats", type=int, default=2, help="measure each figure this many times, keep the best")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--name", default="decoding", help="results file name in bench/results (without suffix)")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw bench/results/NAME.png from the figures in NAME.md (nothing is measured)")
    parser.add_argument("--split-cores", action="store_true",
                        help="pin the service and PostgreSQL to the last core and the decoder to the others (as when "
                             "the model runs on an accelerator and the service on the host's CPU)")
    parser.add_argument("--embed-batch-max", type=int, default=8,
                        help="server's cap on texts per embedder call (MEMORY3_EMBED_BATCH_MAX)")
    parser.add_argument("--query-cache", type=int, default=0,
                        help="server's query-embedding LRU size (default 0: off, since this bench repeats its prompts)")
    args = parser.parse_args(argv)
    if args.replot:
        return replot(args.name)
    service_cores = None
    if args.split_cores:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            parser.error("--split-cores needs at least 2 cores")
        service_cores = {cores[-1]}
        os.sched_setaffinity(0, set(cores[:-1]))  # before torch starts its thread pool
        torch.set_num_threads(args.threads or len(cores) - 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer, spec, references, prompts = load_model(args)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    print(f"model: {params / 1e6:.1f}M parameters, {model.config.num_hidden_layers} layers, memory layers "
          f"{spec.memory_layers}, {len(references)} references, {len(prompts)} prompts x {PROMPT_TOKENS} tokens")

    data_dir = Path(tempfile.mkdtemp(prefix="m3-bench-"))
    server = LoopbackServer(data_dir, args.query_cache, args.embed_batch_max)
    if service_cores:
        server.pin(service_cores)
    try:
        admin = Client(server.target, server.admin_key)
        admin.create_tenant("bench")
        api_key = admin.issue_key("bench", "bench")[1]
        admin.close()
        bank = "bench"
        with Client(server.target, api_key) as client:
            client.create_bank(BankInfo(bank, model_fingerprint(model), spec))
        rows: list[Row] = []
        with MemorySupply(server.target, api_key, model, spec, tokenizer=tokenizer) as supply:
            writer = MemoryWriter(MemoryEncoder(model, tokenizer, spec), skip_short=True)
            supply.run(writer.write(supply.client, bank, [(f"e{i}", t) for i, t in enumerate(references)]))
            # warm up the server's embedder, the model and the code paths once (not measured)
            warm = DecodingOptions(max_new_tokens=8, stop_at_eos=False)
            decoding.generate_with_memory(model, tokenizer, prompts[:1], MemoryOptions(supply, bank), warm)
            decoding.generate_rag(model, tokenizer, prompts[:1], MemoryOptions(supply, bank), warm)
            for batch in (1, 8):
                variants = [
                    ("plain", {}, None), ("rag", {}, None),
                    ("memory cold", {}, "cold"), ("memory warm", {}, "warm"),
                    ("memory warm pipelined", {"lag": args.lag, "pipelined": True}, "warm"),
                    ("memory injection only", {}, "none"),
                ]
                group = prompts if batch > 1 else prompts[: args.prompts_b1]
                best: dict[str, tuple[float, list]] = {}
                for _ in range(args.repeats):  # rounds interleave the modes, so load drift hits all alike
                    for name, options, cache in tqdm(variants, desc=f"batch {batch}", leave=False):
                        if cache == "cold":
                            supply.cache.clear()
                        elif cache == "warm" and not len(supply.cache):
                            run_mode(model, tokenizer, supply, bank, group, batch, "memory")
                        supply.timings.clear()
                        source = supply
                        if cache == "none":
                            keys = supply.cache.keys()[-TOP_K:]
                            source = InjectionOnly(supply, [supply.cache.get(k, count=False) for k in keys], [k[1] for k in keys])
                        seconds, tokens = run_mode(model, tokenizer, source, bank, group, batch, name.split()[0], **options)
                        if name not in best or tokens / seconds > best[name][0]:
                            best[name] = (tokens / seconds, list(supply.timings))
                for name, _, _ in variants:
                    rows.append(Row(name, batch, *best[name]))
                    print(f"batch {batch} {name:24s} {best[name][0]:8.1f} tok/s")
            hit_rate = supply.cache.hit_rate
    finally:
        server.stop()
    report(rows, args, params, spec, hit_rate)


def report(rows: list[Row], args, params, spec, hit_rate) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    rate = {(r.mode, r.batch): r.tokens_per_s for r in rows}
    lines = [
        "# Decoding speed: plain vs RAG vs explicit memory",
        "",
        f"Model: {'`' + args.model + '`' if args.model else f'random Llama (trainer preset {args.preset})'}, "
        f"{params / 1e6:.1f}M parameters, memory layers {list(spec.memory_layers)}, "
        f"{spec.tokens_per_head} tokens/head, codec {spec.codec}. {PROMPT_TOKENS} prompt tokens, {NEW_TOKENS} generated, "
        f"chunk {CHUNK}, top-{TOP_K}; server on loopback in its own process (embedded PostgreSQL, built-in "
        f"embedder, query-embedding cache {args.query_cache or 'off'}, at most {args.embed_batch_max} texts per embedder call); "
        f"CPU, torch threads {torch.get_num_threads()}, {os.cpu_count()} cores"
        f"{', service and PostgreSQL pinned to their own core (--split-cores)' if args.split_cores else ''}. "
        f"Best of {args.repeats}.",
        "",
        "| batch | mode | tok/s | × plain | × RAG | target |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        plain, rag = rate[("plain", r.batch)], rate[("rag", r.batch)]
        target = ""
        if r.mode.startswith("memory"):
            t_plain, t_rag = TARGETS[("plain", r.batch)], TARGETS[("rag", r.batch)]
            ok_p = "✓" if r.tokens_per_s / plain >= t_plain else "✗"
            ok_r = "✓" if r.tokens_per_s / rag >= t_rag else "✗"
            target = f"≥{t_plain}× plain {ok_p}, ≥{t_rag}× RAG {ok_r}"
        lines.append(
            f"| {r.batch} | {r.mode} | {r.tokens_per_s:.1f} | {r.tokens_per_s / plain:.2f} | {r.tokens_per_s / rag:.2f} | {target} |"
        )
    lines += [
        "",
        "Retrieval steps, mean milliseconds per step (one step = one retrieval for all rows of a batch):",
        "",
        "| batch | mode | steps | search (embed+search) | fetch | decode | inject | wait (not hidden) | total |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = step_breakdown(r.steps)
        if b:
            lines.append(
                f"| {r.batch} | {r.mode} | {b['steps']} | {b['search']:.1f} | {b['fetch']:.1f} | {b['decode']:.1f} | "
                f"{b['inject']:.2f} | {b['wait']:.1f} | {b['total']:.1f} |"
            )
    lines += ["", f"Cache hit rate over the whole run: {hit_rate:.2f}.", ""]
    text = "\n".join(lines)
    print(text)
    (RESULTS / f"{args.name}.md").write_text(text)
    plot(rows, args.name, args.model or f"a random Llama of trainer preset {args.preset}")


def replot(name: str) -> None:
    """Redraw NAME.png from the tok/s table and the "Model:" line of an earlier run's NAME.md."""
    text = (RESULTS / f"{name}.md").read_text()
    model = text.split("Model: ", 1)[1].split(",", 1)[0]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0].isdigit():  # | batch | mode | tok/s | × plain | × RAG | target |
            rows.append(Row(cells[1], int(cells[0]), float(cells[2]), []))
    plot(rows, name, model)


def plot(rows: list[Row], name: str, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memory3.trainer.figures import caption

    modes = list(dict.fromkeys(r.mode for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, batch in zip(axes, (1, 8)):
        values = [next(r.tokens_per_s for r in rows if r.mode == m and r.batch == batch) for m in modes]
        bars = ax.bar(range(len(modes)), values, color=["#777", "#c66", "#69c", "#36a", "#148", "#9b9"][: len(modes)])
        ax.set_xticks(range(len(modes)), [m.replace(" ", "\n") for m in modes], fontsize=7)
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("generated tokens / s")
        for bar, v in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"Decoding speed of {model}: {PROMPT_TOKENS} prompt + {NEW_TOKENS} generated tokens, "
                 f"top-{TOP_K} memories every {CHUNK}", fontsize=10)
    fig.tight_layout()
    caption(fig, model)
    fig.savefig(RESULTS / f"{name}.png", dpi=120)


if __name__ == "__main__":
    main()
