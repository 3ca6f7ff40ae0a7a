"""Bytes a reference costs on disk, part by part, beside the memory it carries (docs/scaling.md).

Banks are made by the service's own BankStore (its table, primary key, HNSW and GIN indexes), then
filled by binary COPY with N references each: text of about 500 characters (generated reference
texts run together, like a 128-token reference), two metadata keys, a random unit embedding and a
random (incompressible) memory of the size a codec scheme gives the Memory3 shape
(bench/results/codec.md: pq9 26,859 bytes by default). After VACUUM ANALYZE every part is read from
pg_relation_size: heap, TOAST and its index, primary key, GIN, HNSW. One bank per embedding
dimension: 384 (the built-in MiniLM) and 1024.

    python bench/bench_row_bytes.py                      # pq9-sized memories
    python bench/bench_row_bytes.py --memory-bytes 210089   # int8
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg.types.json import Jsonb

from memory3.core.memory_spec import MemorySpec
from memory3.service.bank_store import Bank, BankStore
from memory3.service.config import load_settings
from memory3.service.db import create_engine_for, migrate
from memory3.service.embedded_pg import EmbeddedPostgres, libpq_url
from memory3.service.reference_store import ReferenceRow
from memory3.trainer.corpus import build_world

RESULTS = Path(__file__).resolve().parent / "results"


async def make_banks(url: str, dims: list[int]) -> list[Bank]:
    engine = create_engine_for(url, load_settings(database_url=url))
    store = BankStore(engine)
    async with engine.begin() as conn:
        from sqlalchemy import text

        tenant = (await conn.execute(text("INSERT INTO tenants (name) VALUES ('sizes') RETURNING id"))).scalar()
    banks = []
    for dim in dims:
        bank, _ = await store.create(Bank(0, tenant, f"d{dim}", "00" * 32, MemorySpec((0,), 1, 8), "random", dim,
                                          "cosine", datetime.now(timezone.utc)))
        banks.append(bank)
    await engine.dispose()
    return banks


def texts(n: int, length: int) -> list[str]:
    pool = " ".join(r.text for r in build_world(seed=7, n_entities=400).references)
    return [pool[(i * 97) % (len(pool) - length):][:length] for i in range(n)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--memory-bytes", type=int, default=26_859, help="pq9 at the Memory3 shape")
    parser.add_argument("--text-chars", type=int, default=500)
    parser.add_argument("--out", default="row_bytes.md")
    args = parser.parse_args(argv)
    n = args.n
    rng = np.random.default_rng(0)
    reference_texts = texts(n, args.text_chars)
    rows = []
    with tempfile.TemporaryDirectory(prefix="m3rows") as tmp:
        pg = EmbeddedPostgres(Path(tmp))
        migrate(pg.url)
        banks = asyncio.run(make_banks(pg.url, [384, 1024]))
        conn = psycopg.connect(libpq_url(pg.url), autocommit=True)
        register_vector(conn)
        for bank in banks:
            dim, table = bank.embedder_dim, bank.partition
            vectors = rng.standard_normal((n, dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            with conn.transaction(), conn.cursor() as cur, cur.copy(
                f"COPY {table} (bank_id, external_id, text, metadata, embedding, memory, memory_size, memory_crc32,"
                " content_hash) FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["int8", "text", "text", "jsonb", "vector", "bytea", "int8", "int8", "bytea"])
                for i in range(n):
                    memory = rng.bytes(args.memory_bytes)
                    row = ReferenceRow(f"doc-{i:08d}", reference_texts[i], {"source": "wiki", "year": 2000 + i % 25},
                                       vectors[i], memory)
                    copy.write_row((bank.id, row.external_id, row.text, Jsonb(row.metadata), vectors[i], memory,
                                    row.memory_size, row.memory_crc32, row.content_hash()))
            conn.execute(f"VACUUM ANALYZE {table}")
            sizes = conn.execute(
                f"""SELECT pg_relation_size(c.oid), pg_relation_size(c.reltoastrelid),
                           (SELECT pg_relation_size(indexrelid) FROM pg_index WHERE indrelid = c.reltoastrelid),
                           pg_relation_size('{table}_pkey'), pg_relation_size('{table}_metadata'),
                           pg_relation_size('{table}_hnsw'),
                           (SELECT avg(pg_column_size(text)) FROM {table}),
                           (SELECT avg(pg_column_size(embedding)) FROM {table})
                    FROM pg_class c WHERE c.relname = '{table}'"""
            ).fetchone()
            rows.append((dim, *[float(x) / (n if k < 6 else 1) for k, x in enumerate(sizes)]))
        conn.close()
        pg.stop()

    lines = [
        f"# Bytes per reference on disk ({n:,} references a bank, {args.memory_bytes:,}-byte memories,"
        f" ~{args.text_chars}-character texts)",
        "",
        "Generated by `python bench/bench_row_bytes.py`"
        + (f" --memory-bytes {args.memory_bytes}" if args.memory_bytes != 26_859 else "") + ". Per reference,"
        " after VACUUM ANALYZE; the memory's own size is the baseline of the TOAST column.",
        "",
        "| part | " + " | ".join(f"{dim}-d embedding" for dim, *_ in rows) + " |",
        "|---|" + "---:|" * len(rows),
    ]
    names = ["heap row", "TOAST (memory, and what else moves out of line)", "TOAST index", "primary key",
             "GIN on metadata", "HNSW (m = 16, ef_construction = 64)"]
    for k, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(f"{r[1 + k]:,.0f} B" for r in rows) + " |")
    lines.append("| **total** | " + " | ".join(f"**{sum(r[1:7]):,.0f} B**" for r in rows) + " |")
    lines.append("| TOAST / memory bytes | " + " | ".join(f"{r[2] / args.memory_bytes:.3f}" for r in rows) + " |")
    lines.append("| HNSW / (4 × dim) | " + " | ".join(f"{r[6] / (4 * r[0]):.2f}" for r in rows) + " |")
    lines.append("| stored text, embedding (avg bytes) | "
                 + " | ".join(f"{r[7]:,.0f}, {r[8]:,.0f}" for r in rows) + " |")
    report = "\n".join(lines)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
