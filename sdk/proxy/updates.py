"""Follow the proxy registry: pick up newly published proxy versions without a restart.

The offline trainer publishes new proxy versions while samplers keep running (the LLM never changes,
only the proxy). :class:`ProxyUpdater` is what a long-running sampler holds: :meth:`ProxyUpdater.refresh`
(on request, or every ``interval_seconds`` from a daemon thread) asks for the latest version without
weights and downloads only a newer one. Errors stay in :attr:`ProxyUpdater.last_error` and a proxy for
another model raises :class:`ProxyModelMismatch`; either way the current proxy stays. Swapping an
immutable :class:`CurrentProxy` means a generation finishes with the version it started with; a
rollback is a new publication of old weights.

Details: docs/design.md ("Publishing and following proxies").
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, replace

import grpc

from memory3.sdk.client.trajectories import ProxyInfo
from memory3.sdk.model.fingerprint import model_fingerprint
from memory3.sdk.proxy.policy import ProxyPolicy

log = logging.getLogger(__name__)


class ProxyModelMismatch(ValueError):
    """The registry's proxy was trained for another model than the one this updater serves."""


@dataclass(frozen=True)
class CurrentProxy:
    """The proxy in use: the policy (its ``version`` set to the registry's), and the registry's
    record of it (None for a local ``initial`` policy). Never modified; replaced whole."""

    policy: ProxyPolicy
    version: int
    info: ProxyInfo | None = None


class ProxyUpdater:
    """Holds the latest published version of proxy ``name`` for ``model``.

    ``client_or_target``: a blocking :class:`~memory3.sdk.client.client.Client` (shared, not closed
    here), or a target address, with ``api_key``, for a client this updater owns and closes.
    ``initial``: a local policy to use until the registry has one (e.g.
    ``ProxyPolicy.always_accept(model)``, version 0). ``fetch``: refresh once now (errors other
    than "no such proxy yet" are raised). ``interval_seconds``: poll in the background.
    """

    def __init__(self, client_or_target, api_key: str | None = None, *, name: str, model,
                 interval_seconds: float | None = None, initial: ProxyPolicy | None = None, fetch: bool = True,
                 timeout: float = 10.0) -> None:
        if isinstance(client_or_target, str):
            from memory3.sdk.client.client import Client

            if api_key is None:
                raise ValueError("a target address needs an api_key")
            self._client, self._owns_client = Client(client_or_target, api_key, timeout=timeout), True
        else:
            if asyncio.iscoroutinefunction(getattr(client_or_target, "get_proxy", None)):
                raise TypeError("ProxyUpdater polls from its own thread: pass a blocking Client or a target + api_key")
            self._client, self._owns_client = client_or_target, False
        self.name = name
        self.model = model
        self.interval_seconds = interval_seconds
        self.last_error: BaseException | None = None
        self.updates = 0  # versions taken from the registry
        self._cond = threading.Condition()
        self._refresh_lock = threading.Lock()  # one refresh at a time (thread and caller)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._current: CurrentProxy | None = None
        try:
            if initial is not None:
                self._check(initial, model_fingerprint(model), "the initial proxy")
                self._current = CurrentProxy(initial, initial.version)
            if fetch:
                self.refresh()
            if interval_seconds is not None:
                self.start(interval_seconds)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ what samplers read
    @property
    def current(self) -> CurrentProxy | None:
        """The proxy in use (None until the registry has one, if no ``initial`` was given)."""
        return self._current

    @property
    def policy(self) -> ProxyPolicy:
        current = self._current
        if current is None:
            raise LookupError(f"no version of proxy {self.name!r} is published yet, and no initial proxy was given")
        return current.policy

    @property
    def version(self) -> int | None:
        current = self._current
        return None if current is None else current.version

    def wait_for_version(self, version: int, timeout: float | None = None) -> bool:
        """Block until the proxy in use is ``version`` or newer (polling mode); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (self.version or 0) < version:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    # ------------------------------------------------------------------ on request
    def refresh(self) -> bool:
        """Take the registry's latest version if it is newer than the one in use; True if it switched.

        Raises :class:`ProxyModelMismatch` for another model's proxy and whatever the client
        raises (unreachable service, checksum mismatch); in every failure the current proxy stays.
        """
        with self._refresh_lock:
            fingerprint = model_fingerprint(self.model)
            try:
                latest = self._client.get_proxy(self.name, fingerprint, include_weights=False)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    return False  # nothing published yet: keep what we have
                if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    raise ProxyModelMismatch(
                        f"refused proxy {self.name!r}: {err.details()}; keeping version {self.version}"
                    ) from err
                raise
            current = self._current
            if current is not None and latest.version <= current.version:
                return False
            full = self._client.get_proxy(self.name, fingerprint, version=latest.version)
            if full.model_fingerprint != fingerprint:
                raise ProxyModelMismatch(
                    f"refused proxy {self.name!r} version {full.version}: registered for model "
                    f"{full.model_fingerprint!r}, not {fingerprint!r}; keeping version {self.version}"
                )
            policy = ProxyPolicy.from_bytes(full.weights)
            self._check(policy, fingerprint, f"proxy {self.name!r} version {full.version}")
            policy.version = full.version  # what its decisions are logged under
            policy.to(device=next(self.model.parameters()).device)
            with self._cond:
                self._current = CurrentProxy(policy, full.version, replace(full, weights=None))
                self.updates += 1
                self._cond.notify_all()
            log.info("proxy %r: now version %d", self.name, full.version)
            return True

    def _check(self, policy: ProxyPolicy, fingerprint: str, what: str) -> None:
        """The policy's own config must name this model (the registry's record could be wrong)."""
        config = policy.config
        if config.model_fingerprint and config.model_fingerprint != fingerprint:
            raise ProxyModelMismatch(
                f"refused {what}: its weights were trained for model {config.model_fingerprint!r}, "
                f"not {fingerprint!r}; keeping version {self.version}"
            )
        want = (self.model.config.hidden_size, self.model.get_input_embeddings().embedding_dim)
        if (config.hidden_size, config.embed_size) != want:
            raise ProxyModelMismatch(
                f"refused {what}: it reads hidden/embedding sizes {(config.hidden_size, config.embed_size)}, "
                f"this model has {want}; keeping version {self.version}"
            )

    # ------------------------------------------------------------------ on an interval
    def start(self, interval_seconds: float) -> None:
        """Poll every ``interval_seconds`` on a daemon thread (until :meth:`stop` or :meth:`close`)."""
        if interval_seconds <= 0:
            raise ValueError("interval_seconds must be > 0")
        if self._thread is not None:
            raise RuntimeError("the updater is already polling")
        self.interval_seconds = interval_seconds
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, args=(interval_seconds,),
                                        name=f"memory3-proxy-updates-{self.name}", daemon=True)
        self._thread.start()

    def _poll(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.refresh()
                self.last_error = None
            except Exception as err:  # noqa: BLE001 - the sampler must keep running on the proxy it has
                if repr(err) != repr(self.last_error):  # say it once, not every interval
                    log.warning("proxy %r: update failed, keeping version %s: %s", self.name, self.version, err)
                self.last_error = err

    def stop(self) -> None:
        """Stop polling (the current proxy stays usable)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()

    def close(self) -> None:
        self.stop()
        if self._owns_client:
            self._client.close()
            self._owns_client = False

    def __enter__(self) -> "ProxyUpdater":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
