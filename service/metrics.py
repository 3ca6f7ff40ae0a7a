"""The service's Prometheus metrics, defined in one place (no imports from the service, so every
module can count without import cycles): RPC counts, latency and in-flight calls, admission
refusals, bank sizes, server-side cache lookups, event-loop lag."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RPC_TOTAL = Counter("memory3_rpc_total", "RPCs finished, by method and status code", ["method", "code"])
RPC_SECONDS = Histogram(
    "memory3_rpc_seconds", "RPC latency", ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RPC_IN_FLIGHT = Gauge("memory3_rpc_in_flight", "RPCs being served now")
RPC_REJECTED = Counter("memory3_rpc_rejected_total", "RPCs refused by admission control (server busy)")
BANK_REFERENCES = Gauge("memory3_bank_references", "References per bank (planner estimate)", ["tenant", "bank"])
BANK_BYTES = Gauge("memory3_bank_bytes", "Bytes on disk per bank, indexes included", ["tenant", "bank"])
CACHE_LOOKUPS = Counter("memory3_cache_lookups_total", "Server-side cache lookups", ["cache", "result"])
EVENT_LOOP_LAG = Histogram(
    "memory3_event_loop_lag_seconds", "How late the event loop woke for a timer (every 50 ms): long stalls delay every call",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
