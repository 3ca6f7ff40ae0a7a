"""The floor under any Python gRPC service: a bare server that answers Retrieve's shape with no work.

A service ratio such as "Retrieve p50 / the same SQL through psycopg" cannot drop below
(SQL + transport) / SQL, whatever the service does. This module measures the transport part on the
same machine, in the same run: a ``grpc.aio`` server in its own process (like ``memory3 serve``)
whose one server-streaming method answers every request with a prebuilt ``ReferenceFrames``
message of a given size — no database, no authentication, no logic. A caller times it beside the
real service; the difference is what memory3's own code costs, and the floor itself shows how
close to a target any Python gRPC server could get here.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket

import grpc

from memory3.v1 import memories_pb2

METHOD = "/memory3.floor.Floor/Answer"


def _serve(port: int, answer_bytes: int, frames: int) -> None:
    answer = memories_pb2.ReferenceFrames(frames=[
        memories_pb2.ReferenceFrame(memory_chunk=bytes(answer_bytes // frames)) for _ in range(frames)])

    async def answer_one(request, context):
        yield answer

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20)])
        handler = grpc.unary_stream_rpc_method_handler(
            answer_one, request_deserializer=memories_pb2.RetrieveRequest.FromString,
            response_serializer=memories_pb2.ReferenceFrames.SerializeToString)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "memory3.floor.Floor", {"Answer": handler})])
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


class FloorServer:
    """``with FloorServer(answer_bytes) as floor: floor.call(request)`` — a blocking call through a
    plain gRPC channel, as the blocking SDK makes one."""

    def __init__(self, answer_bytes: int, frames: int = 5) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        context = multiprocessing.get_context("spawn")  # no fork of a process that already runs gRPC
        self._process = context.Process(target=_serve, args=(self.port, answer_bytes, frames), daemon=True)

    def __enter__(self) -> FloorServer:
        self._process.start()
        self._channel = grpc.insecure_channel(f"127.0.0.1:{self.port}",
                                              options=[("grpc.max_receive_message_length", 64 << 20)])
        grpc.channel_ready_future(self._channel).result(timeout=60)
        self._answer = self._channel.unary_stream(
            METHOD, request_serializer=memories_pb2.RetrieveRequest.SerializeToString,
            response_deserializer=memories_pb2.ReferenceFrames.FromString)
        return self

    def call(self, request: memories_pb2.RetrieveRequest) -> int:
        """One call; the bytes received (so the answer is really read)."""
        return sum(len(f.memory_chunk) for message in self._answer(request, timeout=30) for f in message.frames)

    def __exit__(self, *exc) -> None:
        self._channel.close()
        self._process.terminate()
        self._process.join(timeout=10)
