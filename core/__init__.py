"""The shared core: what the service and the SDK both need, with no torch and no gRPC service code.

Memory spec, the memory blob format (header, CRC, validation, scheme table), the PQ codebook
format, bank definitions and their wire form, episodes and the decision columns, n-gram overlap,
size batching, the built-in MiniLM embedder (loaded lazily), an event-loop thread. Everything
above imports this; this imports only the generated message stubs (``memory3.v1``).
"""
