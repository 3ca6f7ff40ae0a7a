"""The memory3 SDK, by what a user reaches for.

* :mod:`memory3.sdk.client` — talk to the service: banks, references, retrieval, trajectories,
  proxies (no torch).
* :mod:`memory3.sdk.model` — glue to a Hugging Face causal LM: fingerprint, RoPE, the attention
  hook, sampling helpers.
* :mod:`memory3.sdk.memory` — explicit memories: tensors, encoder, codec, PQ, writer, supply,
  injection (Memory³).
* :mod:`memory3.sdk.proxy` — the proxy policy: sampling, rewards, trajectory logging, updates,
  Parquet export (Proxy-RLHF).
* :mod:`memory3.sdk.generation` — where the two meet: one decoding loop with memories and a proxy.

Importing this package imports none of them; import the one you need.
"""
