#!/usr/bin/env bash
# DSpark, then (when VLLM_PYTHON is set) vLLM, serving the same model one after the other under the same greedy
# streaming chat load (load_tests/openai_side_by_side.py); writes OUT_DIR/side_by_side.{json,png}.
#
#   load_tests/run_side_by_side.sh [OUT_DIR]          # default OUT_DIR: benchmarks/results/serving/side_by_side
#   VLLM_PYTHON=/work/vllm-venv/bin/python load_tests/run_side_by_side.sh
#
# Environment (all optional):
#   VLLM_PYTHON        python of a vLLM install; unset: DSpark alone (the report then has no ratios)
#   MODEL_DIR          the folder vLLM serves; default: the default model's folder, what `dspark serve` serves
#   CONCURRENCY="1 8 32"  MAX_TOKENS=128  NUM_PROMPTS=36  WARMUP=1
#   DSPARK_PORT=8000  DSPARK_GRPC_PORT=9000  VLLM_PORT=8001
#   READY_TIMEOUT_S=300 (vLLM on a CPU takes ~100 s to start)  STOP_TIMEOUT_S=90 (dspark drains ~30 s)
#   DSPARK_SERVE_ARGS  extra `dspark serve` flags; default --max-batch-size <largest concurrency>, so that no
#                      request queues for a KV slot (vLLM batches up to 256 sequences by default)
#   VLLM_ARGS          extra flags of vLLM's OpenAI server
#   DSPARK_API_KEY     sent to both servers, as the harness does (`dspark serve` requires it when set)
# Server logs: OUT_DIR/{dspark,vllm}_server.log; each server's runs alone: OUT_DIR/{dspark,vllm}_run.json.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=.venv/bin/python
HARNESS=("$PY" -m load_tests.openai_side_by_side)
OUT=${1:-benchmarks/results/serving/side_by_side}
read -r -a CONC <<<"${CONCURRENCY:-1 8 32}"
MAX_TOKENS=${MAX_TOKENS:-128}
NUM_PROMPTS=${NUM_PROMPTS:-36}
WARMUP=${WARMUP:-1}
DSPARK_PORT=${DSPARK_PORT:-8000}
DSPARK_GRPC_PORT=${DSPARK_GRPC_PORT:-9000}
VLLM_PORT=${VLLM_PORT:-8001}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-300}
STOP_TIMEOUT_S=${STOP_TIMEOUT_S:-90}
MAX_C=$(printf '%s\n' "${CONC[@]}" | sort -n | tail -n 1)
read -r -a DSPARK_ARGS <<<"${DSPARK_SERVE_ARGS:---max-batch-size $MAX_C}"
read -r -a VLLM_EXTRA <<<"${VLLM_ARGS:-}"

die() {
  echo "run_side_by_side: $*" >&2
  exit 1
}

# ---- checks before anything starts: a vLLM problem must not surface only after the DSpark run -------------
if [[ -n "${VLLM_PYTHON:-}" ]]; then
  [[ -x "$VLLM_PYTHON" ]] || die "VLLM_PYTHON=$VLLM_PYTHON is not an executable"
  if [[ -z "${MODEL_DIR:-}" ]]; then
    MODEL_DIR=$("$PY" -c "from dspark.models.loader import resolve_model_dir; print(resolve_model_dir('default'))")
  fi
  [[ -f "$MODEL_DIR/config.json" ]] || die "MODEL_DIR=$MODEL_DIR has no config.json"
  # vLLM picks its model class from config.json's `architectures`; without it, it fails after a long start.
  "$PY" - "$MODEL_DIR/config.json" <<'EOF' ||
import json, sys
sys.exit(0 if json.load(open(sys.argv[1])).get("architectures") else 1)
EOF
    die "refusing to start vLLM: $MODEL_DIR/config.json has no \"architectures\" entry, so vLLM cannot pick a
model class. Add one to a copy of the folder (SmolLM2 is a Llama: \"architectures\": [\"LlamaForCausalLM\"])
and pass that copy as MODEL_DIR."
fi
mkdir -p "$OUT"

# ---- starting, waiting for and stopping one server at a time ----------------------------------------------
SERVER_PID=""
SITE_DIR=""

stop_server() {
  [[ -n "$SERVER_PID" ]] || return 0
  local pid=$SERVER_PID i
  SERVER_PID=""
  kill -TERM "$pid" 2>/dev/null || true # dspark serve drains in-flight requests; vLLM stops its engine
  for ((i = 0; i < STOP_TIMEOUT_S; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "pid $pid still running after ${STOP_TIMEOUT_S}s: SIGKILL" >&2
  fi
  # Its process group (setsid below): leftover workers (Ray's, vLLM's engine core) must not keep the cores
  # busy while the next server is measured.
  kill -KILL -- "-$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  stop_server
  [[ -z "$SITE_DIR" ]] || rm -rf "$SITE_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM # runs the EXIT trap: no server outlives the script

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_server() { # NAME PORT LOG COMMAND...
  local name=$1 port=$2 log=$3
  shift 3
  # Something already listening would be measured instead of the server started here.
  ! port_in_use "$port" || die "port $port is in use: stop what listens there, or set ${name^^}_PORT"
  setsid "$@" >"$log" 2>&1 & # its own process group, so that stop_server can end its children too
  SERVER_PID=$!
  echo "started $name (pid $SERVER_PID, log $log); waiting up to ${READY_TIMEOUT_S}s for it to answer"
  if ! "${HARNESS[@]}" wait "http://127.0.0.1:$port" --timeout-s "$READY_TIMEOUT_S" --pid "$SERVER_PID"; then
    tail -n 30 "$log" >&2 || true
    die "$name did not answer on port $port (log: $log)"
  fi
}

measure() { # NAME PORT
  "${HARNESS[@]}" --endpoint "$1=http://127.0.0.1:$2" --concurrency "${CONC[@]}" --max-tokens "$MAX_TOKENS" \
    --num-prompts "$NUM_PROMPTS" --warmup "$WARMUP" --output-run "$OUT/$1_run.json"
}

# ---- DSpark ----------------------------------------------------------------------------------------------
start_server dspark "$DSPARK_PORT" "$OUT/dspark_server.log" .venv/bin/dspark serve --http-port "$DSPARK_PORT" \
  --grpc-port "$DSPARK_GRPC_PORT" "${DSPARK_ARGS[@]}"
measure dspark "$DSPARK_PORT"
stop_server
RUNS=("$OUT/dspark_run.json")

# ---- vLLM ------------------------------------------------------------------------------------------------
if [[ -n "${VLLM_PYTHON:-}" ]]; then
  # This machine's vLLM imports torchvision/torchaudio/torchcodec builds that do not load; a text model needs
  # none of them, and a None in sys.modules makes `import name` fail cleanly (vLLM then skips them).
  SITE_DIR=$(mktemp -d)
  cat >"$SITE_DIR/sitecustomize.py" <<'EOF'
import sys

for name in ("torchvision", "torchaudio", "torchcodec"):
    sys.modules[name] = None
EOF
  start_server vllm "$VLLM_PORT" "$OUT/vllm_server.log" env PYTHONPATH="$SITE_DIR${PYTHONPATH:+:$PYTHONPATH}" \
    "$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" --dtype float32 \
    --host 127.0.0.1 --port "$VLLM_PORT" "${VLLM_EXTRA[@]}"
  measure vllm "$VLLM_PORT"
  stop_server
  RUNS+=("$OUT/vllm_run.json")
fi

# ---- one report ------------------------------------------------------------------------------------------
"${HARNESS[@]}" combine "${RUNS[@]}" --output "$OUT/side_by_side.json" --png "$OUT/side_by_side.png"
