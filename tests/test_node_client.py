"""A second-language client in the suite (issue 19): tests/node/smoke.mjs talks to a real server
from Node.js with only the .proto files and the standard gRPC libraries (installed by `make
install` from tests/node/package-lock.json): tenant, key and bank; a memory built from
docs/memory-blob.md written, retrieved, fetched and checked byte for byte and by CRC; a trajectory
logged and read; health; reflection v1."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from conftest import ADMIN_KEY

NODE_DIR = Path(__file__).resolve().parent / "node"


def test_a_node_client_built_from_the_protos_runs_the_scenario(server):
    node = shutil.which("node")
    assert node, "Node.js is part of the test set-up (README): install node 20+"
    assert (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").exists(), (
        "run `npm ci --prefix tests/node` (make test does)")
    result = subprocess.run([node, str(NODE_DIR / "smoke.mjs")], env={"TARGET": server.target, "ADMIN_KEY": ADMIN_KEY,
                            "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["ok"] and outcome["services"] >= 5, outcome
