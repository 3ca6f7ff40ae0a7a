"""The memory3 gRPC service: servicers, storage, auth, configuration."""
