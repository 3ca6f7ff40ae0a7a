"""An asyncio event loop in a daemon thread, for callers that are not async themselves.

The blocking client, the memory supply and the in-process test server each run their asyncio
work on one of these; a waiting caller always passes a deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading


class LoopThread:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine, timeout: float | None = None):
        """Run ``coroutine`` on the loop and wait for its result (at most ``timeout`` seconds)."""
        return self.submit(coroutine).result(timeout)

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = 5) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)
