"""Service benchmark: each figure beside its baseline measured in the same run, on one database.

* Retrieve (top-5 with payloads) p50/p99 through gRPC vs the same SQL through psycopg (target <= 1.3),
  against psycopg's default (text) cursor and, stricter, its binary cursor; Fetch of the 5 ids
  vs its SQL. Every path answers each query in turn, so all see the same machine load.
* recall@5 of the HNSW path vs exact search at N references (target >= 0.95), real texts embedded
  by the built-in embedder (generated reference texts; queries are the corpus's questions)
* bulk write MB/s through the service vs raw binary COPY of the same rows (target >= 0.5)
* the floor: a bare Python gRPC server (bench/grpc_floor.py) answering the same bytes with no work,
  timed in the same loop, so (SQL + floor) / SQL shows how low any Python gRPC service could go here

Payloads are real codec blobs (int8) of a memory shape of ~40 KB: random values, so zstd cannot
shrink them, like a deployment's worst case.

    python bench/bench_service.py               # N = 100k (embedding takes a while on 2 cores)
    python bench/bench_service.py --n 20000     # quicker
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg
import torch
from pgvector.psycopg import register_vector
from psycopg.types.json import Jsonb
from tqdm import tqdm

from memory3.core.embedder import BuiltinEmbedder
from memory3.core.memory_spec import MemorySpec
from memory3.sdk.client import BankInfo, Reference
from memory3.sdk.client.client import Client
from memory3.sdk.memory.codec import encode_memory
from memory3.sdk.memory.tensors import ExplicitMemory
from memory3.service.child_process import ServiceProcess
from memory3.service.config import load_settings
from memory3.service.embedded_pg import EmbeddedPostgres, libpq_url
from memory3.service.reference_store import ReferenceRow
from memory3.trainer.corpus import build_world
from memory3.v1 import memories_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpc_floor import FloorServer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parent.parent / "runs" / "bench_cache"
FINGERPRINT = "00" * 32
SPEC = MemorySpec(tuple(range(8)), 4, 64, 8, 128, "int8")  # ~33 KB int8 payload + scales


def payloads(count: int) -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        kv = torch.randn(SPEC.shape, generator=g)
        pos = torch.randint(0, SPEC.reference_length, (SPEC.shape[0], SPEC.kv_heads, SPEC.tokens_per_head), generator=g)
        out.append(encode_memory(ExplicitMemory(kv, pos, FINGERPRINT), "int8"))
    return out


def embedded_texts(n: int) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    world = build_world(seed=7, n_entities=n)
    texts = [r.text for r in world.references][:n]
    questions = [q.question for q in world.qa("heldout")][:: max(1, len(world.qa("heldout")) // 200)][:200]
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"minilm_{n}.npy"
    embedder = BuiltinEmbedder()
    if path.exists():
        vectors = np.load(path)
    else:
        chunks = [texts[i : i + 512] for i in range(0, len(texts), 512)]
        vectors = np.concatenate([embedder.embed(c) for c in tqdm(chunks, desc="embed references", unit="x512")])
        np.save(path, vectors)
    return texts, vectors, questions, embedder.embed(questions)


def rows_for(texts, vectors, blobs, prefix: str):
    return [
        Reference(f"{prefix}{i}", texts[i], {"n": str(i % 10)}, vectors[i].tolist(), blobs[i % len(blobs)])
        for i in range(len(texts))
    ]


def raw_copy(conn: psycopg.Connection, partition: str, bank_id: int, refs: list[Reference]) -> None:
    with conn.transaction(), conn.cursor() as cur, cur.copy(
        f"COPY {partition} (bank_id, external_id, text, metadata, embedding, memory, memory_size, memory_crc32,"
        " content_hash) FROM STDIN (FORMAT BINARY)"
    ) as copy:
        copy.set_types(["int8", "text", "text", "jsonb", "vector", "bytea", "int8", "int8", "bytea"])
        for r in refs:
            row = ReferenceRow(r.external_id, r.text, r.metadata, np.asarray(r.embedding, np.float32), r.memory)
            copy.write_row((bank_id, r.external_id, r.text, Jsonb(r.metadata), row.embedding, r.memory,
                            row.memory_size, row.memory_crc32, row.content_hash()))


def floor_request(q: np.ndarray) -> memories_pb2.RetrieveRequest:
    """The request Retrieve gets, sent to the floor server (which ignores it) so both carry the same bytes."""
    request = memories_pb2.RetrieveRequest(bank="recall", top_k=5, include_memory=True)
    request.vector.values.extend(q.tolist())
    return request


def percentile(values, q):
    return float(np.percentile(np.asarray(values) * 1000, q))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="references in the recall/latency bank")
    parser.add_argument("--write-n", type=int, default=4000, help="references in each bulk-write bank")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="times each query is timed through every path")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    texts, vectors, questions, qvectors = embedded_texts(args.n)
    blobs = payloads(64)
    payload_kb = np.mean([len(b) for b in blobs]) / 1024
    with tempfile.TemporaryDirectory() as tmp:
        pg = EmbeddedPostgres(Path(tmp))
        settings = load_settings()  # the defaults the server process runs with (ef_search)
        admin_key = "bench-admin-" + secrets.token_hex(16)  # the server refuses admin keys under 32 characters
        server = ServiceProcess(pg.url, Path(tmp), admin_key, log_level="WARNING")
        admin = Client(server.target, admin_key)
        admin.create_tenant("bench")
        _, key = admin.issue_key("bench")
        client = Client(server.target, key)
        raw = psycopg.connect(libpq_url(pg.url), autocommit=True)
        register_vector(raw)
        raw.execute(f"SET hnsw.ef_search = {settings.hnsw_ef_search}")  # as the service's connections
        bank_id = lambda name: raw.execute(  # noqa: E731
            "SELECT id FROM banks WHERE name = %s", (name,)).fetchone()[0]

        # --- bulk write: service vs raw COPY of the same rows --------------------------------------
        write_refs = rows_for(texts[: args.write_n], vectors[: args.write_n], blobs, "w")
        write_mb = sum(len(r.memory) + len(r.text) + 4 * len(r.embedding) for r in write_refs) / 1e6
        for name in ("write-svc", "write-raw"):
            client.create_bank(BankInfo(name, FINGERPRINT, SPEC, "all-MiniLM-L6-v2", 384, "cosine"))
        t0 = time.perf_counter()
        with tqdm(total=len(write_refs), desc="write via service", unit="ref") as bar:
            client.write_many("write-svc", write_refs, batch_size=128, max_in_flight=2, progress=bar)
        service_write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        raw_copy(raw, f"memory_references_b{bank_id('write-raw')}", bank_id("write-raw"), write_refs)
        raw_write_s = time.perf_counter() - t0

        # --- the big bank: recall and latency --------------------------------------------------------
        client.create_bank(BankInfo("recall", FINGERPRINT, SPEC, "all-MiniLM-L6-v2", 384, "cosine"))
        refs = rows_for(texts, vectors, blobs, "r")
        t0 = time.perf_counter()
        with tqdm(total=len(refs), desc="load recall bank", unit="ref") as bar:
            client.write_many("recall", refs, batch_size=256, max_in_flight=2, progress=bar)
        load_s = time.perf_counter() - t0

        queries = qvectors[: args.queries]
        exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :5]
        partition = f"memory_references_b{bank_id('recall')}"
        search_sql = (f"SELECT external_id, text, metadata, memory_size, memory_crc32, memory,"
                      f" 1 - (embedding::vector(384) <=> %s::vector(384)) FROM {partition}"
                      f" ORDER BY embedding::vector(384) <=> %s::vector(384) LIMIT 5")
        fetch_sql = (f"SELECT external_id, text, metadata, memory_size, memory_crc32, memory FROM {partition}"
                     " WHERE external_id = ANY(%s)")
        for q in queries[:20]:  # warm both sides (pools, prepared statements, caches) before timing
            client.fetch("recall", [h.external_id for h in client.retrieve("recall", vector=q.tolist(), top_k=5,
                                                                           include_memory=True)])
            raw.execute(search_sql, (q, q)).fetchall()
        answer_bytes = sum(len(r.memory) for r in client.retrieve("recall", vector=queries[0].tolist(), top_k=5,
                                                                  include_memory=True))
        floor = FloorServer(answer_bytes).__enter__()
        for q in queries[:20]:
            floor.call(floor_request(q))
        recalls = []
        lat: dict[str, list[float]] = {k: [] for k in ("retrieve", "sql", "sql_binary", "fetch", "fetch_sql", "floor")}
        load_before = os.getloadavg()[0]
        for round_ in range(args.rounds):  # each query through every path in turn: all see the same load
            for q, truth in zip(queries, exact):
                t0 = time.perf_counter()
                hits = client.retrieve("recall", vector=q.tolist(), top_k=5, include_memory=True)
                lat["retrieve"].append(time.perf_counter() - t0)
                if round_ == 0:
                    recalls.append(len({int(h.external_id[1:]) for h in hits} & set(truth.tolist())) / 5)
                t0 = time.perf_counter()
                rows = raw.execute(search_sql, (q, q)).fetchall()
                lat["sql"].append(time.perf_counter() - t0)
                assert len(rows) == 5
                t0 = time.perf_counter()
                with raw.cursor(binary=True) as cursor:
                    rows = cursor.execute(search_sql, (q, q)).fetchall()
                lat["sql_binary"].append(time.perf_counter() - t0)
                ids = [h.external_id for h in hits]
                t0 = time.perf_counter()
                client.fetch("recall", ids)
                lat["fetch"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                rows = raw.execute(fetch_sql, (ids,)).fetchall()
                lat["fetch_sql"].append(time.perf_counter() - t0)
                assert len(rows) == 5
                t0 = time.perf_counter()
                floor.call(floor_request(q))
                lat["floor"].append(time.perf_counter() - t0)
        load_after = os.getloadavg()[0]
        floor.__exit__(None, None, None)
        server.stop()
        raw.close()
        pg.stop()  # before the temporary directory goes

    recall = statistics.mean(recalls)
    p50 = {k: percentile(v, 50) for k, v in lat.items()}
    p99 = {k: percentile(v, 99) for k, v in lat.items()}
    svc_mbs, raw_mbs = write_mb / service_write_s, write_mb / raw_write_s
    ratio = p50["retrieve"] / p50["sql"]
    samples = len(lat["retrieve"])
    lines = [
        f"# memory3 service benchmark (N={args.n:,} references, payload {payload_kb:.1f} KiB, "
        f"{len(queries)} queries x {args.rounds} rounds, write bench {args.write_n:,} rows = {write_mb:.0f} MB)",
        "",
        "| figure | memory3 | baseline | ratio | target |",
        "|---|---:|---:|---:|---|",
        f"| Retrieve top-5 + payloads p50 (ms) | {p50['retrieve']:.2f} | raw SQL {p50['sql']:.2f} | {ratio:.2f} | <= 1.3 "
        f"{'met' if ratio <= 1.3 else 'MISSED'} |",
        f"| Retrieve top-5 + payloads p50 (ms), binary-cursor baseline | {p50['retrieve']:.2f} | raw SQL, binary "
        f"{p50['sql_binary']:.2f} | {p50['retrieve'] / p50['sql_binary']:.2f} | |",
        f"| Retrieve top-5 + payloads p99 (ms) | {p99['retrieve']:.2f} | raw SQL {p99['sql']:.2f} | "
        f"{p99['retrieve'] / p99['sql']:.2f} | |",
        f"| floor: bare Python gRPC, same {answer_bytes / 1024:.0f} KiB answer, no work, p50 (ms) | {p50['floor']:.2f} | "
        f"raw SQL {p50['sql']:.2f} | (SQL + floor) / SQL = {(p50['sql'] + p50['floor']) / p50['sql']:.2f} | |",
        f"| Fetch 5 + payloads p50 (ms) | {p50['fetch']:.2f} | raw SQL {p50['fetch_sql']:.2f} | "
        f"{p50['fetch'] / p50['fetch_sql']:.2f} | |",
        f"| recall@5, HNSW vs exact | {recall:.3f} | exact 1.000 | {recall:.3f} | >= 0.95 "
        f"{'met' if recall >= 0.95 else 'MISSED'} |",
        f"| bulk write MB/s | {svc_mbs:.1f} | raw binary COPY {raw_mbs:.1f} | {svc_mbs / raw_mbs:.2f} | >= 0.5 "
        f"{'met' if svc_mbs / raw_mbs >= 0.5 else 'MISSED'} |",
        f"| load of the {args.n:,}-reference bank (with HNSW) | {load_s:.0f} s | | | |",
        "",
        f"Latencies: {samples} calls per path, interleaved query by query (service Retrieve, the same SQL through"
        " psycopg's default text cursor, then its binary cursor, service Fetch of the 5 ids, its SQL), the blocking"
        " SDK client against `memory3 serve` as a child process on loopback. Machine: "
        f"{os.cpu_count()} cores, 1-minute load average {load_before:.1f} before the timed loop and"
        f" {load_after:.1f} after (other work on the machine included).",
        "",
        f"    {' '.join(['python bench/bench_service.py', *(argv if argv is not None else sys.argv[1:])])}",
    ]
    report = "\n".join(lines)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "service.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
