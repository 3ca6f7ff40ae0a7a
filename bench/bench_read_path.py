"""The read path before and after a change, in one run: two `memory3 serve` processes on one
database, one running the service package of an earlier commit (extracted with `git archive`),
one the working tree's, and the same SQL through psycopg beside them.

* latency: Retrieve top-5 by vector with payloads, and Fetch of those 5, through each server and
  the SQL through psycopg (binary cursor: how the service reads), interleaved call by call, so
  every path sees the same machine load; p50 and p99 and their ratios;
* throughput: N concurrent clients for S seconds on each server in turn (before, after, before,
  after: drift in the machine's load falls on both), Retrieve top-5 by vector with payloads, ops/s
  and the service process's CPU per call.

Only the service package comes from the earlier commit (the SDK, the stubs and the migrations are
the working tree's): it measures the server's read path.

    python bench/bench_read_path.py --before 9ec7ade          # the commit before issue 18 item 5
    python bench/bench_read_path.py --before 9ec7ade --n 20000 --clients 16 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import psycopg
from pgvector.psycopg import register_vector

from memory3.core.memory_spec import MemorySpec
from memory3.sdk.client import BankInfo, Reference
from memory3.sdk.client.client import AsyncClient, Client
from memory3.service.child_process import ServiceProcess
from memory3.service.config import load_settings
from memory3.service.embedded_pg import EmbeddedPostgres, libpq_url

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
FINGERPRINT = "00" * 32
SPEC = MemorySpec(tuple(range(8)), 4, 64, 8, 128, "int8")  # ~32 KiB int8 payloads, as bench_service
DIM = 384

SITECUSTOMIZE = '''
import __editable___memory3_0_1_0_finder as finder
finder.MAPPING["memory3.service"] = {service!r}
'''


def payloads(count: int) -> list[bytes]:
    import torch

    from memory3.sdk.memory.codec import encode_memory
    from memory3.sdk.memory.tensors import ExplicitMemory

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        kv = torch.randn(SPEC.shape, generator=g)
        pos = torch.randint(0, SPEC.reference_length, (SPEC.shape[0], SPEC.kv_heads, SPEC.tokens_per_head), generator=g)
        out.append(encode_memory(ExplicitMemory(kv, pos, FINGERPRINT), "int8"))
    return out


def earlier_service(revision: str, into: Path) -> Path:
    """The service package of ``revision``, extracted into ``into``; a sitecustomize there makes a
    child process with it on PYTHONPATH import that package as memory3.service (editable install)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "service"], check=True,
                             capture_output=True).stdout
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "sitecustomize.py").write_text(SITECUSTOMIZE.format(service=str(into / "service")))
    return into


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


async def clients_loop(target: str, key: str, clients: int, seconds: float) -> int:
    conns = [AsyncClient(target, key) for _ in range(clients)]
    stop_at = time.perf_counter() + seconds
    done = 0

    async def one(client: AsyncClient, seed: int) -> None:
        nonlocal done
        rng = np.random.default_rng(seed)
        while time.perf_counter() < stop_at:
            await client.retrieve("b", vector=rng.standard_normal(DIM).tolist(), top_k=5, include_memory=True)
            done += 1

    await asyncio.gather(*(one(c, i) for i, c in enumerate(conns)))
    for c in conns:
        await c.close()
    return done


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision whose service package is 'before'")
    parser.add_argument("--n", type=int, default=20_000, help="references in the bank (random unit vectors)")
    parser.add_argument("--queries", type=int, default=600, help="latency samples per path")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20, help="each throughput phase (two per server)")
    parser.add_argument("--out", type=Path, default=RESULTS / "read_path.md")
    args = parser.parse_args(argv)
    revision = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.before], check=True,
                              capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    root = Path(tempfile.mkdtemp(prefix="m3rp-"))
    admin_key = "read-path-admin-" + secrets.token_hex(16)
    pg = EmbeddedPostgres(root / "db")
    servers: dict[str, ServiceProcess] = {}
    try:
        old = earlier_service(args.before, root / "before")
        servers["after"] = ServiceProcess(pg.url, root / "a", admin_key, log_level="WARNING")
        previous = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(old), previous]))  # the child's copy
        try:
            servers["before"] = ServiceProcess(pg.url, root / "b", admin_key, log_level="WARNING")
        finally:
            if previous is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = previous
        with Client(servers["after"].target, admin_key) as admin:
            admin.create_tenant("rp")
            _, key = admin.issue_key("rp")
            admin.set_quota("rp", "concurrent_calls", max(32, args.clients))
        blobs = payloads(32)
        vectors = np.random.default_rng(0).standard_normal((args.n, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        with Client(servers["after"].target, key) as client:
            client.create_bank(BankInfo("b", FINGERPRINT, SPEC, "client", DIM, "cosine"))
            client.write_many("b", (Reference(f"r{i}", f"reference {i}", {"n": i % 10}, vectors[i].tolist(),
                                              blobs[i % len(blobs)]) for i in range(args.n)), batch_size=250)
        raw = psycopg.connect(libpq_url(pg.url), autocommit=True)
        register_vector(raw)
        raw.execute(f"SET hnsw.ef_search = {load_settings().hnsw_ef_search}")
        partition = "memory_references_b" + str(raw.execute("SELECT id FROM banks WHERE name = 'b'").fetchone()[0])
        search_sql = (f"SELECT external_id, text, metadata, memory_size, memory_crc32, memory,"
                      f" 1 - (embedding::vector({DIM}) <=> %(q)s::vector({DIM})) FROM {partition}"
                      f" ORDER BY embedding::vector({DIM}) <=> %(q)s::vector({DIM}) LIMIT 5")
        fetch_sql = (f"SELECT external_id, text, metadata, memory_size, memory_crc32, memory FROM {partition}"
                     " WHERE external_id = ANY(%(ids)s)")
        clients = {name: Client(server.target, key) for name, server in servers.items()}
        queries = np.random.default_rng(1).standard_normal((args.queries + 30, DIM)).astype(np.float32)
        lat: dict[str, list[float]] = {k: [] for k in (
            "retrieve before", "retrieve after", "sql", "fetch before", "fetch after", "fetch sql")}
        load_before = os.getloadavg()[0]
        for i, q in enumerate(queries):
            timed = i >= 30  # the first calls warm pools, prepared statements and caches
            for name in ("before", "after"):
                started = time.perf_counter()
                hits = clients[name].retrieve("b", vector=q.tolist(), top_k=5, include_memory=True)
                if timed:
                    lat[f"retrieve {name}"].append(time.perf_counter() - started)
            started = time.perf_counter()
            with raw.cursor(binary=True) as cursor:
                rows = cursor.execute(search_sql, {"q": q}).fetchall()
            if timed:
                lat["sql"].append(time.perf_counter() - started)
            assert len(rows) == 5 and len(hits) == 5
            ids = [h.external_id for h in hits]
            for name in ("before", "after"):
                started = time.perf_counter()
                clients[name].fetch("b", ids)
                if timed:
                    lat[f"fetch {name}"].append(time.perf_counter() - started)
            started = time.perf_counter()
            with raw.cursor(binary=True) as cursor:
                cursor.execute(fetch_sql, {"ids": ids}).fetchall()
            if timed:
                lat["fetch sql"].append(time.perf_counter() - started)
        for client in clients.values():
            client.close()
        raw.close()
        throughput: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
        for name in ("before", "after", "before", "after"):
            process = psutil.Process(servers[name].pid)
            cpu = sum(process.cpu_times()[:2])
            done = asyncio.run(clients_loop(servers[name].target, key, args.clients, args.seconds))
            throughput[name].append((done / args.seconds, 1000 * (sum(process.cpu_times()[:2]) - cpu) / max(done, 1)))
        load_after = os.getloadavg()[0]
    finally:
        for server in servers.values():
            server.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)

    p50 = {k: pct(v, 50) for k, v in lat.items()}
    p99 = {k: pct(v, 99) for k, v in lat.items()}
    ops = {k: float(np.mean([o for o, _ in v])) for k, v in throughput.items()}
    cpu_per_call = {k: float(np.mean([c for _, c in v])) for k, v in throughput.items()}
    lines = [
        f"# memory3 read path before ({revision}) and after ({head}{'+changes' if dirty() else ''}), one run",
        "",
        f"{args.n:,} references (random 384-d unit vectors, ~32 KiB int8 payloads), one database, two `memory3 serve`"
        f" processes (before: the service package of {revision}; after: the working tree), the blocking SDK client on"
        f" loopback; {len(lat['sql'])} calls per path, interleaved. Machine: {os.cpu_count()} cores, 1-minute load"
        f" average {load_before:.1f} at the start and {load_after:.1f} at the end (other work included).",
        "",
        "| figure | before | after | after / before | psycopg (binary) | before / psycopg | after / psycopg |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for what, key_, sql in (("Retrieve top-5 + payloads", "retrieve", "sql"), ("Fetch 5 + payloads", "fetch", "fetch sql")):
        for q, table in (("p50", p50), ("p99", p99)):
            b, a, s = table[f"{key_} before"], table[f"{key_} after"], table[sql]
            lines.append(f"| {what} {q} (ms) | {b:.2f} | {a:.2f} | {a / b:.2f} | {s:.2f} | {b / s:.2f} | {a / s:.2f} |")
    lines += [
        "",
        f"| {args.clients} clients, Retrieve top-5 + payloads by vector | before | after | after / before |",
        "|---|---:|---:|---:|",
        f"| calls/s (mean of 2 phases of {args.seconds:.0f} s each) | {ops['before']:.1f} | {ops['after']:.1f} | "
        f"{ops['after'] / ops['before']:.2f} |",
        f"| service process CPU per call (ms) | {cpu_per_call['before']:.2f} | {cpu_per_call['after']:.2f} | "
        f"{cpu_per_call['after'] / cpu_per_call['before']:.2f} |",
        "",
        f"    {' '.join(['python bench/bench_read_path.py', *(argv if argv is not None else sys.argv[1:])])}",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


def dirty() -> bool:
    status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "service"], capture_output=True, text=True)
    return bool(status.stdout.strip())


if __name__ == "__main__":
    main()
