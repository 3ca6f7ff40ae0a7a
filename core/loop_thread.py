"""An asyncio event loop in a daemon thread, for callers that are not async themselves.

The blocking client, the memory supply and the in-process test server each run their asyncio
work on one of these; a waiting caller always passes a deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

LIVENESS_SECONDS = 0.5


class LoopThread:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine, timeout: float | None = None):
        """Run ``coroutine`` on the loop and wait for its result (at most ``timeout`` seconds).

        The wait checks every half second that the loop's thread still runs — an exception that
        stops a loop (SystemExit raised inside a coroutine) would otherwise leave the caller
        waiting forever — and lets Ctrl-C through to the caller."""
        future = self.submit(coroutine)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = LIVENESS_SECONDS if deadline is None else min(LIVENESS_SECONDS, deadline - time.monotonic())
            try:
                return future.result(max(remaining, 0))
            except concurrent.futures.TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    future.cancel()
                    raise TimeoutError(f"no result within {timeout:g} s") from None
                if not self.thread.is_alive():
                    raise RuntimeError("the event loop's thread stopped before the call finished") from None

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = 5) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)
