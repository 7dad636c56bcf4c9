#!/usr/bin/env bash
# Regenerate the dspark.v1 Python code (dspark/v1/) from proto/dspark/v1/dspark.proto; the output is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. --pyi_out=. proto/dspark/v1/dspark.proto
