#!/usr/bin/env bash
# Regenerate the committed Python stubs from proto/memory3/v1/*.proto.
# Pinned: grpcio-tools==1.85.1 (the dev extra). tests/test_operations.py fails when stubs drift.
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python}" - <<'PY'
import importlib.metadata as md, sys
want = "1.85.1"
have = md.version("grpcio-tools")
if have != want:
    sys.exit(f"grpcio-tools {have} installed; the stubs are pinned to {want}: pip install grpcio-tools=={want}")
PY
out="${1:-proto}"
"${PYTHON:-python}" -m grpc_tools.protoc -I proto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" proto/memory3/v1/*.proto
