"""Benchmark the memory codec: storage, fidelity and speed per scheme.

Checks the storage claim of Memory3 (arXiv 2407.01178), sparse and quantized memories far below the
dense bf16 KV of the whole reference, per scheme: bytes per memory with everything counted against
that baseline; per-vector K/V cosine and the error of a memory layer's attention output; encode and
decode speed, decode beside raw zstd; with ``--model``, the throughput of
:class:`memory3.sdk.memory.encoder.MemoryEncoder` beside a plain forward. The Memory3 shape uses
synthetic structured KV (indicative only); ``--model`` adds real memories encoded from ``--texts``.
PQ codebooks are trained on other memories than those evaluated.

Usage: python bench/bench_codec.py [--model DIR --texts FILE] [--train N (150)] [--eval N]
Writes bench/results/codec.md, codec.json (every row) and codec_bytes_vs_fidelity.png (drawn from the
JSON; ``--replot`` redraws it).
Measurements: docs/experiments.md ("Codec storage", "Codec speed", "PQ codebooks").
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import zstandard
from tqdm import tqdm

from memory3.core.blob import read_header
from memory3.sdk.memory.codec import decode_memory, encode_memory
from memory3.sdk.memory.pq import train_codebook
from memory3.sdk.memory.synthetic import SyntheticKV
from memory3.sdk.memory.tensors import ExplicitMemory
from memory3.sdk.model.positions import probe_geometry

RESULTS = Path(__file__).resolve().parent / "results"
PQ_SETTINGS = {"pq14": 14, "pq13": 13, "pq9": 9}
TARGETS = {"int8": 64, "int4": 120, "pq13": 365, "pq9": 500, "pq9 residual": 500}
LOGIT_STD = 2.0
FINGERPRINT = "5e" * 32




@dataclass
class Row:
    scheme: str
    bytes: float
    ratio: float
    cos_k: float
    cos_k_min: float
    cos_v: float
    cos_v_min: float
    attn_err: float
    enc_per_s: float
    dec_mbs: float
    zstd_mbs: float


def attention_error(orig: ExplicitMemory, dec: ExplicitMemory, queries: torch.Tensor) -> torch.Tensor:
    """Relative error of a memory layer's attention output per (layer, head)."""
    scale = 1 / math.sqrt(queries.shape[-1])
    raw = queries @ orig.keys.transpose(-1, -2) * scale
    q = queries * (LOGIT_STD / raw.flatten(2).std(dim=-1).clamp_min(1e-6))[..., None, None]

    def attend(m):
        return torch.softmax(q @ m.keys.float().transpose(-1, -2) * scale, -1) @ m.values.float()

    ref, got = attend(orig), attend(dec)
    return (got - ref).flatten(2).norm(dim=-1) / ref.flatten(2).norm(dim=-1).clamp_min(1e-9)


def measure(name, scheme, codebook, evals, queries, dense_bytes, repeats) -> Row:
    mems = [m.to(torch.float32) for m in evals]
    t0 = time.perf_counter()
    blobs = [encode_memory(m, scheme, codebook) for m in mems]
    enc_s = time.perf_counter() - t0
    decoded = [decode_memory(b, codebook=codebook) for b in blobs]
    ck, cv, err = [], [], []
    for m, d in zip(mems, decoded):
        c = torch.nn.functional.cosine_similarity(m.kv, d.kv, dim=-1)
        ck.append(c[:, 0].flatten()), cv.append(c[:, 1].flatten())
        err.append(attention_error(m, d, queries).flatten())
    ck, cv, err = torch.cat(ck), torch.cat(cv), torch.cat(err)
    # speed: best of `repeats` passes over all blobs
    dctx = zstandard.ZstdDecompressor()
    frames = []
    for b in blobs:
        h = read_header(b)
        if h.compressed:
            frames.append((bytes(b[h.body_offset : h.body_offset + h.payload_size]), h.raw_size))
        else:
            frames.append((zstandard.ZstdCompressor(level=3).compress(b), len(b)))
    dec_t = zstd_t = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in blobs:
            decode_memory(b, codebook=codebook)
        dec_t = min(dec_t, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for f, n in frames:
            dctx.decompress(f, max_output_size=n)
        zstd_t = min(zstd_t, time.perf_counter() - t0)
    total = sum(len(b) for b in blobs)
    size = total / len(blobs)
    return Row(
        name, size, dense_bytes / size, ck.mean().item(), ck.min().item(), cv.mean().item(), cv.min().item(),
        err.mean().item(), len(blobs) / enc_s, total / dec_t / 1e6, total / zstd_t / 1e6,
    )


def run_shape(title, train, evals, queries, dense_bytes, pq_iters, repeats, key_rope,
              targets=True) -> tuple[str, list[Row]]:
    """Every scheme on one memory shape; ``key_rope``: the RoPE frequencies of the keys;
    ``targets``: mark the ratio targets (they are stated for the Memory3 shape only)."""
    head_dim = train[0].kv.shape[-1]
    rows = []
    for scheme in ("fp16", "int8", "int4"):
        rows.append(measure(scheme, scheme, None, evals, queries, dense_bytes, repeats))
    settings = [(name, m, key_rope, "product") for name, m in PQ_SETTINGS.items()]
    settings += [("pq9 keys as stored", 9, None, "product"), ("pq9 residual", 9, key_rope, "residual")]
    for name, m, rope, quantizer in tqdm(settings, desc=f"{title}: training PQ codebooks", leave=False):
        cb = train_codebook(train, min(m, head_dim), version=1, kmeans_iters=pq_iters, key_rope=rope,
                            quantizer=quantizer)
        rows.append(measure(name, "pq", cb, evals, queries, dense_bytes, repeats))
    return table(title, rows, dense_bytes, TARGETS if targets else {}), rows


def table(title, rows, dense_bytes, targets) -> str:
    fp16 = rows[0]
    lines = [
        f"### {title}",
        "",
        f"Baselines: dense bf16 KV of the whole reference = {dense_bytes:,} bytes; encode rate vs fp16; "
        "decode MB/s vs raw zstd decompression of the same bytes.",
        "",
        "| scheme | bytes/memory | vs dense bf16 | target | cos K mean/min | cos V mean/min | attn-out rel err "
        "| encode mem/s (vs fp16) | decode MB/s | zstd MB/s | decode/zstd |",
        "|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        target = targets.get(r.scheme)
        mark = "" if target is None else f">= {target}x {'met' if r.ratio >= target else 'MISSED'}"
        lines.append(
            f"| {r.scheme} | {r.bytes:,.0f} | {r.ratio:.1f}x | {mark} | {r.cos_k:.4f} / {r.cos_k_min:.4f} "
            f"| {r.cos_v:.4f} / {r.cos_v_min:.4f} | {r.attn_err:.4f} | {r.enc_per_s:,.0f} ({r.enc_per_s / fp16.enc_per_s:.2f}x) "
            f"| {r.dec_mbs:,.0f} | {r.zstd_mbs:,.0f} | {r.dec_mbs / r.zstd_mbs:.2f} |"
        )
    return "\n".join(lines) + "\n"


def model_memories(model_dir: str, texts_file: str | None, n: int):
    """Real memories from a trained model via the SDK encoder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memory3.core.memory_spec import MemorySpec
    from memory3.sdk.memory.encoder import MemoryEncoder, ReferenceTooShortError

    spec = MemorySpec.load(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    if texts_file:
        texts = [t.strip() for t in Path(texts_file).read_text().splitlines() if t.strip()]
    else:
        words = "river stone lantern orchard harbor meadow copper violet falcon ember glacier willow".split()
        texts = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(40 + i % 30)) + "." for i in range(n)]
    enc = MemoryEncoder(model, tok, spec)
    encoded = []  # (text, memory) of every text long enough to encode, in order
    for t in tqdm(texts, desc="encoding references"):
        try:
            encoded.append((t, enc.encode([t])[0]))
        except ReferenceTooShortError:
            pass
    throughput = encoder_throughput(enc, [t for t, _ in encoded])
    mems = [m for _, m in encoded[:n]]
    return mems, spec.dense_kv_bytes(model.config.num_hidden_layers), spec, probe_geometry(model).codebook_angles(spec.memory_layers), throughput


def encoder_throughput(enc, usable: list[str], batch_size: int = 16, repeats: int = 3) -> str:
    """The encoder's references/s beside a plain forward of the same padded batches (best of
    ``repeats``), on texts long enough to encode."""
    batches = [usable[i : i + batch_size] for i in range(0, len(usable), batch_size)]
    padded = [enc.pad(enc.tokenize(b)) for b in batches]

    def best(run) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        return len(usable) / min(times)

    def forward():
        with torch.inference_mode():
            for ids, mask in padded:
                enc.model(input_ids=ids, attention_mask=mask)

    encode_rate = best(lambda: [enc.encode(b) for b in batches])
    forward_rate = best(forward)
    return (f"Encoder: {encode_rate:,.0f} references/s ({len(usable)} references, batches of {batch_size}) vs a plain "
            f"forward of the same batches {forward_rate:,.0f} references/s = {encode_rate / forward_rate:.2f}x.")


def queries_from(pool: list[ExplicitMemory]) -> torch.Tensor:
    """(layers, heads, Q, d) key vectors of other memories, used as queries."""
    return torch.cat([m.keys.float() for m in pool], dim=2)


def plot(results: dict[str, list[Row]], path: Path) -> None:
    """Per section (synthetic Memory3 shape, the model's real memories): each scheme's attention-output
    error against its bytes per memory, one marker per scheme named in the legend (PQ variants share
    a size, so labels beside the points would overlap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memory3.trainer.figures import caption

    from matplotlib.ticker import FuncFormatter

    def kilo(x, _):
        return f"{x / 1000:g}k" if x >= 1000 else f"{x:g}"

    fig, axes = plt.subplots(1, len(results), figsize=(5.8 * len(results), 5.6), squeeze=False)
    markers = "osD^v<>Ph*X"
    for ax, (title, rows) in zip(axes[0], results.items()):
        for k, r in enumerate(rows):
            ax.scatter(r.bytes, r.attn_err, marker=markers[k % len(markers)], s=46, zorder=3,
                       label=f"{r.scheme}: {r.ratio:.0f}x smaller, cos K {r.cos_k:.3f}, cos V {r.cos_v:.3f}")
        ax.set_xscale("log"), ax.set_yscale("log"), ax.grid(alpha=0.3, which="both")
        ax.set_xlabel("bytes per memory (everything counted)"), ax.set_ylabel("attention-output relative error")
        ax.xaxis.set_major_formatter(FuncFormatter(kilo))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, pos: kilo(x, pos) if f"{x:.0e}"[0] in "25" else ""))
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.suptitle("memory3 codec: bytes per memory vs fidelity, per scheme (ratios vs dense bf16 KV)", fontsize=10)
    fig.tight_layout()
    caption(fig, " / ".join(results))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF causal LM dir with memory_spec.json (trainer/ output)")
    ap.add_argument("--texts", help="reference texts, one per line (with --model)")
    ap.add_argument("--train", type=int, default=150,
                    help="memories to train PQ codebooks on (the residual quantizer needs ~100+, see memory3.sdk.memory.pq)")
    ap.add_argument("--eval", type=int, default=12, help="held-out memories to measure")
    ap.add_argument("--kmeans-iters", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--replot", action="store_true", help="only redraw the figure from bench/results/codec.json")
    args = ap.parse_args(argv)
    if args.replot:
        saved = json.loads((RESULTS / "codec.json").read_text())
        return plot({title: [Row(**row) for row in rows] for title, rows in saved.items()},
                    RESULTS / "codec_bytes_vs_fidelity.png")
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)

    sections, results = [], {}
    gen = SyntheticKV(22, 8, 8, 80, rank=8, fingerprint=FINGERPRINT)
    pool = [gen.sample() for _ in tqdm(range(args.train + args.eval + 2), desc="synthetic memories")]
    dense = 2 * 22 * 2 * 8 * 128 * 80 * 2  # 44 layers, K+V, 8 kv heads, 128 tokens, 80, bf16
    text, rows = run_shape(
        "Memory3 shape (22 x 2 x 8 x 8 x 80), synthetic structured KV",
        pool[: args.train], pool[args.train : args.train + args.eval], queries_from(pool[-2:]),
        dense, args.kmeans_iters, args.repeats, gen.inv_freq,
    )
    sections.append(text), print(text)
    results["Memory3 shape, synthetic KV"] = rows

    if args.model:
        mems, dense_m, spec, rotary, throughput = model_memories(args.model, args.texts, args.train + args.eval + 2)
        if len(mems) < 6:
            print(f"only {len(mems)} memories encoded from {args.model}; skipping the model section")
        else:
            n_eval = max(2, min(args.eval, len(mems) // 4))
            train, evals, q = mems[: -n_eval - 2], mems[-n_eval - 2 : -2], mems[-2:]
            shape = "x".join(str(s) for s in spec.shape)
            text, rows = run_shape(
                f"Reference model {args.model} ({shape}), real KV, {len(train)} training memories "
                "(ratio targets are the Memory3 shape's)",
                train, evals, queries_from(q), dense_m, args.kmeans_iters, args.repeats, rotary, targets=False,
            )
            text += "\n" + throughput + "\n"
            sections.append(text), print(text)
            results[f"{args.model}, real KV"] = rows

    (RESULTS / "codec.md").write_text(
        "# Memory codec benchmark\n\nGenerated by `python bench/bench_codec.py`; see its docstring for "
        "what each column means.\n\n" + "\n".join(sections)
    )
    (RESULTS / "codec.json").write_text(json.dumps({t: [asdict(r) for r in rows] for t, rows in results.items()},
                                                   indent=1) + "\n")
    plot(results, RESULTS / "codec_bytes_vs_fidelity.png")
    print(f"wrote {RESULTS / 'codec.md'} and {RESULTS / 'codec_bytes_vs_fidelity.png'}")


if __name__ == "__main__":
    main()
