"""`memory3 serve` as a child process: for crash tests (SIGKILL is a real crash), load tests
(the server's own memory is measurable) and scripts that need a throwaway server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    def __init__(self, database_url: str, data_dir: Path, admin_key: str, **settings: str) -> None:
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MEMORY3_")}
        self.env.update(
            DATABASE_URL=database_url, MEMORY3_PORT=str(self.port), MEMORY3_ADMIN_KEY=admin_key,
            MEMORY3_METRICS_PORT="-1", MEMORY3_DATA_DIR=str(data_dir),
        )
        self.env.update({f"MEMORY3_{k.upper()}": str(v) for k, v in settings.items()})
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 120) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "memory3.cli.main", "serve"], env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.time() + timeout
        output = []
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if "listening on" in line:
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep the pipe drained
                return
            output.append(line)
            if self.proc.poll() is not None:
                raise RuntimeError("memory3 serve exited: " + "".join(output[-20:]) + self.proc.stdout.read())
        raise TimeoutError("memory3 serve did not start")

    def peak_rss_bytes(self) -> int:
        """High-water mark of the server's resident memory (Linux)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc status")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
