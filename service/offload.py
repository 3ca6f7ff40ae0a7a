"""CPU work of a request (codec checks, hashing, header parsing, overlap filtering, page building)
runs here, on a small bounded thread pool, never on the event loop: the loop keeps answering
every other call — health included — while one request does heavy work. The number of threads
is the setting ``cpu_workers``; how much work waits for them is bounded by the admission caps."""

from __future__ import annotations

import asyncio
import functools
import sys
from concurrent.futures import ThreadPoolExecutor


GIL_SWITCH_SECONDS = 0.0005


class CpuPool:
    def __init__(self, workers: int) -> None:
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="memory3-cpu")
        # A worker running pure-Python code hands the GIL back only every switch interval (5 ms by
        # default), and the event loop needs it several times per call: shorter turns keep other
        # calls' latency near its unloaded value while a worker is busy.
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_SECONDS))

    async def run(self, function, *args, **kwargs):
        """``function(*args, **kwargs)`` on a pool thread; the caller's task awaits it."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(function, *args, **kwargs))

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
