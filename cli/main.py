"""The ``memory3`` command: serve, manage tenants/keys and banks, ingest JSONL, query, train,
export trajectories to Parquet (``trajectories export``: written whole or not at all, progress on stderr).

A user's mistake gets one line on stderr — what, where, how to fix — and exit status 2; a server
refusal gets its status and message (exit 1); never a traceback, never a secret (passwords in
URLs and API keys are masked in every message).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path

from memory3.core.metadata import (
    OPERATORS, MetadataError, check_metadata, conditions_from_filter, metadata_to_json, parse_json,
)
from memory3.service.config import ADMIN_KEY_FILE, Settings, load_settings


class CliError(Exception):
    """A user's mistake: the message says what, where and how to fix it."""


_SECRETS = (
    (re.compile(r"(\w+://[^:/@\s]*:)[^@\s]+@"), r"\1***@"),  # password in a URL
    (re.compile(r"\b(m3_[0-9a-f]{16}_)[A-Za-z0-9_-]+"), r"\1***"),  # tenant API key
    (re.compile(r"\b(m3admin_)[A-Za-z0-9_-]+"), r"\1***"),  # generated admin key
)


def redact(text: str, *secrets: str | None) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    for secret in secrets:
        if secret and len(secret) >= 8:
            text = text.replace(secret, "***")
    return text


def _target(args, settings: Settings) -> str:
    return args.target or settings.target or f"{settings.host}:{settings.port}"


def _client(args):
    from memory3.sdk.client import Client

    settings = load_settings()
    key = args.api_key or settings.api_key
    if not key and args.command in ("tenant", "key"):  # admin commands: the admin key
        key = settings.admin_key
        admin_key_file = settings.data_dir / ADMIN_KEY_FILE
        if not key and admin_key_file.exists():
            key = admin_key_file.read_text().strip()
        if not key:
            raise CliError(f"no admin key: set MEMORY3_ADMIN_KEY (or MEMORY3_ADMIN_KEY_FILE), pass --api-key, or run "
                           f"where `memory3 serve` keeps {admin_key_file}")
    if not key:
        raise CliError("no API key: pass --api-key or set MEMORY3_API_KEY (a tenant's key from `memory3 key issue`)")
    ca_file = args.ca_file or settings.ca_file
    return Client(_target(args, settings), key, tls=settings.tls or bool(ca_file), ca_file=ca_file)


def cmd_serve(args) -> None:
    from memory3.service.observability import configure_logging
    from memory3.service.server import serve

    settings = load_settings(host=args.host, port=args.port, data_dir=args.data_dir)
    configure_logging(settings.log_level, settings.log_format)
    if settings.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.torch_threads)
    try:
        asyncio.run(serve(settings))
    except (ValueError, OSError, RuntimeError) as err:  # configuration, database or port: say which, once
        secrets = (settings.admin_key, settings.database_password, settings.database_url)
        raise CliError(f"memory3 serve could not start: {redact(str(err).splitlines()[0], *secrets[:2])}") from None


def cmd_tenant(args) -> None:
    with _client(args) as client:
        if args.action == "create":
            print(client.create_tenant(args.name))
        elif args.action == "list":
            print("\n".join(client.list_tenants()))


def cmd_key(args) -> None:
    with _client(args) as client:
        if args.action == "issue":
            key_id, api_key = client.issue_key(args.tenant, args.label)
            print(json.dumps({"key_id": key_id, "api_key": api_key}))
        else:
            client.revoke_key(args.key_id)
            print(f"revoked {args.key_id}")


def _bank_json(bank) -> str:
    return json.dumps(
        {
            "name": bank.name, "model_fingerprint": bank.model_fingerprint, "memory_spec": bank.spec.to_dict(),
            "embedder": {"name": bank.embedder_name, "dimension": bank.embedder_dim, "metric": bank.metric},
        }
    )


def cmd_bank(args) -> None:
    from memory3.core.memory_spec import MemorySpec
    from memory3.sdk.client import BankInfo

    with _client(args) as client:
        if args.action == "create":
            if args.model:
                from memory3.sdk.model.fingerprint import model_fingerprint

                model, _, spec = _load_model(args.model)
                fingerprint = model_fingerprint(model)
                if args.model_space:
                    from memory3.sdk.memory.retrieval_head import load_retrieval_head

                    head = load_retrieval_head(args.model, model)
                    if head is None:
                        raise CliError(f"{args.model} has no retrieval head: train one with "
                                       f"`memory3 train-retriever --model {args.model}`")
                    args.embedder, args.dimension, args.metric = head.space, head.dim, "cosine"
            elif args.model_space:
                raise CliError("--model-space needs --model DIR (the model and its retrieval head)")
            else:
                layers = tuple(int(i) for i in args.layers.split(","))
                spec = MemorySpec(layers, args.kv_heads, args.head_dim, args.tokens, args.reference_length, args.codec)
                fingerprint = args.fingerprint
            bank = BankInfo(args.name, fingerprint, spec, args.embedder, args.dimension, args.metric)
            print(_bank_json(client.create_bank(bank)))
        elif args.action == "list":
            for bank in client.list_banks():
                print(_bank_json(bank))
        elif args.action == "get":
            print(_bank_json(client.get_bank(args.name)))
        elif args.action == "delete":
            print(f"deleted bank {args.name} with {client.delete_bank(args.name)} references")
        elif args.action == "stats":
            print(json.dumps(client.stats(args.name).__dict__))


def _reference_from_line(path: Path, number: int, line: str):
    """One JSONL line as a Reference; CliError naming the file, the line and the problem."""
    import base64
    import binascii

    from memory3.sdk.client import Reference

    where = f"{path}:{number}"
    try:
        item = json.loads(line)
    except ValueError as err:
        raise CliError(f"{where}: not JSON ({err.args[0]})") from None
    if not isinstance(item, dict):
        raise CliError(f"{where}: each line must be a JSON object like {{\"id\": \"r1\", \"text\": \"...\"}}, "
                       f"got a {type(item).__name__}")
    if "id" not in item:
        raise CliError(f"{where}: missing \"id\" (each line needs at least \"id\" and \"text\")")
    metadata = item.get("metadata") or {}
    try:
        check_metadata(metadata, '"metadata"')
    except MetadataError as err:
        raise CliError(f"{where}: {err} (e.g. {{\"lang\": \"en\", \"year\": 2024, \"tags\": [\"a\"]}})") from None
    embedding = item.get("embedding")
    if embedding is not None and not (isinstance(embedding, list) and all(isinstance(x, (int, float)) for x in embedding)):
        raise CliError(f"{where}: \"embedding\" must be a list of numbers")
    try:
        memory = base64.b64decode(item["memory"], validate=True) if item.get("memory") else None
    except (binascii.Error, TypeError, ValueError):
        raise CliError(f"{where}: \"memory\" is not base64") from None
    return Reference(external_id=str(item["id"]), text=str(item.get("text", "")), metadata=metadata,
                     embedding=embedding, memory=memory)


def _jsonl_references(path: Path):
    """The file's references, one line at a time (CliError naming the line of a bad one)."""
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    yield _reference_from_line(path, number, line)
    except UnicodeDecodeError as err:
        raise CliError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def cmd_ingest(args) -> None:
    from tqdm import tqdm

    path = Path(args.file)
    total = sum(1 for _ in _jsonl_references(path))  # a first pass checks every line: a bad file sends nothing
    with _client(args) as client:
        writer = _memory_writer(client, args.bank, args.model) if args.model else None
        with tqdm(total=total, unit="ref", desc=f"ingest {args.bank}") as bar:
            if writer is None:
                summary = client.write_many(args.bank, _jsonl_references(path), batch_size=args.batch_size, progress=bar)
            else:
                summary = client.run(writer.write(client.aio, args.bank, _jsonl_references(path), progress=bar))
    print(json.dumps(summary.__dict__))


def _load_model(model_dir: str):
    """(model, tokenizer, spec) of a `memory3 train` model directory, without transformers' progress
    bars (stderr keeps to the command's own bar and one-line errors)."""
    from memory3.trainer.model import load_reference_model
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    return load_reference_model(model_dir)


def _memory_writer(client, bank: str, model_dir: str):
    """``ingest --model``: a writer that encodes each text's memory with the bank's own model."""
    from memory3.sdk.memory import MemoryEncoder, MemoryWriter
    from memory3.sdk.memory.retrieval_head import is_model_space, load_retrieval_head
    from memory3.sdk.model.fingerprint import model_fingerprint

    model, tokenizer, spec = _load_model(model_dir)
    info = client.get_bank(bank)
    fingerprint = model_fingerprint(model)
    if info.model_fingerprint != fingerprint or info.spec != spec:
        raise CliError(f"bank {bank!r} is not for the model in {model_dir} (its fingerprint or memory spec differ): "
                       f"create the bank with `memory3 bank create NAME --model {model_dir}`")
    if spec.codec == "pq":
        raise CliError(f"bank {bank!r} stores PQ codes: encode with the SDK's MemoryWriter and the bank's codebook")
    head = None
    if is_model_space(info.embedder_name):  # the vectors are the model's own retrieval keys
        head = load_retrieval_head(model_dir, model)
        if head is None:
            raise CliError(f"bank {bank!r} lives in a model space but {model_dir} has no retrieval head "
                           f"(memory3 train-retriever --model {model_dir})")
        head.check_bank(bank, info.embedder_name, info.embedder_dim)
    return MemoryWriter(MemoryEncoder(model, tokenizer, spec, retrieval_head=head), skip_short=True)


def _filter_option(text: str | None):
    """--filter's JSON (memory3.core.metadata's syntax), checked here: a mistake is one line."""
    if text is None:
        return None
    try:
        spec = parse_json(text, "--filter")
        conditions_from_filter(spec, "--filter")
    except MetadataError as err:
        raise CliError(f"{err}; write e.g. --filter '{{\"lang\": \"en\", \"year\": {{\"gte\": 2020}}, "
                       f"\"tags\": {{\"in\": [\"a\", \"b\"]}}}}' (operators: {', '.join(OPERATORS)})") from None
    return spec


def _reference_json(ref, **extra) -> str:
    """One reference as a JSON line: the fields `memory3 ingest` reads (id, text, metadata) and more."""
    return json.dumps({"id": ref.external_id, **extra, "text": ref.text, "metadata": ref.metadata,
                       "memory_size": ref.memory_size}, ensure_ascii=False)


def cmd_query(args) -> None:
    spec = _filter_option(args.filter)
    with _client(args) as client:
        hits = client.retrieve(args.bank, text=args.text, top_k=args.top_k, max_overlap=args.max_overlap, filter=spec)
    for hit in hits:
        if args.json:
            print(_reference_json(hit, rank=hit.rank, score=hit.score))
        else:
            print(f"{hit.rank + 1}. {hit.score:.4f} {hit.external_id}: {hit.text}")


def cmd_scroll(args) -> None:
    spec = _filter_option(args.filter)
    if args.limit is not None and args.limit < 1:
        raise CliError(f"--limit {args.limit}: give at least 1 (leave it out for every reference)")
    if not 1 <= args.page_size <= 1000:
        raise CliError(f"--page-size {args.page_size}: give 1 to 1000 references per page")
    page_size = min(args.page_size, args.limit or args.page_size)
    shown = 0
    with _client(args) as client:
        try:
            for ref in client.scroll(args.bank, filter=spec, page_size=page_size):
                line = _reference_json(ref) if args.json else f"{ref.external_id} {metadata_to_json(ref.metadata)} {ref.text}"
                print(line)
                shown += 1
                if shown == args.limit:
                    break
            sys.stdout.flush()
        except BrokenPipeError:  # `memory3 scroll kb | head`: the reader has all it wanted
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def cmd_health(args) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    settings = load_settings()
    target = args.target or settings.target or f"{settings.host}:{settings.port}"
    ca_file = args.ca_file or settings.ca_file
    if ca_file or settings.tls:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(
            Path(ca_file).read_bytes() if ca_file else None))
    else:
        channel = grpc.insecure_channel(target)
    deadline = time.monotonic() + args.wait
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:  # with --wait: until SERVING (a server still starting refuses or answers NOT_SERVING)
            left = deadline - time.monotonic()
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=max(left, args.timeout)
                                   if args.wait else args.timeout, wait_for_ready=args.wait > 0)
            except grpc.RpcError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
                continue
            if reply.status == health_pb2.HealthCheckResponse.SERVING or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    if status != "SERVING":
        sys.exit(1)


def cmd_train(args) -> None:
    from memory3.trainer.pretrain import main as train_main

    train_main(args.rest)


def cmd_train_proxy(args) -> None:
    from memory3.trainer.proxy_rl import main as train_proxy_main

    train_proxy_main(args.rest)


def cmd_adapt(args) -> None:
    from memory3.trainer.adapt import main as adapt_main

    adapt_main(args.rest)


def cmd_train_retriever(args) -> None:
    from memory3.trainer.retriever import main as train_retriever_main

    train_retriever_main(args.rest)


def cmd_generate(args) -> None:
    from .generate import generate_command

    settings = load_settings()
    key = args.api_key or settings.api_key
    if not key and args.mode != "plain":
        raise CliError("no API key: pass --api-key or set MEMORY3_API_KEY (a tenant's key from `memory3 key issue`)")
    generate_command(
        args.target or settings.target or f"{settings.host}:{settings.port}", key or "", args.bank, args.model,
        args.prompt, mode=args.mode, max_new_tokens=args.max_new_tokens, chunk=args.chunk, top_k=args.top_k,
        temperature=args.temperature, retrieval_bias=args.retrieval_bias, adapter_dir=args.adapter,
    )


def _iso_time(option: str, value: str | None):
    """An ISO 8601 time from the command line, as an aware datetime (no zone given: UTC)."""
    from datetime import datetime, timezone

    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise CliError(f"{option} {value!r} is not an ISO 8601 time: write e.g. 2025-05-01, 2025-05-01T12:00:00Z "
                       "or 2025-05-01T12:00:00+02:00 (no zone: UTC)") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def cmd_trajectories(args) -> None:
    """``trajectories export``: the Export RPC's Arrow stream into one Parquet file (all or nothing)."""
    from tqdm import tqdm

    out = Path(args.out)
    if out.is_dir():
        raise CliError(f"--out {out} is a directory: name a file, e.g. --out {out / 'episodes.parquet'}")
    if not out.absolute().parent.is_dir():
        raise CliError(f"--out {out}: the directory {out.absolute().parent} does not exist; create it or choose "
                       "another path")
    since, until = _iso_time("--since", args.since), _iso_time("--until", args.until)
    if since is not None and until is not None and since >= until:
        raise CliError(f"--since {args.since} is not before --until {args.until}: no episode could match; "
                       "--since is inclusive, --until exclusive")
    negative = [v for v in args.proxy_versions or () if v < 0]
    if negative:
        raise CliError(f"--proxy-version {negative[0]}: proxy versions are 0 (the initial proxy) or more")
    from memory3.service.trajectories import REWARD_NAME

    if args.reward_key is not None and not REWARD_NAME.fullmatch(args.reward_key):
        raise CliError(f"--reward-key {args.reward_key!r} is not a reward name: 1-64 letters, digits, '_', '.', ':', "
                       "'/', '-', starting with a letter or digit (as the rewards were logged)")
    if not 0 < args.timeout < float("inf"):
        raise CliError(f"--timeout {args.timeout}: give the export's deadline in seconds, more than 0")
    filters = {"bank": args.bank, "logged_after": since, "logged_before": until,
               "episode_ids": args.episode_ids, "proxy_versions": args.proxy_versions}
    with _client(args) as client:
        total, _ = client.count_episodes(**filters)
        with tqdm(total=total, unit="episode", desc=f"export {out.name}", file=sys.stderr) as bar:
            rows = client.export_parquet(out, reward_key=args.reward_key, timeout=args.timeout, progress=bar,
                                         **filters)
    if args.json:
        print(json.dumps({"path": str(out), "episodes": rows, "bytes": out.stat().st_size}))
    else:
        print(f"wrote {rows} episodes to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memory3", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def client_command(name: str, help: str):
        p = sub.add_parser(name, help=help)
        p.add_argument("--target", help="server address (default MEMORY3_TARGET or MEMORY3_HOST:MEMORY3_PORT)")
        p.add_argument("--api-key", help="tenant or admin key (default MEMORY3_API_KEY)")
        p.add_argument("--ca-file", help="CA certificate (PEM) of a TLS server (default MEMORY3_CA_FILE)")
        return p

    serve = sub.add_parser("serve", help="run the gRPC service (embedded PostgreSQL unless DATABASE_URL is set)",
                           epilog=settings_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--host", help="address to bind (MEMORY3_HOST)")
    serve.add_argument("--port", type=int, help="gRPC port, 0 for any free one (MEMORY3_PORT)")
    serve.add_argument("--data-dir", type=Path, help="where the embedded PostgreSQL and admin.key live (MEMORY3_DATA_DIR)")
    serve.set_defaults(func=cmd_serve)

    tenant = client_command("tenant", "create or list tenants (admin key)")
    tenant.add_argument("action", choices=["create", "list"])
    tenant.add_argument("name", nargs="?")
    tenant.set_defaults(func=cmd_tenant)

    key = client_command("key", "issue or revoke API keys (admin key)")
    key_sub = key.add_subparsers(dest="action", required=True)
    issue = key_sub.add_parser("issue")
    issue.add_argument("tenant")
    issue.add_argument("--label", default="")
    revoke = key_sub.add_parser("revoke")
    revoke.add_argument("key_id")
    key.set_defaults(func=cmd_key)

    bank = client_command("bank", "create, list, get, delete banks, or show a bank's stats")
    bank.add_argument("action", choices=["create", "list", "get", "delete", "stats"])
    bank.add_argument("name", nargs="?")
    bank.add_argument("--model", help="reference model directory: take fingerprint and memory spec from it")
    bank.add_argument("--fingerprint", default="none", help="model fingerprint (without --model)")
    bank.add_argument("--layers", default="0", help="memory layers, comma separated (without --model)")
    bank.add_argument("--kv-heads", type=int, default=8)
    bank.add_argument("--head-dim", type=int, default=80)
    bank.add_argument("--tokens", type=int, default=8, help="tokens kept per kv head")
    bank.add_argument("--reference-length", type=int, default=128)
    bank.add_argument("--codec", default="int8", choices=["fp16", "int8", "int4", "pq"])
    bank.add_argument("--embedder", default="all-MiniLM-L6-v2", help="built-in embedder, or a client-side name")
    bank.add_argument("--dimension", type=int, default=384)
    bank.add_argument("--metric", default="cosine", choices=["cosine", "l2", "ip"])
    bank.add_argument("--model-space", action="store_true",
                      help="with --model: the bank's vectors are the model's own retrieval keys (its "
                           "retrieval_head.safetensors, from memory3 train-retriever): no text embedder on its paths")
    bank.set_defaults(func=cmd_bank)

    ingest = client_command("ingest", "write a JSONL file of references ({id, text, metadata?, embedding?, memory?})")
    ingest.add_argument("bank")
    ingest.add_argument("file")
    ingest.add_argument("--batch-size", type=int, default=64)
    ingest.add_argument("--model", metavar="DIR", help="encode each text's memory with this model (the bank's, from "
                        "`memory3 train`); texts too short for the memory spec are stored without one")
    ingest.set_defaults(func=cmd_ingest)

    query = client_command("query", "retrieve the references nearest a text")
    query.add_argument("bank")
    query.add_argument("text")
    query.add_argument("--top-k", type=int, default=5)
    query.add_argument("--max-overlap", type=float, default=0.0)
    query.add_argument("--filter", metavar="JSON",
                       help='metadata conditions, all of which must hold: {"lang": "en", "year": {"gte": 2020}, '
                            '"tags": {"in": ["a", "b"]}} (operators eq, in, gt, gte, lt, lte, exists)')
    query.add_argument("--json", action="store_true", help="one JSON object per hit: id, rank, score, text, metadata")
    query.set_defaults(func=cmd_query)

    scroll = client_command("scroll", "list a bank's references in id order, optionally filtered by metadata")
    scroll.add_argument("bank")
    scroll.add_argument("--filter", metavar="JSON", help="metadata conditions, as for `memory3 query --filter`")
    scroll.add_argument("--limit", type=int, help="stop after this many references (default: all)")
    scroll.add_argument("--page-size", type=int, default=100, help="references per request, 1..1000 (100)")
    scroll.add_argument("--json", action="store_true",
                        help="one JSON object per reference: id, text, metadata (what `memory3 ingest` reads), "
                             "memory_size")
    scroll.set_defaults(func=cmd_scroll)

    generate = client_command("generate", "stream a model's answer to a prompt, reading memories from a bank")
    generate.add_argument("prompt")
    generate.add_argument("--bank", required=True)
    generate.add_argument("--model", required=True, help="reference model directory (model, tokenizer, memory_spec.json)")
    generate.add_argument("--adapter", help="peft adapter from `memory3 adapt` on this base model (reads the base's banks)")
    generate.add_argument("--mode", default="memory", choices=["memory", "rag", "plain"])
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--chunk", type=int, default=64, help="tokens between memory retrievals")
    generate.add_argument("--top-k", type=int, default=5, help="memories (or RAG references) per retrieval")
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.add_argument("--retrieval-bias", type=float, default=0.0,
                          help="memory mode: weigh memories by retrieval score (0: off; 20 for small models)")
    generate.set_defaults(func=cmd_generate)

    trajectories = client_command("trajectories", "export logged proxy trajectories to Parquet")
    trajectories_sub = trajectories.add_subparsers(dest="action", required=True)
    export = trajectories_sub.add_parser(
        "export", help="the episodes a filter selects, as one Parquet file (datasets, pandas, polars, TRL columns)",
        description="Stream the episodes the filters select (all of them without one) through the Export RPC "
                    "into one Parquet file, written whole or not at all. Columns: docs/design.md, "
                    "'Trajectory export'.")
    for flag, text in (("--target", "server address (default MEMORY3_TARGET or MEMORY3_HOST:MEMORY3_PORT)"),
                       ("--api-key", "the tenant's key (default MEMORY3_API_KEY)"),
                       ("--ca-file", "CA certificate (PEM) of a TLS server (default MEMORY3_CA_FILE)")):
        export.add_argument(flag, default=argparse.SUPPRESS, help=text)  # SUPPRESS: one given before `export` stays
    export.add_argument("--out", required=True, metavar="FILE.parquet", help="the Parquet file to write (replaced)")
    export.add_argument("--since", metavar="ISO8601", help="logged at or after this time (no zone: UTC)")
    export.add_argument("--until", metavar="ISO8601", help="logged before this time (no zone: UTC)")
    export.add_argument("--episode", dest="episode_ids", nargs="+", action="extend", metavar="ID",
                        help="only these episode ids (repeatable; at most 10,000)")
    export.add_argument("--proxy-version", dest="proxy_versions", nargs="+", action="extend", type=int, metavar="N",
                        help="only episodes logged under these proxy versions (repeatable)")
    export.add_argument("--bank", help="only episodes that read this bank")
    export.add_argument("--reward-key", metavar="K",
                        help="the `reward` column is rewards[K] (null where absent); default: the sum of the rewards")
    export.add_argument("--timeout", type=float, default=3600.0, help="deadline of the export in seconds (3600)")
    export.add_argument("--json", action="store_true", help="print {path, episodes, bytes} as JSON")
    trajectories.set_defaults(func=cmd_trajectories)

    health = sub.add_parser("health", help="exit 0 when the server reports SERVING (for health checks)")
    health.add_argument("--target")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds one check may take")
    health.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="keep checking until SERVING or SECONDS have passed (a server still starting)")
    health.add_argument("--ca-file", help="CA certificate (PEM) of a TLS server (default MEMORY3_CA_FILE)")
    health.set_defaults(func=cmd_health)

    train = sub.add_parser("train", help="two-stage pretraining of the reference model from a config file",
                           add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER, help="see `memory3 train --help`")
    train.set_defaults(func=cmd_train)

    train_proxy = sub.add_parser("train-proxy", help="offline RL of the proxy policy from logged trajectories",
                                 add_help=False)
    train_proxy.add_argument("rest", nargs=argparse.REMAINDER, help="see `memory3 train-proxy --help`")
    train_proxy.set_defaults(func=cmd_train_proxy)

    train_retriever = sub.add_parser("train-retriever", add_help=False,
                                     help="train a model's retrieval head (model-space banks), the model frozen")
    train_retriever.add_argument("rest", nargs=argparse.REMAINDER, help="see `memory3 train-retriever --help`")
    train_retriever.set_defaults(func=cmd_train_retriever)

    adapt = sub.add_parser("adapt", add_help=False,
                           help="train a peft adapter that teaches a frozen model to read memories")
    adapt.add_argument("rest", nargs=argparse.REMAINDER, help="see `memory3 adapt --help`")
    adapt.set_defaults(func=cmd_adapt)
    return parser


HINTS = {
    "UNAVAILABLE": "is `memory3 serve` running there? (--target or MEMORY3_TARGET)",
    "UNAUTHENTICATED": "check the key (--api-key or MEMORY3_API_KEY; admin commands: MEMORY3_ADMIN_KEY)",
    "PERMISSION_DENIED": "tenant and key commands take the admin key, data commands a tenant's key",
    "DEADLINE_EXCEEDED": "the server did not answer in time; retry, or check its load and logs",
}


def _settings_error(err: ValueError) -> str:
    """A settings error in one line: which variable, what is wrong (pydantic's own text is a block)."""
    errors = getattr(err, "errors", None)
    if callable(errors):
        first = errors()[0]
        name = str(first["loc"][0]) if first.get("loc") else "?"
        variable = "DATABASE_URL" if name == "database_url" else f"MEMORY3_{name.upper()}"
        return f"{variable}: {first['msg']} (see `memory3 serve --help`)"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def settings_epilog() -> str:
    """Every setting of the one settings table: variable, default, meaning."""
    lines = ["settings (environment variables; each also from a file named by <VARIABLE>_FILE):"]
    for name, field in Settings.model_fields.items():
        variable = "DATABASE_URL" if name == "database_url" else f"MEMORY3_{name.upper()}"
        default = field.default
        shown = "unset" if default is None else str(default).replace(str(Path.home()), "~")
        lines.append(f"  {variable} (default {shown})\n      {field.description}")
    return "\n".join(lines)


def _fail(message: str, status: int) -> None:
    print(f"memory3: error: {message}", file=sys.stderr)
    raise SystemExit(status)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    trainers = {"train": cmd_train, "train-proxy": cmd_train_proxy, "train-retriever": cmd_train_retriever,
                "adapt": cmd_adapt}
    if argv[:1] and argv[0] in trainers:  # every option belongs to the trainer's own parser
        args = argparse.Namespace(command=argv[0], rest=argv[1:], func=trainers[argv[0]])
    else:
        args = build_parser().parse_args(argv)
    try:
        if args.command in ("tenant",) and args.action == "create" and not args.name:
            raise CliError("tenant create needs a name: memory3 tenant create NAME")
        if args.command == "bank" and args.action != "list" and not args.name:
            raise CliError(f"bank {args.action} needs a bank name: memory3 bank {args.action} NAME")
        args.func(args)
    except CliError as err:
        _fail(redact(str(err)), 2)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except FileNotFoundError as err:
        _fail(f"{err.filename}: no such file", 2)
    except OSError as err:
        _fail(redact(f"{getattr(err, 'filename', None) or ''} {err.strerror or err}".strip()), 2)
    except ValueError as err:  # settings from the environment or a secret file; a training config
        _fail(redact(str(err) if args.command.startswith("train") or args.command == "adapt"
                     else _settings_error(err)), 2)
    except Exception as err:
        import grpc

        if not isinstance(err, grpc.RpcError):
            raise
        code = err.code().name
        hint = HINTS.get(code)
        _fail(redact(f"{code}: {err.details()}" + (f" — {hint}" if hint else "")), 1)


if __name__ == "__main__":
    main()
