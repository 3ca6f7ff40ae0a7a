"""CPU work of a request (codec checks, hashing, header parsing, overlap filtering, page building)
runs here, on a small bounded thread pool, never on the event loop: the loop keeps answering
every other call — health included — while one request does heavy work. The number of threads
is the setting ``cpu_workers``; how much work waits for them is bounded by the admission caps."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor


class CpuPool:
    def __init__(self, workers: int) -> None:
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="memory3-cpu")

    async def run(self, function, *args, **kwargs):
        """``function(*args, **kwargs)`` on a pool thread; the caller's task awaits it."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(function, *args, **kwargs))

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
