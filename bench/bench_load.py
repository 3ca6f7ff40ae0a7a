"""Load: N concurrent clients on loopback against `memory3 serve` as a child process (its memory
is measured on its own), in phases of a bounded time each, every figure beside its baseline from
the same run:

* ``mixed`` (the workload of the first load test, the baseline): 40 % Write of 8 references,
  40 % Retrieve top-5 by vector then Fetch of the 5 with payloads (two calls), 20 % trajectory Log;
* ``vector``: Retrieve top-5 by vector with payloads, one call (what a decoding loop asks every
  64 tokens); ``vector2``: the same answer in two calls as in ``mixed`` (Retrieve, then Fetch);
* ``text``: Retrieve top-5 by text with payloads, every text new (the built-in embedder runs on
  each: its cache cannot help), on a bank of the built-in embedder.

Per phase: ops/s, p50/p99 beside the same operation unloaded (one client, same run), errors by
status, busy refusals, and CPU per call of the service process (event-loop thread / other threads:
the embedder runs in the latter), of PostgreSQL and of the clients, so the embedder's share of a
text query shows as the difference from a vector query. Target: the vector-query throughput at
least 2x the mixed phase's Retrieve+Fetch throughput; zero errors.

    python bench/bench_load.py                                  # 64 clients, 60 s a phase
    python bench/bench_load.py --clients 16 --seconds 10 --phases mixed,vector
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import psutil
import torch

from memory3.core.embedder import BUILTIN_DIMENSION, BUILTIN_EMBEDDER
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


PHASES = ("mixed", "vector", "vector2", "text")
WORDS = "alpha beta gamma delta river mountain engine silver orange window garden planet copper violet".split()


async def retrieve_fetch(client: AsyncClient, query: list[float]) -> None:
    """The two-call read of the mixed workload: Retrieve top-5 (no payloads), then Fetch the 5."""
    hits = await client.retrieve("load", vector=query, top_k=5)
    await client.fetch("load", [h.external_id for h in hits])


async def client_loop(client: AsyncClient, rec: Recorder, blobs, stop_at: float, seed: int, phase: str) -> None:
    rng = random.Random(seed)
    n = 0
    while time.perf_counter() < stop_at:
        n += 1
        if phase == "vector":
            query = np.random.default_rng((seed, n)).standard_normal(DIM).tolist()
            await rec.timed("retrieve by vector, payloads (one call)",
                            lambda: client.retrieve("load", vector=query, top_k=5, include_memory=True))
            continue
        if phase == "vector2":
            query = np.random.default_rng((seed, n)).standard_normal(DIM).tolist()
            await rec.timed("retrieve+fetch(top-5)", lambda: retrieve_fetch(client, query))
            continue
        if phase == "text":  # a new text every time: the query-embedding cache cannot answer it
            text = f"what does client {seed} ask about {rng.choice(WORDS)} {rng.choice(WORDS)} at step {n}?"
            await rec.timed("retrieve by text, payloads (one call)",
                            lambda: client.retrieve("text", text=text, top_k=5, include_memory=True))
            continue
        op = rng.random()
        if op < 0.4:
            refs = [Reference(f"c{seed}-{n}-{i}", f"load text {seed} {n} {i}", {"c": str(seed)},
                              np.random.default_rng(n * 131 + i).standard_normal(DIM).tolist(), rng.choice(blobs))
                    for i in range(8)]
            await rec.timed("write(8 refs)", lambda: client.write("load", refs))
        elif op < 0.8:
            query = np.random.default_rng(n).standard_normal(DIM).tolist()
            await rec.timed("retrieve+fetch(top-5)", lambda: retrieve_fetch(client, query))
        else:
            episodes = [Episode(list(range(16)), list(range(32)),
                                [Decision(p, p, 0.5, 0, 0.7, True, 0) for p in range(32)], FINGERPRINT, 1, "load")
                        for _ in range(4)]
            await rec.timed("log(4 episodes)", lambda: client.log_episodes(episodes))


async def run_clients(target: str, key: str, clients: int, seconds: float, blobs, phase: str) -> Recorder:
    rec = Recorder()
    conns = [AsyncClient(target, key, write_retries=0) for _ in range(clients)]
    stop_at = time.perf_counter() + seconds
    await asyncio.gather(*(client_loop(c, rec, blobs, stop_at, i, phase) for i, c in enumerate(conns)))
    for c in conns:
        await c.close()
    return rec


class CpuMeter:
    """CPU seconds spent by the service process (its event-loop thread apart), PostgreSQL (the
    postmaster and its children) and this process (the clients) between start() and stop()."""

    def __init__(self, service_pid: int, postgres_pid: int) -> None:
        self.service = psutil.Process(service_pid)
        self.postgres = psutil.Process(postgres_pid)
        self.me = psutil.Process()

    def _sample(self) -> dict[str, float]:
        def cpu(process: psutil.Process) -> float:
            try:
                times = process.cpu_times()
                return times.user + times.system
            except psutil.NoSuchProcess:
                return 0.0

        loop_thread = next((t for t in self.service.threads() if t.id == self.service.pid), None)
        # the postmaster's own CPU and that of the backends it has reaped (connections closed during
        # the phase: the pool's overflow), plus its live children's
        times = self.postgres.cpu_times()
        reaped = times.children_user + times.children_system
        pg = {self.postgres.pid: cpu(self.postgres) + reaped} | {
            c.pid: cpu(c) for c in self.postgres.children(recursive=True)}
        return {"service": cpu(self.service), "loop": loop_thread.user_time + loop_thread.system_time,
                "clients": cpu(self.me), "pg": pg}

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        end = self._sample()
        pg = sum(seconds - self._start["pg"].get(pid, 0.0) for pid, seconds in end["pg"].items())
        service = end["service"] - self._start["service"]
        loop = end["loop"] - self._start["loop"]
        return {"loop": loop, "other": service - loop, "pg": pg, "clients": end["clients"] - self._start["clients"]}


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q)) if values else float("nan")


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60, help="length of each loaded phase")
    parser.add_argument("--pool-size", type=int, default=10, help="server's database pool (MEMORY3_DB_POOL_SIZE)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--out", type=Path, default=RESULTS / "load.md")
    args = parser.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    if not set(phases) <= set(PHASES):
        parser.error(f"--phases: choose from {', '.join(PHASES)}")
    root = Path(tempfile.mkdtemp(prefix="memory3-load-"))
    pg = EmbeddedPostgres(root / "db")
    server = ServiceProcess(pg.url, root, ADMIN, db_pool_size=args.pool_size, log_level="WARNING")
    unloaded: dict[str, Recorder] = {}
    loaded: dict[str, Recorder] = {}
    cpu: dict[str, dict[str, float]] = {}
    load_average: dict[str, float] = {}
    quota = max(32, args.clients)
    try:
        with Client(server.target, ADMIN) as admin:
            admin.create_tenant("load")
            _, key = admin.issue_key("load")
            # one tenant plays every client: its concurrent_calls quota (default 32) is raised to the
            # client count, as an operator would for a tenant that runs this many at once
            admin.set_quota("load", "concurrent_calls", quota)
        blobs = payloads(16)
        with Client(server.target, key) as client:
            client.create_bank(BankInfo("load", FINGERPRINT, SPEC, "client", DIM, "cosine"))
            rng = np.random.default_rng(0)
            client.write_many("load", (Reference(f"seed{i}", f"seed {i}", {}, rng.standard_normal(DIM).tolist(),
                                                 blobs[i % 16]) for i in range(2000)), batch_size=200)
            if "text" in phases:  # the built-in embedder's bank; its references carry their vectors
                client.create_bank(BankInfo("text", FINGERPRINT, SPEC, BUILTIN_EMBEDDER, BUILTIN_DIMENSION, "cosine"))
                vectors = unit_rows(2000, BUILTIN_DIMENSION, 1)
                client.write_many("text", (Reference(f"t{i}", f"reference {i}", {}, vectors[i].tolist(),
                                                     blobs[i % 16]) for i in range(2000)), batch_size=200)
            if "text" in phases:  # the embedder loads its model on first use: not inside a timed phase
                client.retrieve("text", text="warm up the embedder", top_k=5)
        meter = CpuMeter(server.pid, pg.pid)
        base_seconds = min(10.0, args.seconds / 4)
        for phase in phases:  # the unloaded baselines first, on the banks as seeded
            unloaded[phase] = asyncio.run(run_clients(server.target, key, 1, base_seconds, blobs, phase))
        for phase in phases:  # mixed first: the reads after it search its writes too (a larger bank)
            load_average[phase] = os.getloadavg()[0]
            meter.start()
            loaded[phase] = asyncio.run(run_clients(server.target, key, args.clients, args.seconds, blobs, phase))
            cpu[phase] = meter.stop()
        peak_rss = server.peak_rss_bytes()
    finally:
        server.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(report(args, argv, phases, unloaded, loaded, cpu, load_average, quota, peak_rss))


def report(args, argv, phases, unloaded, loaded, cpu, load_average, quota, peak_rss) -> str:
    lines = [
        f"# memory3 load: {args.clients} clients x {args.seconds:.0f} s a phase on loopback, DB pool {args.pool_size}",
        "",
        f"One tenant plays every client (its concurrent_calls quota set to {quota}). Unloaded: one client for "
        f"{min(10.0, args.seconds / 4):.0f} s a phase, same run. Machine: {os.cpu_count()} cores shared by the"
        " clients, the service and PostgreSQL; 1-minute load average at each phase's start: "
        + ", ".join(f"{p} {load_average[p]:.1f}" for p in phases) + " (other work on the machine included).",
        "",
        "| phase | operation | ops/s | p50 ms (unloaded) | p50 ratio | p99 ms (unloaded) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    ops: dict[tuple[str, str], float] = {}
    for phase in phases:
        for name in sorted(loaded[phase].latency):
            lat, base = loaded[phase].latency[name], unloaded[phase].latency.get(name, [])
            ops[phase, name] = len(lat) / args.seconds
            lines.append(f"| {phase} | {name} | {ops[phase, name]:.1f} | {pct(lat, 50):.1f} ({pct(base, 50):.1f}) | "
                         f"{pct(lat, 50) / pct(base, 50):.1f}x | {pct(lat, 99):.1f} ({pct(base, 99):.1f}) |")
    lines += ["", "CPU per operation (ms): the service's event-loop thread, its other threads (gRPC's poller, the "
              "embedder, the CPU pool), PostgreSQL, and the clients (this process).", "",
              "| phase | ops/s | service loop | service other | PostgreSQL | clients | all |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    per_op: dict[str, dict[str, float]] = {}
    for phase in phases:
        count = sum(len(v) for v in loaded[phase].latency.values())
        per_op[phase] = {k: 1000 * v / max(count, 1) for k, v in cpu[phase].items()}
        c = per_op[phase]
        lines.append(f"| {phase} | {count / args.seconds:.1f} | {c['loop']:.2f} | {c['other']:.2f} | {c['pg']:.2f} | "
                     f"{c['clients']:.2f} | {sum(c.values()):.2f} |")
    lines += [""]
    mixed_reads = ops.get(("mixed", "retrieve+fetch(top-5)"))
    if "vector" in phases and mixed_reads:
        vector = ops["vector", "retrieve by vector, payloads (one call)"]
        ratio = vector / mixed_reads
        lines.append(f"Vector-query reads: {vector:.1f}/s vs the mixed phase's Retrieve+Fetch {mixed_reads:.1f}/s = "
                     f"{ratio:.2f}x (target >= 2: {'met' if ratio >= 2 else 'MISSED'}); vs the mixed phase's "
                     f"operations of every kind {sum(v for (p, _), v in ops.items() if p == 'mixed'):.1f}/s = "
                     f"{vector / sum(v for (p, _), v in ops.items() if p == 'mixed'):.2f}x.")
    if "vector" in phases and "vector2" in phases:
        one, two = ops["vector", "retrieve by vector, payloads (one call)"], ops["vector2", "retrieve+fetch(top-5)"]
        lines.append(f"The same answer in one call vs two (Retrieve then Fetch): {one:.1f}/s vs {two:.1f}/s = "
                     f"{one / two:.2f}x.")
    if "vector" in phases and "text" in phases:
        v, t = per_op["vector"], per_op["text"]
        service_v, service_t = v["loop"] + v["other"], t["loop"] + t["other"]
        text_ops = ops["text", "retrieve by text, payloads (one call)"]
        vector_ops = ops["vector", "retrieve by vector, payloads (one call)"]
        lines.append(f"Text-query reads: {text_ops:.1f}/s vs vector-query {vector_ops:.1f}/s = "
                     f"{text_ops / vector_ops:.2f}x. Service CPU per call {service_t:.2f} ms vs {service_v:.2f} ms: the "
                     f"text embedder's share of a text query's service CPU is about "
                     f"{max(0.0, service_t - service_v) / service_t:.0%}, of all CPU per text query (clients and "
                     f"PostgreSQL included) about {max(0.0, sum(t.values()) - sum(v.values())) / sum(t.values()):.0%}.")
    errors = {phase: sum(loaded[phase].errors.values()) for phase in phases}
    lines += [
        "",
        "errors: " + ", ".join(f"{p} {errors[p]} {dict(loaded[p].errors) or ''}".strip() for p in phases)
        + f" (target 0: {'met' if not any(errors.values()) else 'MISSED'}); busy refusals retried after pushback: "
        + ", ".join(f"{p} {loaded[p].busy}" for p in phases),
        f"server peak RSS: {peak_rss / 2**20:.0f} MiB",
        "",
        f"    {' '.join(['python bench/bench_load.py', *(argv if argv is not None else sys.argv[1:])])}",
    ]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
