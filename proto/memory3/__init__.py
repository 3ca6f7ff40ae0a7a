"""memory3: a database for explicit LLM memory and proxy-policy trajectories.

The import root. Sub-packages: ``memory3.v1`` (generated wire stubs), ``memory3.service``
(gRPC server), ``memory3.sdk`` (client, codec, encoder, injection, proxy), ``memory3.trainer``.
"""

__version__ = "0.1.0"
