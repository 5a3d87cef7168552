#!/usr/bin/env bash
# The full-length gateway fuzz of issue 18: a tiny checkpoint (built by tests/checkpoints.py) served by
# `tureen serve`, a `tureen gateway` with Redis and a master key in front of it, and
# `tureen bench fuzz` against the gateway with the engine's /metrics for the health check.
#
#   bash scripts/fuzz_gateway.sh [CASES] [OUT_DIR]      (defaults: 5000, ./fuzz-gateway)
#
# Needs redis-server on PATH and the project installed (`pip install -e ".[test]"`). Everything listens on
# 127.0.0.1 and stops when the script exits.
set -euo pipefail
CASES=${1:-5000}
OUT=$(realpath -m "${2:-fuzz-gateway}")
REDIS_PORT=${REDIS_PORT:-16391} SERVE_PORT=${SERVE_PORT:-18441} GW_PORT=${GW_PORT:-14041}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_for() {  # URL: poll until it answers 200
    for _ in $(seq 1 600); do curl -fs -o /dev/null "$1" && return 0; sleep 0.2; done
    echo "no answer from $1" >&2; return 1
}

[ -d "$OUT/tiny" ] || python -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; \
from checkpoints import build_checkpoint; build_checkpoint('llama', Path(sys.argv[1]))" "$OUT/tiny"

redis-server --port "$REDIS_PORT" --save '' --appendonly no >"$OUT/redis.log" 2>&1 & pids+=($!)
REPLICA_KEY="sk-replica-$(python -c 'import secrets; print(secrets.token_hex(8))')"
MASTER_KEY="sk-admin-$(python -c 'import secrets; print(secrets.token_hex(8))')"
export REPLICA_KEY MASTER_KEY
tureen serve "$OUT/tiny" --served-model-name tiny --port "$SERVE_PORT" --api-key "$REPLICA_KEY" \
    --http-read-timeout 5 >"$OUT/serve.log" 2>&1 & pids+=($!)

cat >"$OUT/gateway.yaml" <<YAML
model_list:
  - model_name: tiny
    litellm_params: {model: hosted_vllm/tiny, api_base: "http://127.0.0.1:$SERVE_PORT/v1",
                     api_key: os.environ/REPLICA_KEY}
    tureen_params: {tokenizer: "$OUT/tiny"}
router_settings: {redis_url: "redis://127.0.0.1:$REDIS_PORT/0"}
general_settings: {master_key: os.environ/MASTER_KEY}
YAML
wait_for "http://127.0.0.1:$SERVE_PORT/health"
tureen gateway --config "$OUT/gateway.yaml" --port "$GW_PORT" >"$OUT/gateway.log" 2>&1 & pids+=($!)
wait_for "http://127.0.0.1:$GW_PORT/health"

tureen bench fuzz --base-url "http://127.0.0.1:$GW_PORT" --api-key "$MASTER_KEY" \
    --metrics-url "http://127.0.0.1:$SERVE_PORT" --cases "$CASES" --max-tokens 4 \
    --save-result "$OUT/fuzz-gateway.json"
