"""Trajectory ingest benchmark: decisions stored per second through the service's Log stream vs
a raw binary COPY of the same rows into the same table, measured in the same run on one database.

Log goes through gRPC (the SDK's packed EpisodeRecords, ``--streams`` concurrent streams): validation,
COPY into staging, deduplicating insert. The baseline copies the same episodes straight into
trajectory_episodes. Also reported: the SDK's Episode -> wire encoding rate and the background logger
end to end. Episodes look like proxy sampling output.

    python bench/bench_trajectories.py                 # 2,000 episodes
    python bench/bench_trajectories.py --episodes 500  # quicker

Measurements: docs/experiments.md ("Trajectory ingest").
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb
from tqdm import tqdm

from memory3.core.episodes import Decision, Episode
from memory3.sdk.client.client import AsyncClient, Client
from memory3.sdk.client.trajectories import episode_to_record, log_requests
from memory3.sdk.proxy.logger import TrajectoryLogger
from memory3.service.config import load_settings
from memory3.service.embedded_pg import EmbeddedPostgres, libpq_url
from memory3.service.server import BackgroundServer

RESULTS = Path(__file__).resolve().parent / "results"
FINGERPRINT = "00" * 32
TARGET = 20_000


def make_episodes(n: int, response_tokens: int, seed: int, prefix: str) -> list[Episode]:
    rng = random.Random(seed)
    episodes = []
    for i in range(n):
        response = [rng.randrange(32_000) for _ in range(response_tokens)]
        decisions = []
        for pos, tok in enumerate(response):
            rejected = rng.randrange(3)
            for r in range(rejected):
                decisions.append(Decision(pos, rng.randrange(32_000), rng.random(), rng.randrange(50), rng.random(), False, r))
            decisions.append(Decision(pos, tok, rng.random(), rng.randrange(50), rng.random(), True, rejected))
        episodes.append(
            Episode([rng.randrange(32_000) for _ in range(64)], response, decisions, FINGERPRINT, 1, "kb",
                    {"rule": rng.random()}, f"{prefix}{i}")
        )
    return episodes


def raw_copy(conn: psycopg.Connection, tenant_id: int, episodes: list[Episode]) -> None:
    """The baseline: the same rows, COPY'd straight into the table the service writes."""
    with conn.transaction(), conn.cursor() as cur, cur.copy(
        "COPY trajectory_episodes (tenant_id, episode_id, bank, model_fingerprint, proxy_version, prompt_ids,"
        " response_ids, n_decisions, decision_position, decision_token, decision_llm_prob, decision_rank,"
        " decision_p_accept, decision_accepted, decision_rejections, rewards) FROM STDIN (FORMAT BINARY)"
    ) as copy:
        copy.set_types(["int8", "text", "text", "text", "int8", "int4[]", "int4[]", "int4", "int4[]", "int4[]",
                        "float4[]", "int4[]", "float4[]", "bool[]", "int4[]", "jsonb"])
        for e in episodes:
            d = e.decisions
            copy.write_row((
                tenant_id, e.episode_id, e.bank, e.model_fingerprint, e.proxy_version, e.prompt_ids, e.response_ids,
                len(d), [x.position for x in d], [x.candidate_token for x in d], [x.llm_prob for x in d],
                [x.rank for x in d], [x.p_accept for x in d], [x.accepted for x in d], [x.rejections for x in d],
                Jsonb(e.rewards),
            ))


async def log_through_service(target: str, key: str, streams: list[list], concurrency: int, bar) -> float:
    async with AsyncClient(target, key, timeout=600) as client:
        queue = list(streams)

        async def worker():
            while queue:
                messages = queue.pop()
                summary = await client.log_requests(messages)
                bar.update(summary.decisions)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=2000)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--stream-episodes", type=int, default=250, help="episodes per Log stream / COPY transaction")
    parser.add_argument("--streams", type=int, default=2, help="concurrent Log streams")
    args = parser.parse_args(argv)

    episodes = make_episodes(args.episodes, args.response_tokens, 0, "svc-")
    baseline = make_episodes(args.episodes, args.response_tokens, 0, "raw-")
    decisions = sum(len(e.decisions) for e in episodes)
    chunks = [episodes[i : i + args.stream_episodes] for i in range(0, len(episodes), args.stream_episodes)]

    t0 = time.perf_counter()
    streams = [list(log_requests(episode_to_record(e) for e in chunk)) for chunk in chunks]
    encode_s = time.perf_counter() - t0
    wire_mb = sum(m.ByteSize() for s in streams for m in s) / 1e6

    with tempfile.TemporaryDirectory() as tmp:
        pg = EmbeddedPostgres(Path(tmp))
        settings = load_settings(database_url=pg.url, port=0, admin_key="bench-admin-" + secrets.token_hex(16), data_dir=Path(tmp), metrics_port=-1)
        server = BackgroundServer(settings)
        admin = Client(server.target, settings.admin_key)
        for name in ("bench", "bench-raw", "bench-logger"):
            admin.create_tenant(name)
        key = admin.issue_key("bench")[1]
        logger_key = admin.issue_key("bench-logger")[1]
        raw = psycopg.connect(libpq_url(pg.url), autocommit=True)
        raw_tenant = raw.execute("SELECT id FROM tenants WHERE name = 'bench-raw'").fetchone()[0]

        with tqdm(total=decisions, desc="Log via service", unit="decision") as bar:
            service_s = asyncio.run(log_through_service(server.target, key, streams, args.streams, bar))
        with Client(server.target, key) as client:
            stored = client.count_episodes()
            assert stored == (len(episodes), decisions), stored
            again = asyncio.run(log_through_service(server.target, key, streams[:1], 1, tqdm(disable=True)))
            assert client.count_episodes() == stored  # a replayed stream adds nothing
        del again

        t0 = time.perf_counter()
        for i in tqdm(range(0, len(baseline), args.stream_episodes), desc="raw COPY", unit="txn"):
            raw_copy(raw, raw_tenant, baseline[i : i + args.stream_episodes])
        raw_s = time.perf_counter() - t0
        table_mb = raw.execute("SELECT pg_total_relation_size('trajectory_episodes')").fetchone()[0] / 1e6 / 2

        logger_episodes = make_episodes(min(args.episodes, 1000), args.response_tokens, 1, "log-")
        logger_decisions = sum(len(e.decisions) for e in logger_episodes)
        with Client(server.target, logger_key) as client:
            with TrajectoryLogger(client=client, spool_dir=Path(tmp) / "spool", batch_episodes=args.stream_episodes) as logger:
                t0 = time.perf_counter()
                for e in logger_episodes:
                    logger.log(e)
                logger.flush()
                logger_s = time.perf_counter() - t0
                assert logger.stats.logged == len(logger_episodes) and logger.stats.spooled == 0
        admin.close()
        raw.close()
        server.stop()
        pg.stop()

    svc_rate, raw_rate = decisions / service_s, decisions / raw_s
    lines = [
        f"# memory3 trajectory ingest ({len(episodes):,} episodes, {decisions:,} decisions, "
        f"{decisions / len(episodes):.0f} decisions/episode; {args.stream_episodes} episodes per stream, "
        f"{args.streams} concurrent streams; wire {wire_mb:.1f} MB, ~{1e6 * table_mb / decisions:.0f} B/decision stored)",
        "",
        "| figure | memory3 | baseline | ratio | target |",
        "|---|---:|---:|---:|---|",
        f"| decisions ingested/s via Log | {svc_rate:,.0f} | raw binary COPY {raw_rate:,.0f} | {svc_rate / raw_rate:.2f} | "
        f">= {TARGET:,}/s {'met' if svc_rate >= TARGET else 'MISSED'} |",
        f"| episodes ingested/s via Log | {len(episodes) / service_s:,.0f} | raw binary COPY {len(episodes) / raw_s:,.0f} | "
        f"{raw_s / service_s:.2f} | |",
        f"| SDK Episode -> wire encoding, decisions/s | {decisions / encode_s:,.0f} | | | |",
        f"| background logger end to end, decisions/s | {logger_decisions / logger_s:,.0f} | | | |",
    ]
    report = "\n".join(lines)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "trajectories.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
