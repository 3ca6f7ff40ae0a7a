"""Operational surface: health and reflection on the service port, migrations on an empty
database, committed stubs in sync with the .proto files, docker-compose matching the CLI, and
`memory3 serve` on the embedded default (persistence across restarts, clean SIGTERM)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psycopg
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy import create_engine, inspect, make_url

from memory3.service.db import migrate
from memory3.service.embedded_pg import libpq_url
from memory3.service.server import SERVICE_NAMES

ROOT = Path(__file__).resolve().parent.parent


def test_health_and_reflection_answer(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", *SERVICE_NAMES):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        listed = {s.name for s in replies[0].list_services_response.service}
        assert set(SERVICE_NAMES) | {"grpc.health.v1.Health"} <= listed
        # grpc.reflection.v1 (what grpcurl asks first): the same messages under the v1 name
        v1 = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                   request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                   response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        [listing, described] = list(v1(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="memory3.v1.Memories"),
        ]), timeout=5))
        assert {s.name for s in listing.list_services_response.service} == listed
        assert described.file_descriptor_response.file_descriptor_proto  # the .proto, for clients to build stubs


def test_migrations_run_up_on_an_empty_database(database_url):
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS m3_migration_test")
        conn.execute("CREATE DATABASE m3_migration_test")
    url = make_url(database_url).set(database="m3_migration_test").render_as_string(hide_password=False)
    migrate(url)
    migrate(url)  # idempotent at head
    engine = create_engine(url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert {"tenants", "api_keys", "banks", "memory_references", "alembic_version"} <= tables
    finally:
        engine.dispose()


def _fresh_database(database_url: str, name: str) -> str:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return make_url(database_url).set(database=name).render_as_string(hide_password=False)


def _schema(url: str) -> set:
    """Tables, columns (type, nullability, default), indexes and constraints of the public schema."""
    with psycopg.connect(libpq_url(url)) as conn:
        columns = conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns"
            " WHERE table_schema = 'public'").fetchall()
        indexes = conn.execute("SELECT tablename, indexdef FROM pg_indexes WHERE schemaname = 'public'").fetchall()
        constraints = conn.execute(
            "SELECT conrelid::regclass::text, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE connamespace = 'public'::regnamespace").fetchall()
        persistence = conn.execute(
            "SELECT relname, relpersistence FROM pg_class WHERE relnamespace = 'public'::regnamespace"
            " AND relkind IN ('r', 'p')").fetchall()
    return {("column", *c) for c in columns} | {("index", *i) for i in indexes} | {
        ("constraint", *c) for c in constraints} | {("table", *t) for t in persistence}


def test_migrations_carry_data_from_the_first_revision_and_round_trip(database_url):
    """Upgrade a database holding data of every kind from revision 0001 to head, step by step
    with data added at each, then downgrade to base and upgrade again: the data survives the
    upgrades and the round-tripped schema equals a fresh head's."""
    from alembic import command

    from memory3.service.db import alembic_config

    url = _fresh_database(database_url, "m3_migration_data")
    migrate(url, "0001")
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("INSERT INTO tenants (id, name) VALUES (1, 'acme')")
        conn.execute("INSERT INTO api_keys (key_id, tenant_id, secret_hash) VALUES ('0123456789abcdef', 1, 'h')")
        conn.execute("INSERT INTO banks (id, tenant_id, name, model_fingerprint, memory_spec, embedder_name,"
                     " embedder_dim, metric) VALUES (1, 1, 'kb', 'ff', '{}', 'client', 2, 'l2')")
        conn.execute("CREATE TABLE memory_references_b1 PARTITION OF memory_references FOR VALUES IN (1)")
        conn.execute("INSERT INTO memory_references (bank_id, external_id, text, embedding, memory, memory_size,"
                     " content_hash) VALUES (1, 'r1', 'text', '[1,2]', '\\x0102', 2, 'c')")
    migrate(url, "0002")
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO trajectory_episodes (tenant_id, episode_id, model_fingerprint, proxy_version, prompt_ids,"
            " response_ids, n_decisions, decision_position, decision_token, decision_llm_prob, decision_rank,"
            " decision_p_accept, decision_accepted, decision_rejections) VALUES (1, 'e1', 'ff', 0, '{1,2}', '{3}',"
            " 1, '{0}', '{3}', '{0.5}', '{0}', '{0.7}', '{true}', '{0}')")
        conn.execute("INSERT INTO proxies (tenant_id, name, version, model_fingerprint, parent_version, metrics,"
                     " config_json, weights, weights_size, weights_sha256) VALUES (1, 'p', 1, 'ff', 0, '{}', '{}',"
                     " '\\x00112233', 4, 's')")
    migrate(url, "0003")
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("INSERT INTO bank_codebooks (bank_id, version, digest, blob) VALUES (1, 1, 'd', '\\x0a0b')")
    migrate(url)
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        assert conn.execute("SELECT text, memory FROM memory_references WHERE external_id = 'r1'").fetchone() == (
            "text", b"\x01\x02")
        assert conn.execute("SELECT response_ids FROM trajectory_episodes").fetchone() == ([3],)
        assert conn.execute("SELECT weights FROM proxies").fetchone() == (b"\x00\x11\x22\x33",)
        assert conn.execute("SELECT blob FROM bank_codebooks").fetchone() == (b"\x0a\x0b",)
        used = conn.execute("SELECT trajectory_bytes FROM tenant_usage WHERE tenant_id = 1").fetchone()[0]
        assert used > 0  # the usage ledger starts from the trajectories already stored
        conn.execute("DROP TABLE memory_references_b1")  # banks' tables are data, not schema
    cfg = alembic_config()
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            cfg.attributes["connection"] = connection
            command.downgrade(cfg, "base")
    finally:
        engine.dispose()
    assert {t[1] for t in _schema(url) if t[0] == "table"} <= {"alembic_version"}  # base: nothing of ours left
    migrate(url)
    fresh = _fresh_database(database_url, "m3_migration_fresh")
    migrate(fresh)
    assert _schema(url) == _schema(fresh)


def test_stubs_match_the_proto_files(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "scripts/regen_protos.sh"), str(tmp_path)], cwd=ROOT, check=True, env=env)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "regenerate script produced nothing"
    for rel in generated:
        committed = ROOT / "proto" / rel
        assert committed.exists(), f"{rel} is not committed"
        assert committed.read_text() == (tmp_path / rel).read_text(), f"{rel} drifted: run scripts/regen_protos.sh"


def test_compose_runs_the_cli_serve_command_on_matching_ports():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["memory3"]
    command = service["command"]
    assert command[:2] == ["memory3", "serve"]
    port = command[command.index("--port") + 1]
    # no TLS: published on loopback only; a range of host ports, one per process of `--scale memory3=N`
    assert any(p.startswith(f"127.0.0.1:{port}-") and p.endswith(f":{port}") for p in service["ports"])
    assert service["environment"]["DATABASE_URL"].startswith("postgresql://")
    assert "pgvector/pgvector" in compose["services"]["db"]["image"]
    assert service["depends_on"]["db"]["condition"] == "service_healthy"
    assert service["healthcheck"]["test"][1:3] == ["memory3", "health"]
    from memory3.cli.main import build_parser

    args = build_parser().parse_args(command[1:])
    assert args.command == "serve" and args.port == int(port) and args.host == "0.0.0.0"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"EXPOSE {port}" in dockerfile


def test_compose_keeps_secrets_in_files_and_the_service_off_the_superuser():
    """Issue 22, finding 11: compose connected as the PostgreSQL superuser with a hard-coded password."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    db, service = compose["services"]["db"], compose["services"]["memory3"]
    url = make_url(service["environment"]["DATABASE_URL"])
    assert url.password is None and url.username != db["environment"]["POSTGRES_USER"]
    for environment in (db["environment"], service["environment"]):
        assert not any("PASSWORD" in k and not k.endswith("_FILE") for k in environment), environment
        assert not any(k.endswith("ADMIN_KEY") for k in environment), environment
    secrets = {name: spec["file"] for name, spec in compose["secrets"].items()}
    for used in (*db["secrets"], *service["secrets"]):
        assert used in secrets
    init = (ROOT / "deploy" / "initdb" / "10-memory3-role.sh").read_text()
    assert f"CREATE ROLE {url.username} LOGIN" in init and "NOSUPERUSER" in init
    assert db["image"].split(":")[1].endswith("-pg18")  # the same major as the embedded PostgreSQL
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "secrets"} <= set(ignored)


def test_compose_replicas_profile_streams_from_the_primary_and_validates(tmp_path):
    """Issue 18: profile `replicas` adds a pgvector standby of `db` (base backup + streaming, by
    deploy/replica.sh); the service reads from it when MEMORY3_REPLICA_URLS names it and scales
    (`--scale memory3=2`). `docker-compose config` validates the file when the CLI is installed."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    db, replica, service = (compose["services"][name] for name in ("db", "db-replica", "memory3"))
    assert replica["profiles"] == ["replicas"] and "profiles" not in db and "profiles" not in service
    assert replica["image"] == db["image"]  # the same PostgreSQL and pgvector as the primary
    assert replica["depends_on"]["db"]["condition"] == "service_healthy"
    script = replica["entrypoint"][-1]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in replica["volumes"]}
    source = (ROOT / mounted[script]).read_text()
    assert "pg_basebackup -h db" in source and " -R " in source and "-U replicator" in source
    assert "REPLICATION_PASSWORD_FILE" in source and "replication_password" in replica["secrets"]
    init = (ROOT / "deploy" / "initdb" / "20-replication.sh").read_text()
    assert "LOGIN REPLICATION" in init and "NOSUPERUSER" in init and "host replication replicator" in init
    assert "replication_password" in db["secrets"] and "replication_password" in compose["secrets"]
    assert "replication_password" in (ROOT / "deploy" / "make-secrets.sh").read_text()
    assert service["environment"]["MEMORY3_REPLICA_URLS"].startswith("${MEMORY3_REPLICA_URLS")
    assert "db-replica" not in service.get("depends_on", {})  # a replica away is skipped, never awaited
    cli = shutil.which("docker-compose")
    if cli is None:
        pytest.skip("docker-compose not installed (apt-get install docker-compose): structure checked only")
    for name in ("docker-compose.yml", "deploy", "Dockerfile"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, tmp_path / name)
    (tmp_path / "secrets").mkdir()
    for name in compose["secrets"]:
        (tmp_path / "secrets" / name).write_text("x\n")
    env = {**os.environ, "MEMORY3_REPLICA_URLS": "postgresql://memory3@db-replica:5432/memory3"}
    for profile in ((), ("--profile", "replicas")):
        result = subprocess.run([cli, *profile, "config", "-q"], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr


def test_settings_come_from_secret_files(tmp_path, monkeypatch):
    from memory3.service.config import load_settings
    from memory3.service.server import database_url

    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "admin").write_text("a" * 20 + "0123456789abcdef\n")
    monkeypatch.setenv("MEMORY3_DATABASE_PASSWORD_FILE", str(tmp_path / "pw"))
    monkeypatch.setenv("MEMORY3_ADMIN_KEY_FILE", str(tmp_path / "admin"))
    monkeypatch.setenv("DATABASE_URL", "postgresql://memory3@db:5432/memory3")
    settings = load_settings()
    assert settings.admin_key == "a" * 20 + "0123456789abcdef"
    assert make_url(database_url(settings)[0]).password == "s3cret"
    monkeypatch.setenv("MEMORY3_ADMIN_KEY_FILE", str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="MEMORY3_ADMIN_KEY_FILE=.*cannot read it"):
        load_settings()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(data_dir: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMORY3_") and k != "DATABASE_URL"}
    env.update(MEMORY3_DATA_DIR=str(data_dir), MEMORY3_PORT=str(port), MEMORY3_METRICS_PORT="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "memory3.cli.main", "serve"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if "listening on" in line:
            import threading

            threading.Thread(target=proc.stdout.read, daemon=True).start()  # a full pipe would block the server
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early: {line}{proc.stdout.read()}")
    raise AssertionError("serve did not start")


def _cli(data_dir: Path, port: int, *args: str, key: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMORY3_") and k != "DATABASE_URL"}
    env.update(MEMORY3_DATA_DIR=str(data_dir), MEMORY3_PORT=str(port))
    if key:
        env["MEMORY3_API_KEY"] = key
    done = subprocess.run([sys.executable, "-m", "memory3.cli.main", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_serve_embedded_default_persists_and_stops_cleanly(tmp_path):
    port = _free_port()
    proc = _start(tmp_path, port)
    try:
        _cli(tmp_path, port, "tenant", "create", "acme")  # admin key from data_dir/admin.key
        key = json.loads(_cli(tmp_path, port, "key", "issue", "acme"))["api_key"]
        _cli(tmp_path, port, "bank", "create", "kb", "--embedder", "client", "--dimension", "3", key=key)
        assert _cli(tmp_path, port, "health").strip() == "SERVING"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    pid_file = tmp_path / "pgdata" / "postmaster.pid"
    assert not pid_file.exists(), "embedded PostgreSQL was left running"
    proc = _start(tmp_path, port)
    try:
        banks = _cli(tmp_path, port, "bank", "list", key=key)
        assert json.loads(banks)["name"] == "kb"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0


def test_the_api_reference_matches_the_proto_files():
    """docs/api.md is generated from the .proto files (their comments are the documentation)."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "api_reference.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr or result.stdout


def test_the_contract_lints_clean_and_breaks_nothing_since_the_last_release():
    """buf lint (STANDARD, with the naming exceptions proto/buf.yaml explains) and buf breaking
    (WIRE_JSON) against the last release's contract, kept as a buf image in proto/releases/ (built
    from its git tag: `buf build .git#tag=vX,subdir=proto -o proto/releases/vX.binpb`)."""
    buf = ROOT / "tests" / "node" / "node_modules" / ".bin" / "buf"
    assert buf.exists(), "run `npm ci --prefix tests/node` (make test does)"
    lint = subprocess.run([str(buf), "lint"], cwd=ROOT / "proto", capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    releases = sorted((ROOT / "proto" / "releases").glob("v*.binpb"))
    assert releases, "no released contract to compare with in proto/releases/"
    breaking = subprocess.run([str(buf), "breaking", "proto", "--against", str(releases[-1])],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert breaking.returncode == 0, breaking.stdout + breaking.stderr
