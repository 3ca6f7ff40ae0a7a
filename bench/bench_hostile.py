"""Hostile clients: what one tenant (or a key-less stranger) can do to another's latency, and what
the worst legal request of each RPC costs the server in memory — against `memory3 serve` as a
child process on embedded PostgreSQL.

1. The victim tenant measures Retrieve and Stats latency alone (the baseline, same run), then again
   while a chaos crowd runs: key-less idle Write streams, a hostile tenant's idle Log streams
   (beyond its concurrency quota), slow readers, decompression bombs and heavy overlap queries.
   Printed: the victim's p50/p99 under chaos beside its unloaded p50/p99, as ratios, and its errors.
2. The worst legal request of each RPC, one at a time: the server's peak RSS above its RSS before
   the call (VmHWM reset through /proc/PID/clear_refs) against the stated 256 MiB budget, and the
   slowest health check answered meanwhile.

    python bench/bench_hostile.py                 # 20 s per phase, 512 MiB proxy
    python bench/bench_hostile.py --seconds 5 --proxy-mib 64
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import secrets
import shutil
import struct
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

import grpc
import numpy as np
import torch
import zstandard
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memory3.core.embedder import BUILTIN_EMBEDDER
from memory3.core.episodes import Episode
from memory3.core.memory_spec import MemorySpec
from memory3.sdk.client import BankInfo, Reference
from memory3.sdk.client.client import AsyncClient, Client
from memory3.sdk.memory.codec import encode_memory
from memory3.sdk.memory.tensors import ExplicitMemory
from memory3.service.child_process import ServiceProcess, free_port
from memory3.service.embedded_pg import EmbeddedPostgres
from memory3.v1 import memories_pb2, trajectories_pb2

RESULTS = Path(__file__).resolve().parent / "results"
ADMIN = "hostile-admin-" + secrets.token_hex(16)
FINGERPRINT = "22" * 32
DIM = 64
SMALL = MemorySpec((0,), 1, 4, 2)
BIG = MemorySpec(tuple(range(32)), 16, 128, 128, 128, "fp16")  # 32 MiB per memory (fp16, incompressible)
BUDGET_MIB = 256
IDLE_SECONDS = 5


def metadata(key: str):
    return (("authorization", f"Bearer {key}"),)


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q)) if values else float("nan")


def big_memory(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    layers, _, heads, tokens, _ = BIG.shape
    positions = torch.arange(tokens).expand(layers, heads, tokens).clone()
    return encode_memory(ExplicitMemory(torch.randn(BIG.shape, generator=g), positions, FINGERPRINT), "fp16")


def bomb_memory() -> bytes:
    """A blob with a valid CRC whose zstd frame declares 8 MiB where the header says 9 bytes."""
    body = zstandard.ZstdCompressor().compress(b"\0" * (8 * 2**20))
    fp = FINGERPRINT[:16].encode()
    head = struct.pack("<4sHBBHHHHIIIBB", b"M3KV", 1, 0, 0x01, 1, 1, 2, 4, 0, len(body), 9, len(fp), 0) + fp + body
    return head + struct.pack("<I", zlib.crc32(head))


# ---- phase 1: the victim's latency, alone and beside the chaos ---------------------------------

async def victim(target: str, key: str, seconds: float) -> tuple[dict[str, list[float]], dict[str, int]]:
    latency, errors = {"retrieve(top-5)": [], "stats": []}, {}
    rng = np.random.default_rng(7)
    async with AsyncClient(target, key, write_retries=0) as client:
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            for name, call in (("retrieve(top-5)", lambda: client.retrieve("kb", vector=rng.normal(size=DIM).tolist(),
                                                                          top_k=5)),
                               ("stats", lambda: client.stats("kb"))):
                started = time.perf_counter()
                try:
                    await call()
                    latency[name].append(time.perf_counter() - started)
                except grpc.aio.AioRpcError as err:
                    errors[f"{name}:{err.code().name}"] = errors.get(f"{name}:{err.code().name}", 0) + 1
            await asyncio.sleep(0.005)
    return latency, errors


async def idle_stream(channel, method: str, key: str, first: list, serializer) -> None:
    """Open a client stream, send ``first``, then say nothing until the server ends it."""
    call = channel.stream_unary(method, request_serializer=serializer, response_deserializer=lambda b: b)

    async def requests():
        for message in first:
            yield message
        await asyncio.sleep(3600)

    try:
        await call(requests(), metadata=metadata(key), timeout=IDLE_SECONDS * 4)
    except grpc.aio.AioRpcError:
        pass


CROWD = {"keyless": 200, "idle-log": 40, "slow-reader": 2, "bomb": 2, "overlap": 2}  # kind: clients


async def chaos(target: str, hostile_key: str, seconds: float, counts: dict, kinds: set[str] | None) -> None:
    stop = time.perf_counter() + seconds
    episode = trajectories_pb2.LogRequest(episodes=[trajectories_pb2.EpisodeRecord(
        episode_id="idle", model_fingerprint=FINGERPRINT, prompt_ids=[1], response_ids=[2])])
    words = " ".join(f"w{i}" for i in range(4000))

    async def crowd(kind: str, make):
        """One careless client: the same call again a second after each answer, until the end."""
        while time.perf_counter() < stop:
            await make()
            counts[kind] = counts.get(kind, 0) + 1
            await asyncio.sleep(1.0)

    async with grpc.aio.insecure_channel(target) as channel, AsyncClient(target, hostile_key, write_retries=0) as c:
        async def keyless():
            await idle_stream(channel, "/memory3.v1.Memories/Write", "nope", [],
                              memories_pb2.WriteRequest.SerializeToString)

        async def idle_log():
            await idle_stream(channel, "/memory3.v1.Trajectories/Log", hostile_key, [episode],
                              trajectories_pb2.LogRequest.SerializeToString)

        async def slow_reader():
            call = channel.unary_stream("/memory3.v1.Memories/Fetch",
                                        request_serializer=memories_pb2.FetchRequest.SerializeToString,
                                        response_deserializer=lambda b: b)
            stream = call(memories_pb2.FetchRequest(bank="big", external_ids=[f"b{i}" for i in range(8)],
                                                    include_memory=True), metadata=metadata(hostile_key), timeout=60)
            try:
                await stream.read()
                await asyncio.sleep(IDLE_SECONDS * 2)  # takes one message, then stops reading
            except grpc.aio.AioRpcError:
                pass
            stream.cancel()

        async def bomb():
            try:
                await c.write("small", [Reference("bomb", "t", embedding=[1.0, 0, 0, 0], memory=bomb_memory())])
            except grpc.aio.AioRpcError:
                pass

        async def heavy_overlap():
            try:
                await c.retrieve("long", text=words * 2, top_k=255, max_overlap=0.5)
            except grpc.aio.AioRpcError:
                pass

        actions = {"keyless": ("key-less idle Write", keyless), "idle-log": ("idle Log (hostile tenant)", idle_log),
                   "slow-reader": ("slow reader", slow_reader), "bomb": ("decompression bomb", bomb),
                   "overlap": ("heavy overlap query", heavy_overlap)}
        tasks = [crowd(*actions[kind]) for kind, n in CROWD.items() if kinds is None or kind in kinds
                 for _ in range(n)]
        await asyncio.gather(*tasks)


# ---- phase 2: worst legal requests -------------------------------------------------------------

def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def _health_poll(target: str, ready, stop, results) -> None:
    """In a process of its own (so the client's work is not in it): the slowest health answer."""
    worst = 0.0
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        ready.set()
        while not stop.is_set():
            started = time.perf_counter()
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            worst = max(worst, time.perf_counter() - started)
            time.sleep(0.02)
    results.put(worst)


def loop_lag_buckets(metrics_port: int) -> dict[float, float]:
    """The server's event-loop lag histogram: cumulative count per upper bound (seconds)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("memory3_event_loop_lag_seconds_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            found[float("inf") if bound == "+Inf" else float(bound)] = float(line.rsplit(" ", 1)[1])
    return found


def worst_lag_bound(before: dict[float, float], after: dict[float, float]) -> float:
    """The smallest bucket bound that holds every lag observed between the two scrapes (seconds)."""
    total = after[float("inf")] - before[float("inf")]
    return min(bound for bound in after if after[bound] - before.get(bound, 0) >= total)


async def measured(server: ServiceProcess, make) -> tuple[float, float, float]:
    """(peak RSS above the RSS before, MiB; slowest health check meanwhile, ms; the server's
    event-loop lag bound meanwhile, ms)."""
    context = multiprocessing.get_context("spawn")
    ready, stop, results = context.Event(), context.Event(), context.Queue()
    poller = context.Process(target=_health_poll, args=(server.target, ready, stop, results))
    poller.start()
    await asyncio.to_thread(ready.wait, 120)
    Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # reset the high-water mark
    before = _status_kib(server.pid, "VmRSS")
    lag_before = loop_lag_buckets(server.metrics_port)
    try:
        await make()
    finally:
        stop.set()
    worst = results.get(timeout=60)
    poller.join()
    await asyncio.sleep(0.1)  # one more lag observation after the call
    lag = worst_lag_bound(lag_before, loop_lag_buckets(server.metrics_port))
    return (_status_kib(server.pid, "VmHWM") - before) / 1024, worst * 1000, lag * 1000


async def worst_requests(server: ServiceProcess, key: str, proxy_mib: int) -> list[tuple[str, float, float]]:
    rows = []
    memories = [big_memory(i) for i in range(8)]
    words = " ".join(f"w{i}" for i in range(4000))
    hidden = np.random.default_rng(0).bytes(4 * 2**20)
    weights = b"\0" * (proxy_mib * 2**20)
    header = b'{"w":{"dtype":"U8","shape":[%d],"data_offsets":[0,%d]}}' % (len(weights) - 64, len(weights) - 64)
    weights = len(header).to_bytes(8, "little") + header + weights[: len(weights) - 8 - len(header)]
    async with AsyncClient(server.target, key, write_retries=0) as client:
        cases = [
            ("Write", f"8 references x {len(memories[0]) / 2**20:.0f} MiB memories in one stream",
             lambda: client.write("big", [Reference(f"w{i}", "t", embedding=[1.0] * DIM, memory=m)
                                          for i, m in enumerate(memories)])),
            ("Fetch", "the 8 with memories", lambda: client.fetch("big", [f"w{i}" for i in range(8)],
                                                                 include_memory=True)),
            ("Retrieve", "top-8 with memories", lambda: client.retrieve("big", vector=[1.0] * DIM, top_k=8,
                                                                       include_memory=True)),
            ("Retrieve", "max_overlap over 320 x 4,000-word references",
             lambda: client.retrieve("long", text=words * 2, top_k=255, max_overlap=0.5)),
            ("Log", "64 episodes x 4 MiB hidden states in one stream",
             lambda: client.log_episodes([Episode([1], [2], [], FINGERPRINT, 0, "big", episode_id=f"h{i}",
                                                  hidden_states=hidden) for i in range(64)])),
            ("Read", "those 64 with hidden states, page_size 4096",
             lambda: client.read_episodes(limit=64, page_size=4096, include_hidden_states=True)),
            ("Publish", f"{proxy_mib} MiB proxy weights",
             lambda: client.publish_proxy("p", weights, FINGERPRINT, config={}, metrics={})),
            ("Get", f"the {proxy_mib} MiB proxy with weights",
             lambda: client.get_proxy("p", FINGERPRINT)),
        ]
        for rpc, what, make in cases:
            peak, health_ms, lag_ms = await measured(server, make)
            rows.append((rpc, what, peak, health_ms, lag_ms))
            print(f"  {rpc}: {what}: +{peak:.0f} MiB, health worst {health_ms:.0f} ms, loop lag <= {lag_ms:g} ms",
                  flush=True)
    return rows


def setup(server: ServiceProcess) -> tuple[str, str]:
    with Client(server.target, ADMIN) as admin:
        keys = []
        for name in ("victim", "hostile"):
            admin.create_tenant(name)
            keys.append(admin.issue_key(name)[1])
    victim_key, hostile_key = keys
    rng = np.random.default_rng(0)
    with Client(server.target, victim_key) as client:
        client.create_bank(BankInfo("kb", FINGERPRINT, SMALL, "client", DIM, "cosine"))
        client.write_many("kb", (Reference(f"r{i}", f"text {i}", {}, rng.normal(size=DIM).tolist())
                                 for i in range(2000)), batch_size=250)
    words = " ".join(f"w{i}" for i in range(4000))
    with Client(server.target, hostile_key) as client:
        client.create_bank(BankInfo("small", FINGERPRINT[:16], SMALL, "client", 4, "l2"))
        client.create_bank(BankInfo("big", FINGERPRINT, BIG, "client", DIM, "cosine"))
        client.create_bank(BankInfo("long", FINGERPRINT, SMALL, BUILTIN_EMBEDDER, 384, "cosine"))
        vectors = rng.normal(size=(320, 384))
        client.write("long", [Reference(f"l{i}", f"{i} {words}", embedding=vectors[i].tolist()) for i in range(320)])
        client.write("big", [Reference(f"b{i}", "t", embedding=[1.0] * DIM, memory=big_memory(100 + i))
                             for i in range(8)])
    return victim_key, hostile_key


def _victim_in_own_process(target: str, key: str, seconds: float, results) -> None:
    results.put(asyncio.run(victim(target, key, seconds)))


def victim_elsewhere(target: str, key: str, seconds: float) -> tuple[multiprocessing.Process, multiprocessing.Queue]:
    """The victim runs in a process of its own, so the chaos crowd's client work is not in its latency."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_victim_in_own_process, args=(target, key, seconds, results))
    process.start()
    return process, results


ROUNDS = {
    "idle and unauthenticated callers (target: p99 <= 2x, 0 errors)": {"keyless", "idle-log", "slow-reader", "bomb"},
    "the same plus heavy overlap queries (CPU work; reported, no target)": set(CROWD),
}


def phase_one(target: str, victim_key: str, hostile_key: str, seconds: float):
    """The victim alone, then beside each chaos round: [(round, latency, errors, chaos counts)]."""
    process, results = victim_elsewhere(target, victim_key, seconds)
    alone = results.get(timeout=seconds + 120)
    process.join()
    rounds = [("alone (baseline)", *alone, {})]
    for name, kinds in ROUNDS.items():
        counts: dict[str, int] = {}
        process, results = victim_elsewhere(target, victim_key, seconds + 2)
        time.sleep(2)  # the victim process starts while the chaos begins
        asyncio.run(chaos(target, hostile_key, seconds, counts, kinds))
        rounds.append((name, *results.get(timeout=seconds + 120), counts))
        process.join()
    return rounds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--proxy-mib", type=int, default=512)
    parser.add_argument("--skip-worst", action="store_true", help="phase 1 only")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="memory3-hostile-"))
    pg = EmbeddedPostgres(root / "db")
    metrics_port = free_port()
    server = ServiceProcess(pg.url, root, ADMIN, log_level="ERROR", stream_idle_seconds=IDLE_SECONDS,
                            max_proxy_bytes=max(args.proxy_mib, 1) * 2**20 + 2**20, metrics_port=metrics_port)
    server.metrics_port = metrics_port
    try:
        victim_key, hostile_key = setup(server)
        print("phase 1: victim alone, then beside the chaos", flush=True)
        rounds = phase_one(server.target, victim_key, hostile_key, args.seconds)
        worst = []
        if not args.skip_worst:
            print("phase 2: worst legal requests", flush=True)
            worst = asyncio.run(worst_requests(server, hostile_key, args.proxy_mib))
    finally:
        server.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)

    lines = [
        f"# memory3 under hostile clients ({args.seconds:.0f} s per round, 2-core CPU machine, embedded PostgreSQL 18)",
        "",
        "The victim tenant's latency (its own process) alone, then beside each chaos round; ratios to alone:",
        "",
        "| round | victim call | p50 ms | p50 ratio | p99 ms | p99 ratio | victim errors |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    _, alone, _, _ = rounds[0]
    for name, latency, errors, _ in rounds:
        for call in alone:
            a, b = alone[call], latency[call]
            failed = sum(v for k, v in errors.items() if k.startswith(call))
            lines.append(f"| {name} | {call} | {pct(b, 50):.1f} | {pct(b, 50) / pct(a, 50):.2f} | {pct(b, 99):.1f} | "
                         f"{pct(b, 99) / pct(a, 99):.2f} | {failed} |")
    lines.append("")
    for name, _, errors, counts in rounds[1:]:
        lines.append(f"* {name}: chaos calls " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                     + (f"; victim errors {errors}" if errors else ""))
    lines += [
        "",
        f"Worst legal request of each RPC, one at a time: server peak RSS above its RSS before the call "
        f"(budget {BUDGET_MIB} MiB); the slowest health check answered meanwhile, from a poller process "
        f"that shares the 2 cores with this client, the server and PostgreSQL (target 100 ms); and the "
        f"server's own event-loop lag meanwhile (its histogram's smallest bucket holding every observation):",
        "",
        "| RPC | request | peak RSS added MiB | of budget | health worst ms | event-loop lag ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for rpc, what, peak, health_ms, lag_ms in worst:
        lines.append(f"| {rpc} | {what} | {peak:.0f} | {peak / BUDGET_MIB:.2f} | {health_ms:.0f} | <= {lag_ms:g} |")
    report = "\n".join(lines)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hostile.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
