"""The service's Prometheus metrics, defined in one place (no imports from the service, so every
module can count without import cycles): RPC counts, latency and in-flight calls, admission
refusals, bank sizes, server-side cache lookups, event-loop lag."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# gRPC server metrics under the names and labels of the gRPC ecosystem's Prometheus convention
# (go-grpc-prometheus, py-grpc-prometheus), so existing dashboards and alerts apply as they are.
RPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server",
                      ["grpc_type", "grpc_service", "grpc_method"])
RPC_HANDLED = Counter("grpc_server_handled_total", "RPCs completed on the server, by status code",
                      ["grpc_type", "grpc_service", "grpc_method", "grpc_code"])
RPC_SECONDS = Histogram(
    "grpc_server_handling_seconds", "Time from an RPC's start to its status", ["grpc_type", "grpc_service", "grpc_method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RPC_IN_FLIGHT = Gauge("memory3_rpc_in_flight", "RPCs being served now")
RPC_REJECTED = Counter("memory3_rpc_rejected_total", "RPCs refused by admission control (server busy)")
BANKS = Gauge("memory3_banks", "Banks held, all tenants")
STORED_REFERENCES = Gauge("memory3_references", "References stored, all banks (planner estimate)")
STORED_BYTES = Gauge("memory3_bank_bytes_total", "Bytes on disk of all banks, indexes included")
# Per bank, only when the operator opts in (MEMORY3_METRICS_BANK_LABELS): tenant and bank names are
# data, and the metrics port answers without a key.
BANK_REFERENCES = Gauge("memory3_bank_references", "References per bank (planner estimate)", ["tenant", "bank"])
BANK_BYTES = Gauge("memory3_bank_bytes", "Bytes on disk per bank, indexes included", ["tenant", "bank"])
BUILD_INFO = Gauge("memory3_build_info", "The running build (value 1)", ["version", "python", "grpc"])
CACHE_LOOKUPS = Counter("memory3_cache_lookups_total", "Server-side cache lookups", ["cache", "result"])
EVENT_LOOP_LAG = Histogram(
    "memory3_event_loop_lag_seconds", "How late the event loop woke for a timer (every 50 ms): long stalls delay every call",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
# Read replicas (service/replicas.py): labelled by the replica's position in MEMORY3_REPLICA_URLS
# ("0", "1", ...), never by its URL (which may carry a password).
REPLICA_LAG_SECONDS = Gauge(
    "memory3_replica_lag_seconds",
    "How long ago the primary had written what the replica has not replayed yet (0: caught up)", ["replica"])
REPLICA_LAG_BYTES = Gauge("memory3_replica_lag_bytes", "WAL bytes the replica has not replayed yet", ["replica"])
REPLICA_UP = Gauge("memory3_replica_up", "1 while the replica takes reads; 0 while skipped (down, lagging, promoted)",
                   ["replica"])
READ_ROUTES = Counter("memory3_read_routes_total", "Where routed reads went: target replica|primary, and why",
                      ["target", "reason"])
# Cross-process cache invalidation (service/invalidation.py).
INVALIDATIONS = Counter("memory3_cache_invalidations_total", "Invalidation notices received, by kind", ["kind"])
LISTENER_UP = Gauge("memory3_invalidation_listener_up", "1 while this process listens for invalidation notices")
