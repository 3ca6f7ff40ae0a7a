"""Read replicas on this machine: vector Retrieve throughput and latency with reads on the primary
beside reads on a streaming standby, with one and with two `memory3 serve` processes, and what
read-your-writes costs (a Write then a Stats with its consistency token).

Everything here shares this machine's cores — primary, standby, service processes and the client
— so a standby adds no CPU: the figures show what routing costs and what this machine does, not
what a standby on a second machine would add. Results: bench/results/replicas.md.

    python bench/bench_replicas.py                        # 16 clients, 15 s per setup, 10k references
    python bench/bench_replicas.py --clients 8 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import platform
import re
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from memory3.core.memory_spec import MemorySpec
from memory3.sdk.client import BankInfo, Reference
from memory3.sdk.client.client import AsyncClient, Client
from memory3.service.child_process import ServiceProcess, free_port
from memory3.service.embedded_pg import EmbeddedPostgres, EmbeddedStandby

RESULTS = Path(__file__).resolve().parent / "results"
ADMIN = "bench-replicas-admin-0123456789abcdefghij"
FINGERPRINT = "22" * 32
SPEC = MemorySpec((0, 1), 2, 16, 4, 32, "int8")
DIM = 64


def vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


async def load(target: str, key: str, clients: int, seconds: float) -> dict:
    queries = vectors(512, seed=7).tolist()
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def loop(index: int) -> None:
        nonlocal errors
        async with AsyncClient(target, key) as client:
            n = index
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                try:
                    await client.retrieve("kb", vector=queries[n % len(queries)], top_k=5)
                    latencies.append(time.perf_counter() - started)
                except Exception:
                    errors += 1
                n += clients

    began = time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(clients)))
    elapsed = time.perf_counter() - began
    ms = np.array(latencies) * 1000
    return {"ops": len(latencies) / elapsed, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "errors": errors}


def routed(metrics_ports: list[int]) -> collections.Counter:
    """Reads the processes routed, by (target, reason) (memory3_read_routes_total of each /metrics)."""
    counts: collections.Counter = collections.Counter()
    for port in metrics_ports:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for line in body.splitlines():
            found = re.match(r'memory3_read_routes_total\{reason="(\w+)",target="(\w+)"\} (\S+)', line)
            if found:
                counts[found[2], found[1]] += float(found[3])
    return counts


def on(counts: collections.Counter, target: str) -> float:
    return sum(value for (where, _), value in counts.items() if where == target)


def token_costs(target: str, key: str, metrics_port: int, rounds: int = 200) -> dict:
    """p50 of a one-reference Write and of the Stats right after it, without and with the Write's
    token (interleaved, so drift in the machine's load hits both alike); where token reads went."""
    writes: dict[bool, list[float]] = {False: [], True: []}
    reads: dict[bool, list[float]] = {False: [], True: []}
    before = routed([metrics_port])
    with Client(target, key) as client:
        for i in range(rounds):
            for with_token in (False, True):
                ref = Reference(f"t{i}-{int(with_token)}", "t", {}, vectors(1, seed=100_000 + i)[0].tolist())
                started = time.perf_counter()
                summary = client.write("kb", [ref])
                wrote = time.perf_counter()
                client.stats("kb", consistency_token=summary.consistency_token if with_token else "")
                writes[with_token].append(wrote - started)
                reads[with_token].append(time.perf_counter() - wrote)
    after = routed([metrics_port])
    out = {flag: (1000 * float(np.median(writes[flag])), 1000 * float(np.median(reads[flag]))) for flag in writes}
    out["token_reads_on_replica"] = after["replica", "token"] - before["replica", "token"]
    out["token_reads_on_primary"] = on(after, "primary") - on(before, "primary")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--references", type=int, default=10_000)
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="m3-bench-replicas-"))
    root.chmod(0o755)
    primary = EmbeddedPostgres(root / "p")
    standby = EmbeddedStandby(primary, root / "s", sync=False)
    processes: list[ServiceProcess] = []
    rows = []
    try:
        def serve(name: str, replicas: bool) -> tuple[ServiceProcess, int]:
            port = free_port()
            extra = {"replica_urls": standby.url} if replicas else {}
            process = ServiceProcess(primary.url, root / name, ADMIN, metrics_port=str(port), drain_notice_seconds="0",
                                     **extra)
            processes.append(process)
            return process, port

        plain, plain_metrics = serve("plain", False)
        with Client(plain.target, ADMIN) as admin:
            admin.create_tenant("bench")
            _, key = admin.issue_key("bench")
        with Client(plain.target, key) as client:
            client.create_bank(BankInfo("kb", FINGERPRINT, SPEC, "client", DIM, "cosine"))
            v = vectors(args.references, seed=1)
            client.write_many("kb", (Reference(f"r{i}", f"reference {i}", {}, v[i].tolist())
                                     for i in range(args.references)), batch_size=500)
        first, first_metrics = serve("a", True)
        second, second_metrics = serve("b", True)
        time.sleep(1)  # the standby replays the load; the monitors take it
        setups = [
            ("1 process, reads on the primary (no replica configured)", plain.target, [plain_metrics]),
            ("1 process, reads on the standby", first.target, [first_metrics]),
            ("2 processes, reads on the standby (SDK round robin)", f"{first.target},{second.target}",
             [first_metrics, second_metrics]),
        ]
        asyncio.run(load(plain.target, key, args.clients, 2.0))  # warm-up: plans, caches, connections
        for label, target, ports in setups:
            before = routed(ports)
            result = asyncio.run(load(target, key, args.clients, args.seconds))
            after = routed(ports)
            result["on_replica"] = on(after, "replica") - on(before, "replica")
            result["on_primary"] = on(after, "primary") - on(before, "primary")
            rows.append((label, result))
            print(label, result, flush=True)
        costs = token_costs(first.target, key, first_metrics)
        load_after = os.getloadavg()[0]
    finally:
        for process in processes:
            process.stop()
        standby.stop()
        primary.stop()
        shutil.rmtree(root, ignore_errors=True)

    base = rows[0][1]["ops"]
    lines = [
        "# Read replicas on one machine (bench/bench_replicas.py)",
        "",
        f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}; primary, standby "
        "(embedded PostgreSQL 18, streaming replication on loopback), service processes and the client all on "
        f"these cores. Vector Retrieve top-5 (text, no memory) on {args.references:,} references of dimension "
        f"{DIM}, {args.clients} concurrent clients, {args.seconds:g} s per setup. Load average (1 min) "
        f"{load_before:.1f} before and {load_after:.1f} after the run: other work shared the machine.",
        "",
        "| setup | Retrieve/s | vs primary | p50 ms | p99 ms | errors | reads routed to the standby |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in rows:
        routed_share = "—" if r["on_replica"] + r["on_primary"] == 0 else f"{r['on_replica']:.0f}"
        lines.append(f"| {label} | {r['ops']:.0f} | {r['ops'] / base:.2f}× | {r['p50']:.1f} | {r['p99']:.1f} | "
                     f"{r['errors']} | {routed_share} |")
    lines += [
        "",
        "Read-your-writes (one process with the standby, p50 of 200 rounds): a one-reference Write, then Stats",
        "",
        "| Stats after the Write | Write ms | Stats ms |",
        "|---|---|---|",
        f"| without a token (standby, may miss the write) | {costs[False][0]:.2f} | {costs[False][1]:.2f} |",
        f"| with the Write's consistency token | {costs[True][0]:.2f} | {costs[True][1]:.2f} |",
        "",
        f"Of the 200 reads with a token, {costs['token_reads_on_replica']:.0f} were served by the standby (it had "
        f"replayed the write when asked) and {costs['token_reads_on_primary']:.0f} by the primary.",
        "",
        "On this machine a standby cannot raise throughput: it replays the primary's WAL on the same cores the",
        "primary and the service use. What the table shows is the overhead of routing (a replica's connection",
        "pool, the monitor) and of a second process. With a token the Write answer costs one more round trip",
        "(the WAL position after the commit) and the read one more when the standby is not yet known to have",
        "replayed it (asked directly, else the primary serves it).",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "replicas.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
