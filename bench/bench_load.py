"""Load: N concurrent clients on loopback mixing Write, Retrieve+Fetch and trajectory Log for a
bounded time, against `memory3 serve` as a child process (its memory is measured on its own).

Prints throughput, p50/p99 per operation beside the same operation unloaded (one client, same
run), error counts by status, back-pressure refusals, and the server's peak RSS. Target: 64
clients for 60 s with zero errors (busy refusals with pushback are retried, not errors).

    python bench/bench_load.py                      # 64 clients, 60 s
    python bench/bench_load.py --clients 16 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch

from memory3.core.episodes import Decision, Episode
from memory3.core.memory_spec import MemorySpec
from memory3.sdk.client import BankInfo, Reference
from memory3.sdk.client.client import AsyncClient, Client
from memory3.sdk.memory.codec import encode_memory
from memory3.sdk.memory.tensors import ExplicitMemory
from memory3.service.child_process import ServiceProcess
from memory3.service.embedded_pg import EmbeddedPostgres

RESULTS = Path(__file__).resolve().parent / "results"
ADMIN = "load-admin-" + secrets.token_hex(16)
FINGERPRINT = "11" * 32
SPEC = MemorySpec(tuple(range(4)), 4, 64, 8, 128, "int8")  # ~17 KB payloads
DIM = 64


def payloads(n: int) -> list[bytes]:
    g = torch.Generator().manual_seed(1)
    return [
        encode_memory(ExplicitMemory(torch.randn(SPEC.shape, generator=g),
                                     torch.randint(0, 128, (4, 4, 8), generator=g), FINGERPRINT), "int8")
        for _ in range(n)
    ]


class Recorder:
    def __init__(self) -> None:
        self.latency = collections.defaultdict(list)
        self.errors = collections.Counter()
        self.busy = 0

    async def timed(self, name: str, coroutine_factory):
        while True:
            started = time.perf_counter()
            try:
                await coroutine_factory()
                self.latency[name].append(time.perf_counter() - started)
                return
            except grpc.aio.AioRpcError as err:
                pushback = dict(err.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and pushback:
                    self.busy += 1
                    await asyncio.sleep(int(pushback) / 1000)
                    continue
                self.errors[f"{name}:{err.code().name}"] += 1
                return


async def client_loop(client: AsyncClient, rec: Recorder, blobs, stop_at: float, seed: int) -> None:
    rng = random.Random(seed)
    n = 0
    while time.perf_counter() < stop_at:
        n += 1
        op = rng.random()
        if op < 0.4:
            refs = [Reference(f"c{seed}-{n}-{i}", f"load text {seed} {n} {i}", {"c": str(seed)},
                              np.random.default_rng(n * 131 + i).standard_normal(DIM).tolist(), rng.choice(blobs))
                    for i in range(8)]
            await rec.timed("write(8 refs)", lambda: client.write("load", refs))
        elif op < 0.8:
            query = np.random.default_rng(n).standard_normal(DIM).tolist()

            async def retrieve_fetch():
                hits = await client.retrieve("load", vector=query, top_k=5)
                await client.fetch("load", [h.external_id for h in hits])

            await rec.timed("retrieve+fetch(top-5)", retrieve_fetch)
        else:
            episodes = [Episode(list(range(16)), list(range(32)),
                                [Decision(p, p, 0.5, 0, 0.7, True, 0) for p in range(32)], FINGERPRINT, 1, "load")
                        for _ in range(4)]
            await rec.timed("log(4 episodes)", lambda: client.log_episodes(episodes))


async def run_clients(target: str, key: str, clients: int, seconds: float, blobs) -> Recorder:
    rec = Recorder()
    conns = [AsyncClient(target, key, write_retries=0) for _ in range(clients)]
    stop_at = time.perf_counter() + seconds
    await asyncio.gather(*(client_loop(c, rec, blobs, stop_at, i) for i, c in enumerate(conns)))
    for c in conns:
        await c.close()
    return rec


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q)) if values else float("nan")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--pool-size", type=int, default=10, help="server's database pool (MEMORY3_DB_POOL_SIZE)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="memory3-load-"))
    pg = EmbeddedPostgres(root / "db")
    server = ServiceProcess(pg.url, root, ADMIN, db_pool_size=args.pool_size, log_level="WARNING")
    try:
        with Client(server.target, ADMIN) as admin:
            admin.create_tenant("load")
            _, key = admin.issue_key("load")
        blobs = payloads(16)
        with Client(server.target, key) as client:
            client.create_bank(BankInfo("load", FINGERPRINT, SPEC, "client", DIM, "cosine"))
            rng = np.random.default_rng(0)
            client.write_many("load", (Reference(f"seed{i}", f"seed {i}", {}, rng.standard_normal(DIM).tolist(),
                                                 blobs[i % 16]) for i in range(2000)), batch_size=200)
        baseline = asyncio.run(run_clients(server.target, key, 1, min(10.0, args.seconds / 4), blobs))
        loaded = asyncio.run(run_clients(server.target, key, args.clients, args.seconds, blobs))
        peak_rss = server.peak_rss_bytes()
    finally:
        server.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)

    total_ops = sum(len(v) for v in loaded.latency.values())
    errors = sum(loaded.errors.values())
    lines = [
        f"# memory3 load: {args.clients} clients x {args.seconds:.0f} s on loopback, DB pool {args.pool_size}",
        "",
        "| operation | ops/s | p50 ms (unloaded) | p50 ratio | p99 ms (unloaded) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in sorted(loaded.latency):
        lat, base = loaded.latency[name], baseline.latency.get(name, [])
        lines.append(
            f"| {name} | {len(lat) / args.seconds:.1f} | {pct(lat, 50):.1f} ({pct(base, 50):.1f}) | "
            f"{pct(lat, 50) / pct(base, 50):.1f}x | {pct(lat, 99):.1f} ({pct(base, 99):.1f}) |"
        )
    lines += [
        "",
        f"total {total_ops / args.seconds:.1f} ops/s; errors {errors} {dict(loaded.errors) or ''} "
        f"(target 0: {'met' if errors == 0 else 'MISSED'}); busy refusals retried after pushback: {loaded.busy}",
        f"server peak RSS: {peak_rss / 2**20:.0f} MiB",
    ]
    report = "\n".join(lines)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "load.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
