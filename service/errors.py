"""Errors with a gRPC status: raised anywhere in the service, turned into status + message once,
by :func:`rpc` around every servicer method."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging

import grpc
import psycopg
import sqlalchemy.exc

log = logging.getLogger(__name__)


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status a failed call answers with. A lost database is UNAVAILABLE (clients retry);
    anything unexpected is INTERNAL, logged here, with no internals in the message."""
    if isinstance(error, ServiceError):
        return error.code, error.message
    if isinstance(error, sqlalchemy.exc.DataError):  # the database refused a value we passed on
        return grpc.StatusCode.INVALID_ARGUMENT, f"invalid value: {str(error.orig).splitlines()[0]}"
    if isinstance(error, sqlalchemy.exc.TimeoutError):
        return grpc.StatusCode.UNAVAILABLE, "database connection pool exhausted; retry"
    if isinstance(error, (sqlalchemy.exc.OperationalError, psycopg.OperationalError, ConnectionError)) or (
        isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated
    ):
        log.warning("database unavailable: %s", error)
        return grpc.StatusCode.UNAVAILABLE, "database unavailable; retry"
    log.error("unexpected error", exc_info=error)
    return grpc.StatusCode.INTERNAL, "internal error"


def rpc(method):
    """Turn any exception of a servicer method into a status with a message (see status_for)."""

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except (grpc.aio.AbortError, grpc.aio.UsageError, asyncio.CancelledError):
                raise
            except Exception as error:
                await context.abort(*status_for(error))

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as error:
            if hasattr(request, "__aiter__") and not isinstance(error, (DeadlineExceeded, Unauthenticated)):
                await drain(request)
            await context.abort(*status_for(error))

    return unary_wrapper


DRAIN_BUDGET_BYTES = 16 * 1024 * 1024
DRAIN_SECONDS = 0.5


async def drain(request_iterator, budget: int = DRAIN_BUDGET_BYTES, seconds: float = DRAIN_SECONDS) -> None:
    """Read what a client already sent (bounded in bytes and time, never waiting longer on the
    client) before refusing its stream: a gRPC client whose send fails on a call the server
    closed may report INTERNAL instead of the server's status."""
    try:
        async with asyncio.timeout(seconds):
            async for message in request_iterator:
                budget -= message.ByteSize()
                if budget < 0:
                    return
    except (Exception, TimeoutError):
        return
