"""Metrics, request ids, structured logs and admission control, for every RPC in one place.

* Prometheus: ``grpc_server_started_total``, ``grpc_server_handled_total{grpc_code}`` and the
  ``grpc_server_handling_seconds`` histogram by grpc_type/grpc_service/grpc_method (the gRPC
  convention), ``memory3_rpc_in_flight``, ``memory3_rpc_rejected_total``, storage totals (per bank
  only when opted in), cache hits, event-loop lag, build info.
* Each call gets a request id (the client's ``x-request-id`` metadata, else a new one), sent back
  in trailing metadata and stamped on every log line written while the call runs.
* Every call passes the call guard (``guard.py``: authentication before any resource, admission,
  deadlines, revocation); its refusals get ``grpc-retry-pushback-ms`` advice when retrying helps.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
import json
import logging
import time
import uuid

import grpc
from sqlalchemy import text

from .auth import caller_var
from .metrics import (
    BANK_BYTES,
    BANK_REFERENCES,
    BANKS,
    EVENT_LOOP_LAG,
    RPC_HANDLED,
    RPC_IN_FLIGHT,
    RPC_REJECTED,
    RPC_SECONDS,
    RPC_STARTED,
    STORED_BYTES,
    STORED_REFERENCES,
)
from .errors import InvalidArgument, ResourceExhausted, ServiceError, status_for
from .guard import PUSHBACK_MS, CallGuard

REQUEST_ID = re.compile(r"[A-Za-z0-9._:/-]{1,128}")  # a client's x-request-id, kept only if it matches
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

EXEMPT = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
            "request_id": getattr(record, "request_id", "-"), "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


log = logging.getLogger("memory3.rpc")


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Request ids, metrics and the access log around every call, with the call guard inside them."""

    def __init__(self, guard: CallGuard) -> None:
        self.guard = guard
        self._series: dict[tuple[str, str], _Series] = {}

    def series(self, call: tuple[str, str]) -> "_Series":
        """The metric series of one method (labels resolved once, not on every call)."""
        found = self._series.get(call)
        if found is None:
            found = self._series[call] = _Series(*call)
        return found

    @property
    def in_flight(self) -> int:
        return self.guard.in_flight

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(EXEMPT):
            return handler
        method = details.method
        metadata = tuple(details.invocation_metadata or ())
        # Requests arrive as bytes and are parsed here, so a malformed message (e.g. invalid
        # UTF-8 in a string field) is INVALID_ARGUMENT rather than gRPC's generic INTERNAL.
        parse = _parser(handler.request_deserializer, handler.request_streaming, self.guard)
        if handler.unary_unary or handler.stream_unary:
            behaviour = handler.unary_unary or handler.stream_unary
            kind = "unary" if handler.unary_unary else "client_stream"
            wrapped = self._unary(behaviour, (method, kind), metadata, parse)
            factory = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        else:
            behaviour = handler.unary_stream or handler.stream_stream
            kind = "server_stream" if handler.unary_stream else "bidi_stream"
            wrapped = self._stream(behaviour, (method, kind), metadata, parse)
            factory = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        return factory(wrapped, request_deserializer=None, response_serializer=handler.response_serializer)

    def _finish(self, call: tuple[str, str], context, started: float, cancelled: bool) -> None:
        method, _ = call
        code = "CANCELLED" if cancelled else (context.code() or grpc.StatusCode.OK)
        code_name = code if isinstance(code, str) else code.name
        elapsed = time.perf_counter() - started
        series = self.series(call)
        series.handled(code_name).inc()
        series.seconds.observe(elapsed)
        if log.isEnabledFor(logging.INFO):
            log.info("%s %s %.1f ms", method, code_name, elapsed * 1000,
                     extra={"fields": {"method": method, "code": code_name, "ms": round(elapsed * 1000, 2)}})

    @contextlib.asynccontextmanager
    async def _tracked(self, call: tuple[str, str], metadata, context):
        """Request id, caller, admission, deadline, metrics and the access log around one call."""
        method, _ = call
        self.series(call).started.inc()
        request_id = dict(metadata).get("x-request-id") or ""
        if not REQUEST_ID.fullmatch(request_id):  # absent, too long or odd characters: ours instead
            request_id = uuid.uuid4().hex[:16]
        token = request_id_var.set(request_id)
        context.set_trailing_metadata((("x-request-id", request_id),))
        started, cancelled = time.perf_counter(), False
        caller_token = None
        try:
            try:
                caller = await self.guard.identify(method, metadata, context.peer())
                caller_token = caller_var.set(caller)
                async with self.guard.admitted(caller):
                    RPC_IN_FLIGHT.inc()
                    try:
                        async with asyncio.timeout(self.guard.settings.max_call_seconds):
                            yield caller
                    finally:
                        RPC_IN_FLIGHT.dec()
            except TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the call ran longer than the server's "
                                    f"max_call_seconds ({self.guard.settings.max_call_seconds:g} s)")
            except ServiceError as err:
                if isinstance(err, ResourceExhausted):
                    RPC_REJECTED.inc()
                    context.set_trailing_metadata(
                        (("grpc-retry-pushback-ms", PUSHBACK_MS), ("x-request-id", request_id))
                    )
                await context.abort(err.code, err.message)
            except (grpc.aio.AbortError, grpc.aio.UsageError):
                raise
            except Exception as err:  # e.g. the database lost while the key is looked up: UNAVAILABLE, retried
                code, message = status_for(err)
                await context.abort(code, message)
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            self._finish(call, context, started, cancelled)
            if caller_token is not None:
                caller_var.reset(caller_token)
            request_id_var.reset(token)

    def _unary(self, behaviour, call, metadata, parse):
        async def wrapper(request, context):
            async with self._tracked(call, metadata, context) as caller:
                return await behaviour(await parse(request, context, caller), context)

        return wrapper

    def _stream(self, behaviour, call, metadata, parse):
        async def wrapper(request, context):
            async with self._tracked(call, metadata, context) as caller:
                responses = behaviour(await parse(request, context, caller), context)
                await self.guard.respond(context, responses, caller)

        return wrapper


class _Series:
    """One method's children of the RPC metrics (``labels()`` takes a lock and hashes its labels:
    done once per method and status code instead of three times per call)."""

    def __init__(self, method: str, kind: str) -> None:
        service, _, name = method.strip("/").partition("/")
        self.labels = (kind, service, name)
        self.started = RPC_STARTED.labels(*self.labels)
        self.seconds = RPC_SECONDS.labels(*self.labels)
        self._handled: dict[str, object] = {}

    def handled(self, code_name: str):
        child = self._handled.get(code_name)
        if child is None:
            child = self._handled[code_name] = RPC_HANDLED.labels(*self.labels, code_name)
        return child


def _parser(deserialize, streaming: bool, guard: CallGuard):
    """Parse a unary request (aborting with INVALID_ARGUMENT) or wrap a request stream (guarded:
    idle deadline, key re-check) whose malformed messages raise InvalidArgument inside the servicer."""
    if streaming:

        async def parse_stream(raw_iterator, context, caller):
            async def messages():
                async for raw in guard.requests(raw_iterator, caller):
                    try:
                        yield deserialize(raw)
                    except Exception as err:
                        raise InvalidArgument(f"malformed request message: {err}") from None

            return messages()

        return parse_stream

    async def parse_one(raw, context, caller):
        try:
            return deserialize(raw)
        except Exception as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {err}")

    return parse_one


async def watch_event_loop(interval: float = 0.05) -> None:
    """Forever: how late the loop wakes for a timer, into EVENT_LOOP_LAG (work on the loop shows here)."""
    while True:
        started = time.perf_counter()
        await asyncio.sleep(interval)
        EVENT_LOOP_LAG.observe(max(0.0, time.perf_counter() - started - interval))


async def refresh_bank_gauges(engine, interval: float, per_bank: bool = False) -> None:
    """Every ``interval`` seconds, bank sizes from the catalog (cheap: no table scans): totals, and
    per bank (tenant and bank names as labels) only when ``per_bank``."""
    query = text(
        "SELECT t.name AS tenant, b.name AS bank, greatest(c.reltuples, 0) AS rows,"
        " pg_total_relation_size(c.oid) AS bytes FROM banks b JOIN tenants t ON t.id = b.tenant_id"
        " JOIN pg_class c ON c.relname = 'memory_references_b' || b.id"
    )
    while True:
        try:
            async with engine.connect() as conn:
                rows = (await conn.execute(query)).all()
            BANKS.set(len(rows))
            STORED_REFERENCES.set(sum(row.rows for row in rows))
            STORED_BYTES.set(sum(row.bytes for row in rows))
            if per_bank:
                BANK_REFERENCES.clear()
                BANK_BYTES.clear()
                for row in rows:
                    BANK_REFERENCES.labels(row.tenant, row.bank).set(row.rows)
                    BANK_BYTES.labels(row.tenant, row.bank).set(row.bytes)
        except Exception as err:  # metrics must never take the server down
            logging.getLogger(__name__).warning("bank gauges not refreshed: %s", err)
        await asyncio.sleep(interval)
