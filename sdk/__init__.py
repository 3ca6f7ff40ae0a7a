"""What clients import: client, codec, encoder, memory injection, proxy, trajectory logger."""
