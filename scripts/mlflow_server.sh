#!/usr/bin/env bash
# Start a local MLflow tracking server that rl_pbt runs can share:
#   scripts/mlflow_server.sh [PORT] [STORE_DIR]
#   python -m rl_pbt tracking.tracking_uri=http://127.0.0.1:PORT
# It listens on 127.0.0.1 only; the store (SQLite + artifacts) lives in STORE_DIR.
set -euo pipefail
port="${1:-5000}"
store="$(realpath -m "${2:-mlflow_server}")"
mkdir -p "$store/artifacts"
exec mlflow server \
  --backend-store-uri "sqlite:///$store/mlflow.db" \
  --default-artifact-root "$store/artifacts" \
  --host 127.0.0.1 --port "$port"
