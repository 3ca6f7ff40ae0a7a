"""The gRPC server: database (embedded or DATABASE_URL), migrations, services, health and
reflection on one port, explicit message limits, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import platform
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client import start_http_server
from sqlalchemy.engine import make_url

from memory3.core.embedder import BuiltinEmbedder
from memory3.core.loop_thread import LoopThread
from memory3.v1 import (
    banks_pb2,
    banks_pb2_grpc,
    memories_pb2,
    memories_pb2_grpc,
    proxies_pb2,
    proxies_pb2_grpc,
    tenants_pb2,
    tenants_pb2_grpc,
    trajectories_pb2,
    trajectories_pb2_grpc,
)

from .admin import BanksServicer, TenantsServicer
from .auth import Authenticator, resolve_admin_key
from .bank_store import BankStore, CodebookStore
from .config import Settings
from .db import create_engine_for, migrate, purge_stale_staging
from .embedded_pg import EmbeddedPostgres, sqlalchemy_url
from .memories import MemoriesServicer
from .offload import CpuPool
from .metrics import BUILD_INFO, CACHE_LOOKUPS
from .observability import ObservabilityInterceptor, refresh_bank_gauges, watch_event_loop
from .guard import CallGuard
from .proxies import ProxiesServicer
from .proxy_store import ProxyStore
from .invalidation import Listener
from .quotas import QuotaStore
from .reference_store import ReferenceStore
from .replicas import Replicas, RoutedEngine, RoutingInterceptor
from .tenant_store import TenantStore
from .tokens import Tokens
from .trajectories import TrajectoriesServicer
from .trajectory_store import TrajectoryStore

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    banks_pb2.DESCRIPTOR.services_by_name["Banks"].full_name,
    memories_pb2.DESCRIPTOR.services_by_name["Memories"].full_name,
    tenants_pb2.DESCRIPTOR.services_by_name["Tenants"].full_name,
    trajectories_pb2.DESCRIPTOR.services_by_name["Trajectories"].full_name,
    proxies_pb2.DESCRIPTOR.services_by_name["Proxies"].full_name,
)


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """Message limits, keepalive, idle and age limits and streams per connection, from the settings."""

    def ms(seconds: float) -> int:
        return int(seconds * 1000)

    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", ms(settings.keepalive_seconds)),
        ("grpc.keepalive_timeout_ms", ms(settings.keepalive_timeout_seconds)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_idle_ms", ms(settings.max_connection_idle_seconds)),
        ("grpc.max_connection_age_ms", ms(settings.max_connection_age_seconds)),
        ("grpc.max_connection_age_grace_ms", ms(settings.grace_seconds)),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
    ]


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def add_reflection(server: grpc.aio.Server) -> None:
    """Server reflection under both names tools ask for: ``grpc.reflection.v1`` (grpcurl and
    current tools ask it first) and ``v1alpha``. The two protocols are the same messages under two
    package names, so v1 is served by the v1alpha servicer with v1alpha's (wire-identical) messages."""
    names = (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),)
    )


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    engine: object
    embedded: EmbeddedPostgres | None
    settings: Settings
    metrics_http: object | None = None
    metrics_port: int | None = None
    background: asyncio.Future | None = None
    cpu: CpuPool | None = None
    guard: CallGuard | None = None
    replicas: Replicas | None = None
    listener: Listener | None = None

    async def stop(self) -> None:
        """Drain: report NOT_SERVING (for ``drain_notice_seconds``, so load balancers stop sending
        while the listener still answers), let in-flight calls finish (up to the grace), then close."""
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(self.settings.drain_notice_seconds)
        await self.server.stop(self.settings.grace_seconds)
        if self.background is not None:
            self.background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.background
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()
        if self.cpu is not None:
            self.cpu.shutdown()
        if self.replicas is not None:
            await self.replicas.close()
        await self.engine.dispose()
        if self.embedded is not None:
            self.embedded.stop()


def with_password(url: str, password: str | None) -> str:
    """The URL for SQLAlchemy's psycopg driver, with ``password`` when it carries none."""
    parsed = make_url(sqlalchemy_url(url))
    if password and not parsed.password:
        parsed = parsed.set(password=password)
    return parsed.render_as_string(hide_password=False)


def database_url(settings: Settings) -> tuple[str, EmbeddedPostgres | None]:
    if settings.database_url:
        return with_password(settings.database_url, settings.database_password), None
    embedded = EmbeddedPostgres(settings.data_dir)
    return embedded.url, embedded


def watch_caches(listener: Listener, tenants: TenantStore, banks: BankStore, codebooks: CodebookStore,
                 quotas: QuotaStore) -> None:
    """What each cache drops on an invalidation notice (service/invalidation.py), and on a
    reconnection of the listener (notices may have been missed: everything)."""
    listener.on("key", lambda args: tenants.forget_key(args[0]))
    listener.on("bank", lambda args: (banks.forget(int(args[0]), args[2]), codebooks.forget(int(args[1]))))
    listener.on("quota", lambda args: quotas.forget(int(args[0])))
    for cache in (tenants, banks, quotas):
        listener.on_reset(cache.forget_all)


async def start_server(settings: Settings, embedder: BuiltinEmbedder | None = None) -> RunningServer:
    url, embedded = database_url(settings)
    await asyncio.to_thread(migrate, url)
    engine = create_engine_for(url, settings)
    tenants = TenantStore(engine, settings.key_cache_seconds)
    admin_key, admin_key_path = resolve_admin_key(settings.admin_key, settings.data_dir)
    if admin_key_path:
        log.info("admin key (MEMORY3_ADMIN_KEY unset) is in %s", admin_key_path)
    auth = Authenticator(tenants, admin_key)
    tokens = Tokens(admin_key)  # page tokens and cursors: the same on every replica sharing the admin key
    replicas = Replicas(engine, [with_password(u, settings.database_password) for u in settings.replica_urls],
                        settings, tokens)
    # The stores of routed reads (service/replicas.py) get an engine whose connections go to the
    # replica chosen for the call; keys and quotas are always read on the primary.
    routed = RoutedEngine(engine) if replicas.enabled else engine
    banks = BankStore(routed, settings.hnsw_m, settings.hnsw_ef_construction, settings.bank_cache_seconds)
    refs = ReferenceStore(routed, settings.hnsw_ef_search, settings.filter_exact_rows)
    def count_lookup(hit: bool) -> None:
        CACHE_LOOKUPS.labels("query_embedding", "hit" if hit else "miss").inc()

    embedder = embedder or BuiltinEmbedder(settings.embedder_device, settings.query_cache_size, settings.embed_batch_max)
    embedder.on_cache_lookup = embedder.on_cache_lookup or count_lookup

    quotas = QuotaStore(engine, settings)
    cpu = CpuPool(settings.cpu_workers)
    await banks.drop_orphans()
    guard = CallGuard(settings, auth, quotas)
    interceptor = ObservabilityInterceptor(guard)
    server = grpc.aio.server(interceptors=[interceptor, RoutingInterceptor(replicas)], options=grpc_options(settings))
    codebooks = CodebookStore(routed)
    listener = Listener(url, settings.replica_timeout_seconds)
    watch_caches(listener, tenants, banks, codebooks, quotas)
    banks_pb2_grpc.add_BanksServicer_to_server(BanksServicer(auth, banks, codebooks, settings, quotas, cpu, tokens), server)
    memories_pb2_grpc.add_MemoriesServicer_to_server(
        MemoriesServicer(settings, auth, banks, refs, codebooks, embedder, quotas, cpu, tokens), server
    )
    tenants_pb2_grpc.add_TenantsServicer_to_server(TenantsServicer(auth, tenants, quotas), server)
    trajectories_pb2_grpc.add_TrajectoriesServicer_to_server(
        TrajectoriesServicer(settings, auth, TrajectoryStore(routed), quotas, cpu, tokens), server
    )
    proxies_pb2_grpc.add_ProxiesServicer_to_server(ProxiesServicer(settings, auth, ProxyStore(routed), quotas, cpu, tokens), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    add_reflection(server)
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert_file or settings.tls_key_file:
        if not (settings.tls_cert_file and settings.tls_key_file):
            raise ValueError("TLS needs both MEMORY3_TLS_CERT_FILE and MEMORY3_TLS_KEY_FILE")
        credentials = grpc.ssl_server_credentials(
            [(Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes())]
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {settings.host}:{settings.port}")
    if replicas.enabled:
        await replicas.check()  # reads go to the replicas found usable from the first call on
    await server.start()
    BUILD_INFO.labels(_version(), platform.python_version(), grpc.__version__).set(1)
    metrics_http, metrics_port = None, None
    if settings.metrics_port is not None and settings.metrics_port >= 0:
        metrics_http, _ = start_http_server(settings.metrics_port, addr=settings.host)
        metrics_port = metrics_http.server_port
    background = asyncio.gather(
        refresh_bank_gauges(engine, settings.metrics_refresh_seconds, settings.metrics_bank_labels),
        purge_stale_staging(engine, settings.max_call_seconds + 60),
        watch_event_loop(),
        listener.run(),
        *((replicas.monitor(),) if replicas.enabled else ()),
    )
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("memory3 serving on %s:%d", settings.host, port)
    return RunningServer(
        server, port, health_servicer, engine, embedded, settings, metrics_http, metrics_port, background, cpu, guard,
        replicas, listener,
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("memory3")
    except PackageNotFoundError:
        return "unknown"


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def fixed_mmap_threshold(size: int = 128 * 1024) -> None:
    """Large buffers (memories, pages, weights) get their own mappings, returned to the system when
    freed. glibc otherwise raises its threshold after the first large free, and later large
    buffers stay in the heap: the server's RSS would keep the high-water mark of every call."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, size)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain and stop cleanly."""
    fixed_mmap_threshold()
    running = await start_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = f", metrics on :{running.metrics_port}/metrics" if running.metrics_port else ""
    print(f"memory3 listening on {settings.host}:{running.port}{metrics}", flush=True)
    await stop.wait()
    log.info("shutting down: draining in-flight calls")
    await running.stop()


class BackgroundServer:
    """A server on its own event-loop thread, for tests, benchmarks and notebooks: blocking and
    asyncio clients in the caller's thread can both talk to it."""

    def __init__(self, settings: Settings, embedder: BuiltinEmbedder | None = None) -> None:
        self.loop_thread = LoopThread("memory3-server")
        self.loop = self.loop_thread.loop
        self.running = self.call(start_server(settings, embedder))
        self.target = f"127.0.0.1:{self.running.port}"

    def call(self, coroutine, timeout: float = 300):
        return self.loop_thread.run(coroutine, timeout)

    def stop(self) -> None:
        """Drain and stop; calling it again does nothing."""
        if not self.loop_thread.is_alive():
            return
        self.call(self.running.stop())
        self.loop_thread.stop()
