"""Where a Retrieve and a Fetch spend the server's time: py-spy samples `memory3 serve` (a child
process) while one client calls in a loop, and the samples are summed by layer.

    python bench/profile_reads.py                       # 3,000 references, 20 s per call kind
    python bench/profile_reads.py --seconds 30 --out /tmp/profile
    python bench/profile_reads.py --service-from 9ec7ade      # the server as it was at that commit

For each call kind (Retrieve top-5 by vector with payloads; Fetch of those 5 with payloads) it
prints the share of the server's samples per layer (gRPC/asyncio internals, psycopg, SQLAlchemy's
pool, protobuf, the memory3 service, ...) and the 15 functions with the most samples of their
own, and leaves the collapsed stacks (py-spy's raw format: flamegraph.pl or speedscope read them)
under --out. The client's own latency p50 is printed beside, from the same loop.
"""

from __future__ import annotations

import argparse
import collections
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from memory3.core.memory_spec import MemorySpec
from memory3.sdk.client import BankInfo, Reference
from memory3.sdk.client.client import Client
from memory3.service.child_process import ServiceProcess
from memory3.service.embedded_pg import EmbeddedPostgres

FINGERPRINT = "00" * 32
SPEC = MemorySpec(tuple(range(8)), 4, 64, 8, 128, "int8")
DIM = 384

# (layer, substrings of a frame's file or function that put it there), first match wins, checked
# from the innermost frame outwards.
LAYERS = [
    ("psycopg", ("psycopg/", "psycopg_binary", "pgvector/")),
    ("sqlalchemy (pool, engine)", ("sqlalchemy/",)),
    ("protobuf", ("google/protobuf",)),
    ("memory3 service", ("memory3/service/", "/service/")),
    ("memory3 core", ("memory3/core/", "/core/")),
    ("grpc + asyncio", ("grpc/", "grpc_", "asyncio/", "cygrpc", "_cython", "selectors.py")),
]


def payload(seed: int) -> bytes:
    import torch

    from memory3.sdk.memory.codec import encode_memory
    from memory3.sdk.memory.tensors import ExplicitMemory

    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(SPEC.shape, generator=g)
    pos = torch.randint(0, SPEC.reference_length, (SPEC.shape[0], SPEC.kv_heads, SPEC.tokens_per_head), generator=g)
    return encode_memory(ExplicitMemory(kv, pos, FINGERPRINT), "int8")


def layer_of(frame: str) -> str | None:
    for name, marks in LAYERS:
        if any(mark in frame for mark in marks):
            return name
    return None


def summarise(raw: Path) -> str:
    """Layer shares (the innermost frame that belongs to a known layer decides) and top self functions."""
    layers: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in reversed(frames):
            found = layer_of(frame)
            if found:
                layers[found] += n
                break
        else:
            layers["other (interpreter, idle loop)"] += n
    lines = [f"{total} samples", "", "| layer | share |", "|---|---:|"]
    lines += [f"| {name} | {100 * n / total:.1f} % |" for name, n in layers.most_common()]
    lines += ["", "| function (own samples) | share |", "|---|---:|"]
    lines += [f"| `{name[:110]}` | {100 * n / total:.1f} % |" for name, n in own.most_common(15)]
    return "\n".join(lines)


def loop(call, seconds: float) -> list[float]:
    latencies = []
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - started)
    return latencies


def profiled(pid: int, out: Path, call, seconds: float, rate: int) -> tuple[str, float]:
    """Run ``call`` in a loop for ``seconds`` while py-spy samples the server."""
    spy = subprocess.Popen(
        ["py-spy", "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--gil",
         "--duration", str(int(seconds)), "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(1.0)  # py-spy attaches
    result: list[list[float]] = []
    worker = threading.Thread(target=lambda: result.append(loop(call, seconds - 1.5)))
    worker.start()
    worker.join()
    spy.wait(60)
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed: {spy.stderr.read()}")
    calls = len(result[0])
    summary = summarise(out)
    samples = int(summary.split()[0])
    held = f"{calls} calls; the server held the GIL {1000 * samples / rate / calls:.2f} ms a call (sampled)\n\n"
    return held + summary, float(np.percentile(result[0], 50) * 1000)


def compare(server, pg, client, queries, n: int) -> str:
    """Retrieve top-5 with payloads p50 through the service vs the same SQL through psycopg
    (binary results, as the service reads), interleaved call by call so both see the same load."""
    import psycopg
    from pgvector.psycopg import register_vector

    from memory3.service.config import load_settings
    from memory3.service.embedded_pg import libpq_url

    raw = psycopg.connect(libpq_url(pg.url), autocommit=True)
    register_vector(raw)
    raw.execute(f"SET hnsw.ef_search = {load_settings().hnsw_ef_search}")
    partition = "memory_references_b" + str(raw.execute("SELECT id FROM banks WHERE name = 'p'").fetchone()[0])
    sql = (f"SELECT external_id, text, metadata, memory_size, memory_crc32, memory,"
           f" 1 - (embedding::vector({DIM}) <=> %(q)s::vector({DIM})) FROM {partition}"
           f" ORDER BY embedding::vector({DIM}) <=> %(q)s::vector({DIM}) LIMIT 5")
    service, direct = [], []
    for _ in range(n):
        q = np.asarray(next(queries), dtype=np.float32)
        started = time.perf_counter()
        client.retrieve("p", vector=q.tolist(), top_k=5, include_memory=True)
        service.append(time.perf_counter() - started)
        started = time.perf_counter()
        with raw.cursor(binary=True) as cursor:
            rows = cursor.execute(sql, {"q": q}).fetchall()
        direct.append(time.perf_counter() - started)
        assert len(rows) == 5
    raw.close()
    s50, d50 = np.percentile(service, 50) * 1000, np.percentile(direct, 50) * 1000
    return f"Retrieve top-5 + payloads p50: service {s50:.2f} ms, psycopg {d50:.2f} ms, ratio {s50 / d50:.2f}\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000, help="references in the bank")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--compare", type=int, default=300,
                        help="first time this many Retrieves beside the same SQL through psycopg, interleaved (0: skip)")
    parser.add_argument("--only-compare", action="store_true", help="stop after the comparison (no py-spy)")
    parser.add_argument("--service-from", metavar="REV",
                        help="profile the service package of this git revision instead of the working tree's")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "memory3-profile")
    args = parser.parse_args(argv)
    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not on PATH (pip install py-spy)")
    args.out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="m3prof-"))
    admin_key = "profile-admin-" + secrets.token_hex(16)
    pg = EmbeddedPostgres(root / "db")
    previous = os.environ.get("PYTHONPATH")
    if args.service_from:  # the child imports memory3.service from the revision (bench_read_path.py)
        from bench_read_path import earlier_service

        old = earlier_service(args.service_from, root / "before")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(old), previous]))
    try:
        server = ServiceProcess(pg.url, root, admin_key, log_level="WARNING")
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous
    try:
        with Client(server.target, admin_key) as admin:
            admin.create_tenant("profile")
            _, key = admin.issue_key("profile")
        blobs = [payload(i) for i in range(16)]
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((args.n, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        with Client(server.target, key) as client:
            client.create_bank(BankInfo("p", FINGERPRINT, SPEC, "client", DIM, "cosine"))
            client.write_many("p", (Reference(f"r{i}", f"reference text {i}", {"n": str(i % 10)}, vectors[i].tolist(),
                                              blobs[i % 16]) for i in range(args.n)), batch_size=200)
            queries = iter(np.random.default_rng(1).standard_normal((1_000_000, DIM)).tolist())
            ids = [h.external_id for h in client.retrieve("p", vector=next(queries), top_k=5)]
            for _ in range(50):  # warm: prepared statements, caches, pool
                client.retrieve("p", vector=next(queries), top_k=5, include_memory=True)
                client.fetch("p", ids)
            if args.compare:
                print(compare(server, pg, client, queries, args.compare), flush=True)
            if args.only_compare:
                return
            for name, call in (
                ("retrieve", lambda: client.retrieve("p", vector=next(queries), top_k=5, include_memory=True)),
                ("fetch", lambda: client.fetch("p", ids)),
            ):
                summary, p50 = profiled(server.pid, args.out / f"{name}.raw", call, args.seconds, args.rate)
                print(f"## {name}: client p50 {p50:.2f} ms over the profiled loop\n\n{summary}\n", flush=True)
    finally:
        server.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"collapsed stacks: {args.out}/retrieve.raw, {args.out}/fetch.raw")


if __name__ == "__main__":
    main()
