"""Metadata filters: what the bank's GIN index (metadata jsonb_path_ops) buys, measured in one run.

For filters from 40 % of a bank down to 0.05 %, through the service: Retrieve top-10 p50 and
recall@10 against exact search over the references that pass the filter, the plan PostgreSQL
picks (HNSW scan with the filter, or the GIN index then exact ranking), and Scroll (first page of
100, and the whole filtered scroll in pages of 1000) — each with the GIN index and, as the
baseline, with it dropped. Unfiltered Retrieve and Scroll are the first row.

    python bench/bench_filters.py              # N = 50k references, 64 dimensions, no memories
    python bench/bench_filters.py --n 10000    # quicker
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from tqdm import tqdm

from memory3.core.memory_spec import MemorySpec
from memory3.core.metadata import conditions_from_filter
from memory3.sdk.client import BankInfo, Reference
from memory3.sdk.client.client import Client
from memory3.service.child_process import ServiceProcess
from memory3.service.config import load_settings
from memory3.service.embedded_pg import EmbeddedPostgres, libpq_url
from memory3.service.reference_store import filter_sql

RESULTS = Path(__file__).resolve().parent / "results"
SPEC = MemorySpec((0,), 1, 8, 2, 16, "int8")
DIM = 64
ADMIN_KEY = "bench-filters-admin-key-" + "0" * 16  # a configured admin key has >= 32 characters

FILTERS = [
    ("none", None),
    ('lang = "en"', {"lang": "en"}),
    ('lang in ["de", "fr"]', {"lang": {"in": ["de", "fr"]}}),
    ('tags has "g7"', {"tags": "g7"}),
    ("year >= 2020", {"year": {"gte": 2020}}),
    ('lang = "en" and year >= 2020', {"lang": "en", "year": {"gte": 2020}}),
    ("score < 0.01", {"score": {"lt": 0.01}}),
    ("score < 0.001", {"score": {"lt": 0.001}}),
    ('lang = "l42"', {"lang": "l42"}),
    ('lang = "rare"', {"lang": "rare"}),
]


def corpus(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    draw = rng.random(n)
    langs = np.where(draw < 0.4, "en", np.where(draw < 0.6, "de", np.where(draw < 0.7, "fr", "")))
    others = rng.integers(3, 100, n)
    metadata = []
    for i in range(n):
        lang = langs[i] or f"l{others[i]:02d}"
        if i % 2000 == 7:
            lang = "rare"  # 0.05 %
        tags = rng.choice(20, 2, replace=False)
        metadata.append({"lang": lang, "year": int(rng.integers(1990, 2026)), "score": float(rng.random()),
                         "tags": [f"g{t}" for t in tags]})
    return vectors, metadata


def holds(spec, meta) -> bool:
    for c in conditions_from_filter(spec):
        value = meta.get(c.key)
        if c.op == "eq" and not (value == c.value or (isinstance(value, list) and c.value in value)):
            return False
        if c.op == "in" and value not in c.value:
            return False
        if c.op in ("gt", "gte", "lt", "lte") and not {"gt": value > c.value, "gte": value >= c.value,
                                                       "lt": value < c.value, "lte": value <= c.value}[c.op]:
            return False
    return True


def p50(values) -> float:
    return statistics.median(values) * 1000


def plan(raw, partition: str, spec, vector, metadata) -> str:
    """The path Retrieve takes: exact ranking of a GIN-indexable filter's few references (the
    service counts them first), else the plan PostgreSQL picks."""
    indexed = {c.key: {c.op: c.value} for c in conditions_from_filter(spec) if c.op in ("eq", "in")} if spec else {}
    if indexed and sum(holds(indexed, meta) for meta in metadata) <= load_settings().filter_exact_rows:
        return "counted, exact rank"
    params = {"q": vector, "limit": 10}
    where = f"WHERE {filter_sql(conditions_from_filter(spec), params)}" if spec else ""
    text = "\n".join(r[0] for r in raw.execute(
        f"EXPLAIN SELECT external_id FROM {partition} {where} ORDER BY embedding::vector({DIM}) <=> %(q)s::vector({DIM})"
        " LIMIT %(limit)s", params).fetchall())
    if "hnsw" in text:
        return "HNSW + filter"
    if "Bitmap Index Scan" in text and "_metadata" in text:
        return "GIN, exact rank"
    return "seq scan, exact rank"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=40)
    args = parser.parse_args(argv)
    vectors, metadata = corpus(args.n)
    queries = np.random.default_rng(1).standard_normal((args.queries, DIM)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pg = EmbeddedPostgres(Path(tmp))
        settings = load_settings()
        server = ServiceProcess(pg.url, Path(tmp), ADMIN_KEY, log_level="WARNING")
        admin = Client(server.target, ADMIN_KEY)
        admin.create_tenant("bench")
        client = Client(server.target, admin.issue_key("bench")[1])
        client.create_bank(BankInfo("filters", "f" * 16, SPEC, "client", DIM, "cosine"))
        refs = (Reference(f"r{i:06d}", "", metadata[i], vectors[i].tolist()) for i in range(args.n))
        t0 = time.perf_counter()
        with tqdm(total=args.n, desc="load", unit="ref") as bar:
            client.write_many("filters", refs, batch_size=500, progress=bar)
        load_s = time.perf_counter() - t0
        raw = psycopg.connect(libpq_url(pg.url), autocommit=True)
        register_vector(raw)
        raw.execute(f"SET hnsw.ef_search = {settings.hnsw_ef_search}")
        bank_id = raw.execute("SELECT id FROM banks WHERE name = 'filters'").fetchone()[0]
        partition = f"memory_references_b{bank_id}"
        raw.execute(f"ANALYZE {partition}")
        passing = {label: [i for i in range(args.n) if not spec or holds(spec, metadata[i])] for label, spec in FILTERS}

        def measure(label, spec, indexed: bool) -> dict:
            subset = np.array(passing[label])
            latencies, recalls = [], []
            for q in queries:
                t0 = time.perf_counter()
                hits = client.retrieve("filters", vector=q.tolist(), top_k=10, filter=spec, include_text=False)
                latencies.append(time.perf_counter() - t0)
                truth = subset[np.argsort(-(vectors[subset] @ q))[:10]] if len(subset) else []
                got = {int(h.external_id[1:]) for h in hits}
                recalls.append(len(got & set(truth.tolist())) / max(1, min(10, len(subset))))
            first = []
            for _ in range(10):
                t0 = time.perf_counter()
                client.scroll_page("filters", filter=spec, page_size=100, include_text=False)
                first.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            scrolled = sum(1 for _ in client.scroll("filters", filter=spec, page_size=1000, include_text=False))
            whole = time.perf_counter() - t0
            assert scrolled == len(subset), (label, scrolled, len(subset))
            return {"retrieve": p50(latencies), "recall": statistics.mean(recalls), "first": p50(first),
                    "whole": whole, "plan": plan(raw, partition, spec, queries[0], metadata)}

        for label, spec in tqdm(FILTERS, desc="with GIN"):
            rows.append([label, len(passing[label]) / args.n, measure(label, spec, True)])
        raw.execute(f"DROP INDEX {partition}_metadata")
        raw.execute(f"ANALYZE {partition}")
        for row, (label, spec) in zip(rows, tqdm(FILTERS, desc="without GIN")):
            row.append(measure(label, spec, False))
        server.stop()
        raw.close()
        pg.stop()

    lines = [
        f"# Metadata filters (N={args.n:,} references, {DIM} dimensions, cosine, top-10, {args.queries} queries; "
        f"load {load_s:.0f} s)",
        "",
        "Each figure with the bank's GIN index on metadata (jsonb_path_ops) / with it dropped (baseline).",
        "",
        "| filter | passes | plan | Retrieve p50 ms | recall@10 | Scroll first page p50 ms | whole Scroll s |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for label, share, gin, bare in rows:
        lines.append(
            f"| {label} | {share:.2%} | {gin['plan']} / {bare['plan']} | {gin['retrieve']:.2f} / {bare['retrieve']:.2f} "
            f"| {gin['recall']:.3f} / {bare['recall']:.3f} | {gin['first']:.2f} / {bare['first']:.2f} "
            f"| {gin['whole']:.2f} / {bare['whole']:.2f} |")
    report = "\n".join(lines)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "filters.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
