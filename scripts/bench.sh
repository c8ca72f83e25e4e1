#!/usr/bin/env bash
# Load benchmark: the same small chat request through each path, measured in
# one run and printed side by side, then written to docs/BENCHMARKS.md.
#
#   scripts/bench.sh            # 10 s per path, 3 repetitions, median reported
#   DURATION=5 REPEAT=1 scripts/bench.sh
#
# Paths: direct to runestone-mock; through a bare Pingora proxy with no
# filters (benches/floor.rs, the floor); Runestone with no limits; with
# every feature on (limits, accounting, breakers, metrics, access log off)
# and in-process state; the same with Redis state. Then streams: time to
# first token and gateway RSS with 1,000 and 5,000 streams open (STREAM_COUNTS;
# each stream takes two of the gateway's descriptors, so the hard limit of
# open files, `ulimit -Hn`, bounds it: 20,000 on the machine measured).
# Pinning (2 cores): the process under test runs alone on CPU 0; wrk, and
# runestone-mock when it is the upstream, share CPU 1. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
REPEAT=${REPEAT:-3}
CONNECTIONS=${CONNECTIONS:-32}

scripts/setup.sh
command -v wrk >/dev/null || { sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd=sudo; $sudo_cmd apt-get install -y -qq wrk >/dev/null; }
cargo build --release --bins --example floor
# Each open stream costs the gateway two descriptors (client and provider).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 300); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "bench: $1 never came up" >&2; exit 1; }

mock_port=$(free_port)
redis_port=$(free_port)

cat >"$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench-tenant-key"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello to the benchmark"}],"max_tokens":16}'
LUA

gateway_config() { # $1 port, $2 metrics port, $3 limits yaml ("" for none), $4 extra
  cat <<YAML
server:
  listen: "127.0.0.1:$1"
  metrics_listen: "127.0.0.1:$2"
  threads: 1
  access_log: false
  grace_period_seconds: 1
  pid_file: "$work/gw-$1.pid"
  upgrade_sock: "$work/gw-$1.sock"
providers:
  - { name: mock, base_url: "http://127.0.0.1:$mock_port/v1", api_key: "sk-bench-provider" }
models:
  - name: gpt-4o-mini
    targets: [{ provider: mock, model: mock-small }]
pricing:
  gpt-4o-mini: { input: 0.15, output: 0.6 }
tenants:
  - id: bench
    keys: ["sk-bench-tenant-key"]
$3
$4
YAML
}

# wrk prints "Requests/sec: N" and, with --latency, percentiles.
run_wrk() { # $1 url -> prints "rps p50 p99"
  taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$work/post.lua" "$1" >"$work/wrk.out" 2>&1
  awk '/Requests\/sec/ {rps=$2} /^ +50%/ {p50=$2} /^ +99%/ {p99=$2} END {print rps, p50, p99}' "$work/wrk.out"
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A RPS P50 P99
measure() { # $1 name, $2 url
  local rs=() ; local lines=()
  for _ in $(seq 1 "$REPEAT"); do lines+=("$(run_wrk "$2")"); done
  RPS[$1]=$(printf '%s\n' "${lines[@]}" | awk '{print $1}' | median)
  P50[$1]=$(printf '%s\n' "${lines[@]}" | awk '{print $2}' | sort -V | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  P99[$1]=$(printf '%s\n' "${lines[@]}" | awk '{print $3}' | sort -V | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  echo "bench: $1: ${RPS[$1]} req/s, p50 ${P50[$1]}, p99 ${P99[$1]}" >&2
}

# 1. direct: the mock alone on CPU 0.
taskset -c 0 target/release/runestone-mock --listen "127.0.0.1:$mock_port" >/dev/null 2>&1 &
pids+=($!); mock_pid=$!
wait_http "http://127.0.0.1:$mock_port/health"
measure direct "http://127.0.0.1:$mock_port/v1/chat/completions"
kill "$mock_pid"; wait "$mock_pid" 2>/dev/null || true

# The mock as upstream shares CPU 1 with wrk from here on.
floor_port=$(free_port)
taskset -c 1 target/release/runestone-mock --listen "127.0.0.1:$mock_port" >/dev/null 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$mock_port/health"
taskset -c 1 redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
pids+=($!)

taskset -c 0 target/release/examples/floor "127.0.0.1:$floor_port" "127.0.0.1:$mock_port" >/dev/null 2>&1 &
floor_pid=$!; pids+=($floor_pid)
for _ in $(seq 1 300); do (echo >/dev/tcp/127.0.0.1/$floor_port) 2>/dev/null && break; sleep 0.05; done
measure "pingora floor" "http://127.0.0.1:$floor_port/v1/chat/completions"
kill "$floor_pid"; wait "$floor_pid" 2>/dev/null || true

LIMITS="    limits: { requests_per_minute: 100000000, tokens_per_minute: 100000000000, max_concurrent: 1000000 }"
REDIS="redis: { url: \"redis://127.0.0.1:$redis_port/0\", timeout_ms: 50 }"
run_gateway() { # $1 name, $2 limits, $3 extra
  local port mport
  port=$(free_port); mport=$(free_port)
  gateway_config "$port" "$mport" "$2" "$3" >"$work/$1.yaml"
  taskset -c 0 target/release/runestone --config "$work/$1.yaml" >"$work/$1.log" 2>&1 &
  local pid=$!; pids+=($pid)
  wait_http "http://127.0.0.1:$port/ready"
  measure "$1" "http://127.0.0.1:$port/v1/chat/completions"
  grep -q 'runestone_redis_up 0' <(curl -s "http://127.0.0.1:$mport/metrics") && echo "bench: $1: Redis was down during the run" >&2
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
run_gateway "runestone, no limits" "" ""
run_gateway "runestone, all on, in-process" "$LIMITS" ""
run_gateway "runestone, all on, Redis" "$LIMITS" "$REDIS"

# Streams: the mock paces tokens at 2/s, so streams stay open while the
# gateway's RSS is read.
kill "${pids[1]}" 2>/dev/null || true
stream_mock_port=$(free_port)
taskset -c 1 target/release/runestone-mock --listen "127.0.0.1:$stream_mock_port" --tokens-per-second 2 --threads 1 >/dev/null 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$stream_mock_port/health"
mock_port=$stream_mock_port
declare -A STREAMS
STREAM_COUNTS=${STREAM_COUNTS:-"1000 5000"}
for n in $STREAM_COUNTS; do
  port=$(free_port); mport=$(free_port)
  gateway_config "$port" "$mport" "$LIMITS" "" >"$work/streams.yaml"
  taskset -c 0 target/release/runestone --config "$work/streams.yaml" >"$work/streams.log" 2>&1 &
  gpid=$!; pids+=($gpid)
  wait_http "http://127.0.0.1:$port/ready"
  STREAMS[$n]=$(taskset -c 1 python3 scripts/open_streams.py "$port" sk-bench-tenant-key "$n" "$gpid")
  echo "bench: $n streams: ${STREAMS[$n]}" >&2
  kill "$gpid"; wait "$gpid" 2>/dev/null || true
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.0f%%", 100 * a / b}'; }
floor="pingora floor"
table=$(
  echo "| path | requests/s | vs pingora floor | p50 | p99 |"
  echo "|---|---|---|---|---|"
  for name in direct "pingora floor" "runestone, no limits" "runestone, all on, in-process" "runestone, all on, Redis"; do
    echo "| $name | ${RPS[$name]} | $(ratio "${RPS[$name]}" "${RPS[$floor]}") | ${P50[$name]} | ${P99[$name]} |"
  done
  echo
  echo "| open streams | streams answered | time to first chunk p50 / p99 (ms) | gateway RSS before / with streams open (KiB) | KiB per stream |"
  echo "|---|---|---|---|---|"
  for n in $STREAM_COUNTS; do
    python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(f\"| {sys.argv[2]} | {d['streams']} | {d['ttft_p50_ms']} / {d['ttft_p99_ms']} | {d['rss_before_kib']} / {d['rss_open_kib']} | {d['kib_per_stream']} |\")" "${STREAMS[$n]}" "$n"
  done
)
echo
echo "$table"

machine="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | sed 's/^ *//')"
{
  echo "# Benchmarks"
  echo
  echo "Made by \`DURATION=$DURATION REPEAT=$REPEAT scripts/bench.sh\` on $(date -u +%Y-%m-%d)."
  echo "Machine: $machine. $(rustc --version). wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}')."
  echo
  echo "Closed loop: \`wrk -t1 -c$CONNECTIONS -d${DURATION}s --latency\`, one non-streaming chat request"
  echo "(a 16-token answer from runestone-mock, no added latency), median of $REPEAT runs per path."
  echo "Pinning: the process under test alone on CPU 0 (runestone-mock for \"direct\", the floor"
  echo "proxy, or runestone with \`threads: 1\`); wrk, and runestone-mock as the upstream, share CPU 1;"
  echo "Redis also on CPU 1. \"All on\" means RPM, TPM and concurrency limits (set high enough"
  echo "never to refuse), cost accounting, breakers and metrics (access log off, as for the others);"
  echo "every runestone path authenticates and meters usage. The floor is benches/floor.rs: a bare"
  echo "Pingora proxy with no filters."
  echo
  echo "Streams: scripts/open_streams.py opens N streaming requests (runestone-mock paces 2 tokens/s)"
  echo "and reads the gateway's VmRSS while all are open."
  echo
  echo "$table"
  echo
  echo "Micro-benchmarks of the hot functions: \`cargo bench --bench hot_paths\` (criterion)."
} > docs/BENCHMARKS.md
echo
echo "written to docs/BENCHMARKS.md"
