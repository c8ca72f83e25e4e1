#!/usr/bin/env bash
# Offline demo: builds Runestone, starts runestone-mock (the provider) on
# 127.0.0.1:9000 and the gateway with conf/demo.yaml on 127.0.0.1:8080, then
# shows a chat completion (with the tenant's x-ratelimit-* headers), a stream,
# a refused key, a refused model, the tenant's usage and the metrics with curl.
# DEMO_KEEP=1 leaves both running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --workspace --bins

for port in 8080 9000 9464; do
  if (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "demo: port $port is in use; stop what uses it first" >&2
    exit 1
  fi
done

run_dir=$(mktemp -d)
cleanup() {
  kill "${gw_pid:-}" "${mock_pid:-}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$run_dir"
}
trap cleanup EXIT

target/release/runestone-mock --listen 127.0.0.1:9000 --tokens-per-second 20 >"$run_dir/mock.log" 2>&1 &
mock_pid=$!
target/release/runestone --config conf/demo.yaml >"$run_dir/gateway.log" 2>&1 &
gw_pid=$!

wait_for() {
  for _ in $(seq 1 200); do
    curl -fsS "$1" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "demo: $1 did not come up" >&2
  cat "$run_dir"/*.log >&2
  exit 1
}
wait_for http://127.0.0.1:9000/health
wait_for http://127.0.0.1:8080/ready

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
KEY="sk-demo-tenant-key"

say "chat completion (tenant 'demo', model gpt-4o-mini -> mock-small at the provider)"
curl -sS -i http://127.0.0.1:8080/v1/chat/completions \
  -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
  -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello, Runestone"}]}'
echo

say "streaming: chunks arrive as the provider generates them (20 tokens/s)"
curl -sS -N http://127.0.0.1:8080/v1/chat/completions \
  -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
  -d '{"model":"gpt-4o-mini","stream":true,"max_tokens":8,"messages":[{"role":"user","content":"Count"}]}'

say "a refused key: 401 in OpenAI's error shape"
curl -sS -i http://127.0.0.1:8080/v1/chat/completions \
  -H "Authorization: Bearer sk-not-a-tenant" -H "Content-Type: application/json" \
  -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
echo

say "a model outside the tenant's allow-list: 403"
curl -sS http://127.0.0.1:8080/v1/chat/completions \
  -H "Authorization: Bearer sk-restricted-key" -H "Content-Type: application/json" \
  -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
echo

say "the tenant's usage and budget this period"
curl -sS http://127.0.0.1:8080/v1/usage -H "Authorization: Bearer $KEY"
echo

say "metrics on 127.0.0.1:9464/metrics"
curl -sS http://127.0.0.1:9464/metrics | grep -E '^runestone_(requests_total|errors_total|tokens_total|cost_usd_total)'

if [ "${DEMO_KEEP:-0}" = 1 ]; then
  say "gateway on http://127.0.0.1:8080/v1 (key $KEY); Ctrl-C to stop"
  wait "$gw_pid"
fi
