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
# and in-process state; the same with the access log on, to a file (as
# operators run it); the same with Redis state, one server and a Redis
# Cluster of three primaries. Then streams: time to
# first token and RSS with 1,000 and 10,000 streams open, through the floor and
# through Runestone (STREAM_COUNTS; each stream takes two of the proxy's
# descriptors, so the hard limit of open files, `ulimit -Hn`, bounds it: 20,000
# on the machine measured, so 9,950 there). Open loop: oha at a fixed rate, half of Runestone's
# saturation (of a slower path's own), with latency correction, for latency added over direct and the
# process's CPU per 1,000 requests/s. Chunk delay: runestone-mock stamps each
# streamed token with its write time, benches/chunk_delay.rs subtracts it from
# the arrival time and times each stream's first token, direct, through the
# floor and through Runestone, taking turns.
# Instructions a request: the floor and the Runestone rows under callgrind,
# CG_REQUESTS (2,000) requests each, the figure the VM's noise leaves alone;
# and a streamed token's, through the floor and Runestone all on.
# Pinning (2 cores): the process under test runs alone on CPU 0; wrk, and
# runestone-mock when it is the upstream, share CPU 1 (in the open loop,
# "direct" is that upstream mock itself). Loopback only.
# Profile-guided builds (scripts/pgo.sh, of the gateway and of the floor)
# run beside the plain ones in the closed and open loops and the callgrind
# pass, in rows of their own; PGO=0 leaves them out, PGO=built measures
# target/pgo and target/pgo-floor as they are (no new builds).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
REPEAT=${REPEAT:-3}
CONNECTIONS=${CONNECTIONS:-32}

scripts/setup.sh
for tool in wrk valgrind; do
  command -v "$tool" >/dev/null || { sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd=sudo; $sudo_cmd apt-get install -y -qq "$tool" >/dev/null; }
done
# oha (open loop with latency correction): about 4-10 minutes to build, once.
command -v oha >/dev/null || cargo install oha --locked
cargo build --release --bins --example floor --example chunk_delay
cargo build --release -p runestone-mock
PGO=${PGO:-1}
PGO_MISSING=""
case "$PGO" in
  1) scripts/pgo.sh && scripts/pgo.sh --floor || PGO_MISSING="scripts/pgo.sh failed here (its output above says why)" ;;
  built)
    # Only builds of these very sources (scripts/pgo.sh notes what it built from).
    sources=$(scripts/pgo.sh --sources 2>/dev/null) \
      || PGO_MISSING="PGO=built, but this is not a git checkout, so what the builds were made from cannot be checked"
    for built in target/pgo/built-from target/pgo-floor/built-from; do
      [ -n "$PGO_MISSING" ] || [ "$(cat "$built" 2>/dev/null)" = "$sources" ] \
        || PGO_MISSING="PGO=built, but ${built%/built-from} was not built by scripts/pgo.sh from these sources"
    done ;;
  *) PGO_MISSING="PGO=$PGO" ;;
esac
# Each open stream costs the gateway two descriptors (client and provider).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

work=$(mktemp -d)
pids=()
cleanup() {
  # Every background job too: a path that never came up is not in pids.
  for p in "${pids[@]}" $(jobs -p); do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 "${WAIT_TRIES:-300}"); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "bench: $1 never came up" >&2; exit 1; }

mock_port=$(free_port)
redis_port=$(free_port)

cat >"$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench-tenant-key"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello to the benchmark"}],"max_tokens":16}'
LUA
# The same request for oha (the open loop, the callgrind pass).
body='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello to the benchmark"}],"max_tokens":16}'

# The peers: other gateways users would pick instead, in front of the same
# upstream mock, each with its own way of being told where to go.
PEERS=${BENCH_PEERS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/runestone-bench-peers}
PORTKEY_VERSION=1.15.2
LITELLM_VERSION=1.108.7
declare -A PEER_MISSING PEER_HEADERS
PEER_HEADERS[portkey gateway (node)]="Authorization: Bearer sk-bench-provider|x-portkey-provider: openai|x-portkey-custom-host: http://127.0.0.1:MOCK_PORT/v1"
PEER_HEADERS[litellm proxy (1 worker)]="Authorization: Bearer sk-bench-master"
mkdir -p "$PEERS"
if [ ! -f "$PEERS/portkey/node_modules/@portkey-ai/gateway/build/start-server.js" ]; then
  echo "bench: installing @portkey-ai/gateway@$PORTKEY_VERSION into $PEERS/portkey" >&2
  npm install --silent --prefix "$PEERS/portkey" "@portkey-ai/gateway@$PORTKEY_VERSION" >/dev/null 2>&1 \
    || PEER_MISSING[portkey gateway (node)]="npm install @portkey-ai/gateway@$PORTKEY_VERSION failed here"
fi
if [ ! -x "$PEERS/litellm-venv/bin/litellm" ]; then
  echo "bench: installing litellm[proxy]==$LITELLM_VERSION into $PEERS/litellm-venv" >&2
  { python3 -m venv "$PEERS/litellm-venv" && "$PEERS/litellm-venv/bin/pip" install -q "litellm[proxy]==$LITELLM_VERSION"; } >/dev/null 2>&1 \
    || PEER_MISSING[litellm proxy (1 worker)]="pip install litellm[proxy]==$LITELLM_VERSION failed here"
fi
# peer_lua NAME: a wrk script sending the bench body with the peer's headers.
peer_lua() {
  local out="$work/post-${1%% *}.lua"
  {
    echo 'wrk.method = "POST"'
    echo 'wrk.headers["Content-Type"] = "application/json"'
    local IFS='|'
    for h in ${PEER_HEADERS[$1]//MOCK_PORT/$mock_port}; do
      echo "wrk.headers[\"${h%%: *}\"] = \"${h#*: }\""
    done
    echo "wrk.body = '{\"model\":\"gpt-4o-mini\",\"messages\":[{\"role\":\"user\",\"content\":\"Say hello to the benchmark\"}],\"max_tokens\":16}'"
  } >"$out"
  echo "$out"
}

gateway_config() { # $1 port, $2 metrics port, $3 limits yaml ("" for none), $4 extra, $5 access log (true/false), $6 threads
  cat <<YAML
server:
  listen: "127.0.0.1:$1"
  metrics_listen: "127.0.0.1:$2"
  threads: ${6:-1}
  access_log: ${5:-false}
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

# wrk prints "Requests/sec: N" and, with --latency, percentiles in us, ms
# or s; they are turned into microseconds so that they sort as numbers.
# wrk_cmd: how wrk is run (pinned to CPU 1, one thread, unless said otherwise).
run_wrk() { # $1 url [$2 wrk script] -> prints "rps p50_us p99_us"
  local wrk=${wrk_cmd:-taskset -c 1 wrk -t1}
  # A 2 s warm-up first, as in the open loop: each path starts fresh, and
  # its first connections, lazy set-up and page faults are not the steady
  # state measured.
  $wrk -c"$CONNECTIONS" -d2s -s "${2:-$work/post.lua}" "$1" >/dev/null 2>&1 || true
  $wrk -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "${2:-$work/post.lua}" "$1" >"$work/wrk.out" 2>&1
  awk 'function us(v) { return v ~ /us$/ ? v + 0 : v ~ /ms$/ ? v * 1000 : v * 1000000 }
       /Requests\/sec/ {rps=$2} /^ +50%/ {p50=us($2)} /^ +99%/ {p99=us($2)}
       END {printf "%s %.0f %.0f\n", rps, p50, p99}' "$work/wrk.out"
}

# The median of the numbers on stdin, one per line (blank lines ignored).
median() { sort -g | awk 'NF {a[++n]=$1} END {print a[int((n+1)/2)]}'; }

declare -A RPS P50 P99 PEAK RATIO OWN_RATIO LINES RATIOS OWN_RATIOS ROUND

LIMITS="    limits: { requests_per_minute: 100000000, tokens_per_minute: 100000000000, max_concurrent: 1000000 }"
REDIS="redis: { url: \"redis://127.0.0.1:$redis_port/0\", timeout_ms: 50 }"
cluster_ports=("$(free_port)" "$(free_port)" "$(free_port)")
REDIS_CLUSTER="redis: { cluster_nodes: [\"redis://127.0.0.1:${cluster_ports[0]}\", \"redis://127.0.0.1:${cluster_ports[1]}\"], timeout_ms: 50 }"
TELEMETRY="telemetry: { otlp_endpoint: \"http://127.0.0.1:$mock_port/_mock/otlp\" }"
# Every request the same: after the first, all are hits.
CACHE="cache: { only_deterministic: false }"
PATHS=(direct "pingora floor" "runestone, no limits" "runestone, all on, in-process" "runestone, all on, in-process, access log to a file" "runestone, all on, in-process, traces to a collector" "runestone, all on, in-process, cache hits" "runestone, all on, Redis" "runestone, all on, Redis, quota taken ahead" "runestone, all on, Redis Cluster")
# The same binaries built by scripts/pgo.sh: the floor too, so that what a
# profile-guided build buys any Pingora proxy is not counted as the
# gateway's own.
PGO_PATHS=("pingora floor, profile-guided" "runestone, all on, in-process, profile-guided" "runestone, all on, in-process, access log to a file, profile-guided" "runestone, all on, Redis, profile-guided" "runestone, all on, Redis, quota taken ahead, profile-guided")
[ -n "$PGO_MISSING" ] || PATHS+=("${PGO_PATHS[@]}")
for peer in "portkey gateway (node)" "litellm proxy (1 worker)"; do
  [ -n "${PEER_MISSING[$peer]:-}" ] || PATHS+=("$peer")
done

# The upstream mock and Redis share CPU 1 with the load generator.
taskset -c 1 target/release/runestone-mock --listen "127.0.0.1:$mock_port" >/dev/null 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$mock_port/health"
taskset -c 1 redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
pids+=($!)
# A Redis Cluster of three primaries (no replicas), also on CPU 1.
for p in "${cluster_ports[@]}"; do
  mkdir -p "$work/cluster-$p"
  taskset -c 1 redis-server --port "$p" --cluster-port "$(free_port)" --bind 127.0.0.1 --save "" --appendonly no --cluster-enabled yes \
    --cluster-config-file "$work/cluster-$p/nodes.conf" --dir "$work/cluster-$p" >/dev/null 2>&1 &
  pids+=($!)
done
for p in "${cluster_ports[@]}"; do
  for _ in $(seq 1 200); do redis-cli -p "$p" ping 2>/dev/null | grep -q PONG && break; sleep 0.05; done
done
redis-cli --cluster create "${cluster_ports[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >/dev/null
for _ in $(seq 1 200); do redis-cli -p "${cluster_ports[0]}" cluster info | grep -q cluster_state:ok && break; sleep 0.05; done

# How the floor and Runestone are started: on CPU 0 (the callgrind pass
# below runs them under valgrind instead).
RUN_UNDER="taskset -c 0"
# start_path NAME: starts the process under test on CPU 0; sets PID and URL.
start_path() {
  local port mport path=$1 gateway=target/release/runestone floor=target/release/examples/floor
  port=$(free_port)
  if [[ "$path" == *", profile-guided" ]]; then
    path=${path%, profile-guided}
    gateway=target/pgo/release/runestone
    floor=target/pgo-floor/release/examples/floor
  fi
  case "$path" in
    direct)
      taskset -c 0 target/release/runestone-mock --listen "127.0.0.1:$port" >/dev/null 2>&1 &
      PID=$!; wait_http "http://127.0.0.1:$port/health" ;;
    "pingora floor")
      $RUN_UNDER "$floor" "127.0.0.1:$port" "127.0.0.1:$mock_port" >/dev/null 2>&1 &
      PID=$!
      for _ in $(seq 1 "${WAIT_TRIES:-300}"); do (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done ;;
    "portkey gateway (node)")
      (cd "$PEERS/portkey/node_modules/@portkey-ai/gateway" && exec taskset -c 0 node build/start-server.js "--port=$port" --headless) >/dev/null 2>&1 &
      PID=$!
      for _ in $(seq 1 600); do (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done ;;
    "litellm proxy (1 worker)")
      cat >"$work/litellm.yaml" <<YAML
model_list:
  - model_name: gpt-4o-mini
    litellm_params: { model: openai/mock-small, api_base: "http://127.0.0.1:$mock_port/v1", api_key: sk-bench-provider }
general_settings: { master_key: sk-bench-master }
YAML
      taskset -c 0 "$PEERS/litellm-venv/bin/litellm" --config "$work/litellm.yaml" --port "$port" --num_workers 1 >"$work/litellm.log" 2>&1 &
      PID=$!
      for _ in $(seq 1 1200); do curl -fsS "http://127.0.0.1:$port/health/liveliness" >/dev/null 2>&1 && break; sleep 0.05; done ;;
    *)
      local limits="" extra="" log=false out=/dev/null
      [[ "$path" == *"all on"* ]] && limits=$LIMITS
      [[ "$path" == *"access log"* ]] && log=true && out="$work/access.log"
      [[ "$path" == *Redis ]] && extra=$REDIS
      [[ "$path" == *"Redis Cluster" ]] && extra=$REDIS_CLUSTER
      # redis.lease: 5% of each limit taken ahead (README, "Quota taken ahead").
      [[ "$path" == *"quota taken ahead" ]] && extra="${REDIS% \}}, lease: { share: 0.05 } }"
      [[ "$path" == *traces* ]] && extra=$TELEMETRY
      [[ "$path" == *"cache hits"* ]] && extra=$CACHE
      mport=$(free_port)
      gateway_config "$port" "$mport" "$limits" "$extra" "$log" >"$work/gw.yaml"
      $RUN_UNDER "$gateway" --config "$work/gw.yaml" >"$out" 2>"$work/gw.log" &
      PID=$!; wait_http "http://127.0.0.1:$port/ready"
      METRICS="http://127.0.0.1:$mport/metrics" ;;
  esac
  pids+=($PID)
  PORT=$port
  URL="http://127.0.0.1:$port/v1/chat/completions"
}
stop_path() {
  # Read whole before grep: `curl | grep -q` under pipefail fails when grep
  # stops reading first.
  if [[ "$1" == *Redis* ]] && grep -q '^runestone_redis_up 0' <<<"$(curl -s "$METRICS")"; then
    echo "bench: $1: Redis was down during the run" >&2
  fi
  if [[ "$1" == *traces* ]]; then
    curl -s "$METRICS" | awk '/^runestone_telemetry_exported_total/ {e=$2} /^runestone_telemetry_dropped_total/ {d+=$2}
      END {if (e == 0 || d > 0) printf "bench: %s: %d spans exported, %d dropped\n", name, e, d > "/dev/stderr"}' name="$1"
  fi
  kill -INT "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
peak_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }

# 1. Closed loop: saturation throughput. The paths take turns, round after
# round, so a slow spell of the machine hits all of them; each round's ratio
# to the floor is kept and the median ratio reported.
for round in $(seq 1 "$REPEAT"); do
  for name in "${PATHS[@]}"; do
    lua="$work/post.lua"
    [ -n "${PEER_HEADERS[$name]:-}" ] && lua=$(peer_lua "$name")
    start_path "$name"; line="$(run_wrk "$URL" "$lua") $(peak_kib "$PID")"; stop_path "$name"
    LINES[$name]+="$line"$'\n'
    ROUND[$name]=${line%% *}
    echo "bench: round $round, $name: $line" >&2
  done
  for name in "${PATHS[@]}"; do
    RATIOS[$name]+="$(awk -v a="${ROUND[$name]}" -v b="${ROUND[pingora floor]}" 'BEGIN {print 100 * a / b}')"$'\n'
    own="pingora floor"
    [[ "$name" == *", profile-guided" ]] && own="pingora floor, profile-guided"
    OWN_RATIOS[$name]+="$(awk -v a="${ROUND[$name]}" -v b="${ROUND[$own]}" 'BEGIN {print 100 * a / b}')"$'\n'
  done
done
for name in "${PATHS[@]}"; do
  RPS[$name]=$(printf '%s' "${LINES[$name]}" | awk '{print $1}' | median)
  P50[$name]=$(printf '%s' "${LINES[$name]}" | awk '{print $2}' | median)
  P99[$name]=$(printf '%s' "${LINES[$name]}" | awk '{print $3}' | median)
  PEAK[$name]=$(printf '%s' "${LINES[$name]}" | awk '{print $4}' | median)
  RATIO[$name]=$(printf '%s' "${RATIOS[$name]}" | median)
  OWN_RATIO[$name]=$(printf '%s' "${OWN_RATIOS[$name]}" | median)
done

# 1b. Instructions a request (callgrind): the figure this VM does not
# blur. Each path runs under valgrind (on CPU 0); after a warm-up the
# counters are zeroed, CG_REQUESTS requests are sent (32 connections) and
# the dump's total is divided by them. Every thread of the process counts
# (the access log's writer among them). Not the traces row: its exporter
# runs at SCHED_IDLE and exported nothing under valgrind, so the count
# would leave the export out; not the Redis Cluster (one Redis row is
# enough for what Redis adds). Redis is given 5 s to answer here (50 ms in
# the other passes): a process under valgrind is far slower, and a timed-out
# call would fall back to in-process limits and count those instead. A row
# whose requests did not all succeed, or whose dump is missing, says so
# instead of a figure.
CG_REQUESTS=${CG_REQUESTS:-2000}
CG_PATHS=("pingora floor" "runestone, no limits" "runestone, all on, in-process" "runestone, all on, in-process, access log to a file" "runestone, all on, in-process, cache hits" "runestone, all on, Redis" "runestone, all on, Redis, quota taken ahead")
[ -n "$PGO_MISSING" ] || CG_PATHS+=("pingora floor, profile-guided" "runestone, all on, in-process, profile-guided")
# Streams, in the same processes after the requests: CG_STREAMS streams of
# CG_STREAM_TOKENS tokens each (runestone-mock writes them unpaced), for
# what forwarding a streamed token costs (the request rows are one small
# JSON answer each).
CG_STREAMS=${CG_STREAMS:-200}
CG_STREAM_TOKENS=200
CG_STREAM_PATHS=("pingora floor" "runestone, all on, in-process")
stream_body="{\"model\":\"gpt-4o-mini\",\"messages\":[{\"role\":\"user\",\"content\":\"Say hello to the benchmark\"}],\"max_tokens\":$CG_STREAM_TOKENS,\"mock_tokens\":$CG_STREAM_TOKENS,\"stream\":true}"
declare -A INSTR STREAM_INSTR
# load N CONNECTIONS [BODY]: N requests to the path under test.
load() {
  taskset -c 1 oha -n "$1" -c "$2" --no-tui --output-format json -m POST -H 'Authorization: Bearer sk-bench-tenant-key' \
    -H 'Content-Type: application/json' -d "${3:-$body}" "$URL" >"$work/cg-oha.json"
}
# cg_count N DUMP [BODY]: zeroes the counters of the process under test,
# sends it N requests, dumps its counters (the DUMP-th dump); the
# instructions counted, or why there is no figure.
cg_count() {
  local zeroed ok total
  zeroed=$(timeout 60 callgrind_control -z "$PID" 2>&1 || true)
  load "$1" "$CONNECTIONS" "${3:-$body}" || true
  timeout 60 callgrind_control -d "$PID" >/dev/null 2>&1 || true
  for _ in $(seq 1 600); do grep -q '^totals:' "$work/callgrind.out.$2" 2>/dev/null && break; sleep 0.05; done
  ok=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["statusCodeDistribution"].get("200", 0))' "$work/cg-oha.json" 2>/dev/null || echo 0)
  total=$(awk '/^totals:/ {print $2; exit}' "$work/callgrind.out.$2" 2>/dev/null || true)
  if [ "$ok" != "$1" ] || [ -z "$total" ] || [[ "$zeroed" != *OK* ]]; then
    echo "not measured ($ok of $1 requests answered 200; counters zeroed: ${zeroed:+yes}, dump: ${total:-none})"
  else
    echo "$total"
  fi
}
# instr_rows COUNTS PATH...: a table row for each path of COUNTS (the name
# of an array of instruction counts), with its ratio to the floor's.
instr_rows() {
  local -n counts=$1
  local name
  shift
  for name in "$@"; do
    echo "| $name | ${counts[$name]} | $(awk -v a="${counts[$name]}" -v b="${counts[pingora floor]}" 'BEGIN {if (a + 0 > 0 && b + 0 > 0) printf "%.2fx", a / b}') |"
  done
}
redis_fast=$REDIS
REDIS=${REDIS/timeout_ms: 50/timeout_ms: 5000}
RUN_UNDER="taskset -c 0 valgrind -q --tool=callgrind --callgrind-out-file=$work/callgrind.out"
for name in "${CG_PATHS[@]}"; do
  rm -f "$work"/callgrind.out*
  WAIT_TRIES=1200 start_path "$name"
  load 200 8 || true
  INSTR[$name]=$(cg_count "$CG_REQUESTS" 1 | awk -v n="$CG_REQUESTS" '$1 + 0 > 0 {printf "%.1fk", $1 / n / 1000; next} {print}')
  echo "bench: callgrind, $name: ${INSTR[$name]} instructions a request" >&2
  if [[ " ${CG_STREAM_PATHS[*]} " == *" $name "* ]]; then
    STREAM_INSTR[$name]=$(cg_count "$CG_STREAMS" 2 "$stream_body" | awk -v n="$((CG_STREAMS * CG_STREAM_TOKENS))" '$1 + 0 > 0 {printf "%.1fk", $1 / n / 1000; next} {print}')
    echo "bench: callgrind, $name: ${STREAM_INSTR[$name]} instructions a streamed token" >&2
  fi
  stop_path "$name"
done
RUN_UNDER="taskset -c 0"
REDIS=$redis_fast

# 2. Open loop at half of Runestone's saturation (every feature on,
# in-process), the same rate for every path that is at least as fast (each
# other at half its own): latency and CPU. The paths
# take turns, round after round, as in the closed loop, so a slow spell of
# the machine hits all of them; "added" is each round's latency less
# direct's in the same round, and the medians of the rounds are reported.
RATE=$(awk -v r="${RPS[runestone, all on, in-process]}" 'BEGIN {printf "%d", r / 2}')
declare -A OL_P50 OL_P99 OL_P999 OL_CPU OL_RPS OL_RATE OL_RUNS OL_ADDED OL_DIRECT
hz=$(getconf CLK_TCK)
for name in "${PATHS[@]}"; do
  # Each path at no more than half its own saturation: one slower than
  # Runestone in-process (Redis, a peer) runs at half its own instead of the
  # common rate, which would load it past half and measure its overload,
  # not its latency (said in the table); a faster one keeps the common
  # rate. Direct is measured again at such a rate, right before the path,
  # for its "added".
  OL_RATE[$name]=$RATE
  if [ "$name" != direct ]; then
    OL_RATE[$name]=$(awk -v r="${RPS[$name]}" -v c="$RATE" 'BEGIN {h = int(r / 2); printf "%d", h < c ? h : c}')
  fi
done
# ol_run URL RATE HEADER...: one open-loop run (after a 2 s warm-up) of the
# process PID; prints served req/s, p50, p99, p99.9 (us) and CPU, % of a
# core per 1k req/s.
ol_run() {
  local url=$1 rate=$2 before after
  shift 2
  taskset -c 1 oha -z 2s -q "$rate" -c "$CONNECTIONS" --no-tui --output-format quiet -m POST \
    "$@" -H 'Content-Type: application/json' -d "$body" "$url" >/dev/null 2>&1 || true
  before=$(cpu_ticks "$PID")
  taskset -c 1 oha -z "${DURATION}s" -q "$rate" --latency-correction -c "$CONNECTIONS" --no-tui --output-format json -m POST \
    "$@" -H 'Content-Type: application/json' -d "$body" "$url" >"$work/oha.json"
  after=$(cpu_ticks "$PID")
  python3 -c '
import json, sys
d = json.load(open(sys.argv[1])); p = d["latencyPercentiles"]
rps = d["statusCodeDistribution"].get("200", 0) / d["summary"]["total"]
cpu = 100 * (int(sys.argv[2]) / int(sys.argv[3]) / float(sys.argv[4])) / (rps / 1000)
print(round(rps), *(round(p[k] * 1e6) for k in ("p50", "p99", "p99.9")), round(cpu, 1))' \
    "$work/oha.json" $((after - before)) "$hz" "$DURATION"
}
direct_url="http://127.0.0.1:$mock_port/v1/chat/completions"
for round in $(seq 1 "$REPEAT"); do
  for name in "${PATHS[@]}"; do
    rate=${OL_RATE[$name]}
    if [ "$name" = direct ]; then
      # Direct is the very upstream the proxies use (runestone-mock on CPU 1,
      # beside the load generator), so "added" is the proxy hop alone and not
      # also the difference between a mock with a core of its own and one
      # sharing the load generator's.
      PID=${pids[0]}
      direct=$(ol_run "$direct_url" "$rate" -H 'Authorization: Bearer sk-bench-tenant-key')
      run=$direct
    else
      if [ "$rate" != "$RATE" ]; then
        PID=${pids[0]}
        direct=$(ol_run "$direct_url" "$rate" -H 'Authorization: Bearer sk-bench-tenant-key')
      else
        direct=${OL_DIRECT[$round]}
      fi
      start_path "$name"
      headers=(-H 'Authorization: Bearer sk-bench-tenant-key')
      if [ -n "${PEER_HEADERS[$name]:-}" ]; then
        headers=()
        IFS='|' read -r -a peer_headers <<<"${PEER_HEADERS[$name]//MOCK_PORT/$mock_port}"
        for h in "${peer_headers[@]}"; do headers+=(-H "$h"); done
      fi
      run=$(ol_run "$URL" "$rate" "${headers[@]}")
      stop_path "$name"
    fi
    OL_RUNS[$name]+="$run"$'\n'
    [ "$name" = direct ] && OL_DIRECT[$round]=$run
    # This round's added p50, p99, p99.9 over direct's at the same rate.
    OL_ADDED[$name]+="$(printf '%s\n%s\n' "$run" "$direct" | awk 'NR == 1 {a = $2; b = $3; c = $4} NR == 2 {print a - $2, b - $3, c - $4}')"$'\n'
    echo "bench: round $round, $name at $rate req/s: $run (direct at that rate: $direct)" >&2
  done
done
for name in "${PATHS[@]}"; do
  col() { printf '%s' "${OL_RUNS[$name]}" | awk -v c="$1" '{print $c}' | median; }
  OL_RPS[$name]=$(col 1); OL_P50[$name]=$(col 2); OL_P99[$name]=$(col 3); OL_P999[$name]=$(col 4); OL_CPU[$name]=$(col 5)
done
# added NAME COLUMN: the median of the rounds' added latency (1 p50, 2 p99,
# 3 p99.9), signed.
added() { printf '%s' "${OL_ADDED[$1]}" | awk -v c="$2" '{print $c}' | median | awk '{printf "%+d", $1}'; }

# 3. Open streams: the mock paces tokens at 2/s, so streams stay open while
# the proxy's RSS is read.
kill "${pids[0]}" 2>/dev/null || true
stream_mock_port=$(free_port)
taskset -c 1 target/release/runestone-mock --listen "127.0.0.1:$stream_mock_port" --tokens-per-second 2 --threads 1 >/dev/null 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$stream_mock_port/health"
mock_port=$stream_mock_port
declare -A STREAMS
# 10,000 streams when the descriptor limit allows (two per stream in the
# proxy), else as many as it does.
hard=$(ulimit -Hn)
max_streams=10000
[ "$hard" != unlimited ] && [ $(((hard - 100) / 2)) -lt $max_streams ] && max_streams=$(((hard - 100) / 2))
STREAM_COUNTS=${STREAM_COUNTS:-"1000 $max_streams"}
for name in "pingora floor" "runestone, all on, in-process"; do
  for n in $STREAM_COUNTS; do
    start_path "$name"
    STREAMS[$name $n]=$(taskset -c 1 python3 scripts/open_streams.py "$PORT" sk-bench-tenant-key "$n" "$PID")
    echo "bench: $name, $n streams: ${STREAMS[$name $n]}" >&2
    stop_path "$name"
  done
done

# 4. Stream latency, direct and through Runestone (every feature on).
# stream_latency STREAMS ROUNDS [MOCK FLAGS...]: starts a stamping
# runestone-mock on CPU 1, the floor and the gateway (and its
# profile-guided build) in front of it (all on CPU 0, idle but for the one
# measured), and runs benches/chunk_delay.rs against them, taking turns
# round after round;
# sets DIRECT_RESULT, FLOOR_RESULT, GATEWAY_RESULT and PGO_RESULT (the
# profile-guided gateway's, empty without it; JSON lines). The
# floor's row is the proxy hop's own share (its wake-ups and copies), so
# the gateway's is what it adds to it.
stream_latency() {
  local port floor_port floor_pid results
  port=$(free_port)
  taskset -c 1 target/release/runestone-mock --listen "127.0.0.1:$port" --stamp-chunks "${@:3}" >/dev/null 2>&1 &
  pids+=($!)
  wait_http "http://127.0.0.1:$port/health"
  mock_port=$port
  start_path "pingora floor"
  floor_port=$PORT floor_pid=$PID
  local pgo_target=() pgo_pid=""
  if [ -z "$PGO_MISSING" ]; then
    start_path "runestone, all on, in-process, profile-guided"
    pgo_target=("$PORT:sk-bench-tenant-key") pgo_pid=$PID
  fi
  start_path "runestone, all on, in-process"
  results=$(taskset -c 1 target/release/examples/chunk_delay "$1" "$2" "$port:none" \
    "$floor_port:sk-bench-tenant-key" "$PORT:sk-bench-tenant-key" "${pgo_target[@]}")
  stop_path "runestone, all on, in-process"
  if [ -n "$pgo_pid" ]; then
    PID=$pgo_pid
    stop_path "runestone, all on, in-process, profile-guided"
  fi
  PID=$floor_pid
  stop_path "pingora floor"
  PGO_RESULT=""
  { read -r DIRECT_RESULT; read -r FLOOR_RESULT; read -r GATEWAY_RESULT; read -r PGO_RESULT || true; } <<<"$results"
}
# Chunk forwarding delay: 20 concurrent streams, 20 tokens/s each,
# CHUNK_ROUNDS times over (a round is under a second a path: 40 rounds
# give 12,800 chunks a path, so the p99 is not a handful of samples).
CHUNK_ROUNDS=${CHUNK_ROUNDS:-40}
stream_latency 20 "$CHUNK_ROUNDS" --tokens-per-second 20
CHUNK_DIRECT=$DIRECT_RESULT CHUNK_FLOOR=$FLOOR_RESULT CHUNK_GATEWAY=$GATEWAY_RESULT CHUNK_PGO=$PGO_RESULT
# Time to first token: TTFT_STREAMS streams one after another, from a mock
# that does not pace its tokens.
TTFT_STREAMS=${TTFT_STREAMS:-2000}
stream_latency 1 "$TTFT_STREAMS"
TTFT_DIRECT=$DIRECT_RESULT TTFT_FLOOR=$FLOOR_RESULT TTFT_GATEWAY=$GATEWAY_RESULT TTFT_PGO=$PGO_RESULT
echo "bench: chunk delay direct $CHUNK_DIRECT, through the floor $CHUNK_FLOOR, through runestone $CHUNK_GATEWAY${CHUNK_PGO:+, profile-guided $CHUNK_PGO}" >&2
echo "bench: first token direct $TTFT_DIRECT, through the floor $TTFT_FLOOR, through runestone $TTFT_GATEWAY${TTFT_PGO:+, profile-guided $TTFT_PGO}" >&2

# 5. Scaling: two threads on both cores, the load generator and the
# upstream mock on the same two cores (nothing pinned), the floor with two
# threads against Runestone with `threads: 2`, rounds taking turns.
declare -A SCALE_LINES SCALE_ROUND SCALE_RATIOS
scale_mock_port=$(free_port)
target/release/runestone-mock --listen "127.0.0.1:$scale_mock_port" --threads 2 >/dev/null 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$scale_mock_port/health"
SCALE_PATHS=("pingora floor, 2 threads" "runestone, all on, in-process, threads: 2")
for round in $(seq 1 "$REPEAT"); do
  for name in "${SCALE_PATHS[@]}"; do
    port=$(free_port)
    if [[ "$name" == pingora* ]]; then
      target/release/examples/floor "127.0.0.1:$port" "127.0.0.1:$scale_mock_port" 2 >/dev/null 2>&1 &
      PID=$!
      for _ in $(seq 1 300); do (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
    else
      mock_port=$scale_mock_port
      gateway_config "$port" "$(free_port)" "$LIMITS" "" false 2 >"$work/gw2.yaml"
      target/release/runestone --config "$work/gw2.yaml" >/dev/null 2>"$work/gw2.log" &
      PID=$!; wait_http "http://127.0.0.1:$port/ready"
    fi
    line=$(wrk_cmd="wrk -t2" run_wrk "http://127.0.0.1:$port/v1/chat/completions")
    kill -INT "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true
    SCALE_LINES[$name]+="$line"$'\n'
    SCALE_ROUND[$name]=${line%% *}
    echo "bench: scaling round $round, $name: $line" >&2
  done
  for name in "${SCALE_PATHS[@]}"; do
    SCALE_RATIOS[$name]+="$(awk -v a="${SCALE_ROUND[$name]}" -v b="${SCALE_ROUND[pingora floor, 2 threads]}" 'BEGIN {print 100 * a / b}')"$'\n'
  done
done

table=$(
  echo "Closed loop (saturation):"
  echo
  echo "| path | requests/s | vs pingora floor (median of the rounds' ratios) | vs the floor built the same way | p50 (µs) | p99 (µs) | peak RSS (KiB) |"
  echo "|---|---|---|---|---|---|---|"
  for name in "${PATHS[@]}"; do
    echo "| $name | ${RPS[$name]} | $(printf '%.0f%%' "${RATIO[$name]}") | $(printf '%.0f%%' "${OWN_RATIO[$name]}") | ${P50[$name]} | ${P99[$name]} | ${PEAK[$name]} |"
  done
  for peer in "${!PEER_MISSING[@]}"; do
    echo "| $peer | not measured: ${PEER_MISSING[$peer]} | | | | | |"
  done
  [ -z "$PGO_MISSING" ] || echo "| the profile-guided rows | not measured: $PGO_MISSING | | | | | |"
  echo
  echo "Instructions a request (callgrind, $CG_REQUESTS requests at $CONNECTIONS connections after a warm-up, every thread of the process; the same binary gives the same count however busy the machine, so this is the figure to compare between runs):"
  echo
  echo "| path | instructions a request | vs pingora floor |"
  echo "|---|---|---|"
  instr_rows INSTR "${CG_PATHS[@]}"
  echo
  echo "Instructions a streamed token (callgrind, in the same processes after the requests: $CG_STREAMS streams of $CG_STREAM_TOKENS tokens at $CONNECTIONS connections, unpaced; the total over the streams' tokens, so each stream's own request is spread over them):"
  echo
  echo "| path | instructions a streamed token | vs pingora floor |"
  echo "|---|---|---|"
  instr_rows STREAM_INSTR "${CG_STREAM_PATHS[@]}"
  echo
  echo "Scaling: two threads on both cores, wrk (-t2) and the upstream mock (--threads 2) on the same two cores, nothing pinned:"
  echo
  echo "| path | requests/s | vs the 2-thread floor (median of the rounds' ratios) | p50 (µs) | p99 (µs) |"
  echo "|---|---|---|---|---|"
  for name in "${SCALE_PATHS[@]}"; do
    rps=$(printf '%s' "${SCALE_LINES[$name]}" | awk '{print $1}' | median)
    p50=$(printf '%s' "${SCALE_LINES[$name]}" | awk '{print $2}' | median)
    p99=$(printf '%s' "${SCALE_LINES[$name]}" | awk '{print $3}' | median)
    ratio=$(printf '%s' "${SCALE_RATIOS[$name]}" | median)
    echo "| $name | $rps | $(printf '%.0f%%' "$ratio") | $p50 | $p99 |"
  done
  echo
  echo "Open loop at $RATE requests/s (half of Runestone's saturation, every feature on, in-process), a slower path at half its own (said in its row); latency in µs, $REPEAT rounds in which the paths take turns, medians of the rounds; added = each round's latency less direct's in the same round at the same rate:"
  echo
  echo "| path | p50 | p99 | p99.9 | added p50 / p99 / p99.9 | CPU, % of a core per 1k req/s |"
  echo "|---|---|---|---|---|---|"
  for name in "${PATHS[@]}"; do
    label=$name
    [ "${OL_RATE[$name]}" = "$RATE" ] || label="$name, at ${OL_RATE[$name]} req/s (half its saturation)"
    echo "| $label | ${OL_P50[$name]} | ${OL_P99[$name]} | ${OL_P999[$name]} | $(added "$name" 1) / $(added "$name" 2) / $(added "$name" 3) | ${OL_CPU[$name]} |"
  done
  echo
  echo "Open streams:"
  echo
  echo "| path | open streams | streams answered | time to first chunk p50 / p99 (ms) | RSS before / with streams open (KiB) | KiB per stream |"
  echo "|---|---|---|---|---|---|"
  for name in "pingora floor" "runestone, all on, in-process"; do
    for n in $STREAM_COUNTS; do
      python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(f\"| {sys.argv[3]} | {sys.argv[2]} | {d['streams']} | {d['ttft_p50_ms']} / {d['ttft_p99_ms']} | {d['rss_before_kib']} / {d['rss_open_kib']} | {d['kib_per_stream']} |\")" "${STREAMS[$name $n]}" "$n" "$name"
    done
  done
  echo
  echo "Stream latency, in µs: chunk delay from the mock writing a token to the client reading it ($CHUNK_ROUNDS rounds of 20 concurrent streams, 20 tokens/s each); time to first token from sending the request ($TTFT_STREAMS streams one after another, tokens unpaced); the paths take turns, round after round (stream after stream for the first token); added = over direct, so the floor's added is what any proxy hop costs here and Runestone's own share is its added less the floor's:"
  echo
  echo "| path | chunks | chunk delay p50 / p99 / p99.9 | added p50 / p99 | time to first token p50 / p99 | added p50 / p99 |"
  echo "|---|---|---|---|---|---|"
  stream_rows=("direct|$CHUNK_DIRECT|$TTFT_DIRECT" "pingora floor|$CHUNK_FLOOR|$TTFT_FLOOR" "runestone, all on, in-process|$CHUNK_GATEWAY|$TTFT_GATEWAY")
  [ -z "$CHUNK_PGO" ] || [ -z "$TTFT_PGO" ] || stream_rows+=("runestone, all on, in-process, profile-guided|$CHUNK_PGO|$TTFT_PGO")
  for row in "${stream_rows[@]}"; do
    IFS='|' read -r name chunk ttft <<<"$row"
    python3 -c "
import json, sys
c, t, c0, t0 = (json.loads(a) for a in sys.argv[2:6])
add = lambda d, b, k: '%+d' % (d[k] - b[k])
print(f\"| {sys.argv[1]} | {c['chunks']} | {c['p50_us']} / {c['p99_us']} / {c['p999_us']} | {add(c, c0, 'p50_us')} / {add(c, c0, 'p99_us')} | {t['ttft_p50_us']} / {t['ttft_p99_us']} | {add(t, t0, 'ttft_p50_us')} / {add(t, t0, 'ttft_p99_us')} |\")" \
      "$name" "$chunk" "$ttft" "$CHUNK_DIRECT" "$TTFT_DIRECT"
  done
)
echo
echo "$table"

machine="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | sed 's/^ *//')"
{
  echo "# Benchmarks"
  echo
  echo "Made by \`$([ "$PGO" = 1 ] || echo "PGO=$PGO ")DURATION=$DURATION REPEAT=$REPEAT scripts/bench.sh\` on $(date -u +%Y-%m-%d) at $(git rev-parse --short HEAD)."
  echo "Machine: $machine. $(rustc --version). wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}'), $(oha --version)."
  echo
  echo "Closed loop: \`wrk -t1 -c$CONNECTIONS -d${DURATION}s --latency\` after a 2 s warm-up, one non-streaming chat request"
  echo "(a 16-token answer from runestone-mock, no added latency); $REPEAT rounds in which the paths take turns, medians reported."
  echo "Open loop: \`oha -z ${DURATION}s -q RATE --latency-correction -c $CONNECTIONS\`, $REPEAT rounds in which the paths take turns, medians reported;"
  echo "CPU is the process's user + system time over the run (/proc), per 1,000 requests/s served."
  echo "Peak RSS is the process's VmHWM at the end of its closed-loop run (32 connections)."
  echo "Pinning: the process under test alone on CPU 0 (runestone-mock for \"direct\" in the closed"
  echo "loop, the floor proxy, or runestone with \`threads: 1\`); the load generator, runestone-mock as"
  echo "the upstream and Redis (one server, or the three primaries of the Cluster) share CPU 1. In the open loop \"direct\" is that same upstream mock on"
  echo "CPU 1 (its CPU column is the mock's), so the added latency is the proxy hop's alone."
  echo "\"All on\" means RPM, TPM and concurrency limits (set high enough"
  echo "never to refuse), cost accounting, breakers and metrics (access log off, as for the others,"
  echo "but the row that writes it to a file on the same disk, as operators run it; the row with"
  echo "traces exports every request's spans over OTLP/HTTP to a sink in runestone-mock on CPU 1;"
  echo "in the row with cache hits every request is the same, so all but the first are answered from"
  echo "the in-process cache without a provider call);"
  echo "every runestone path authenticates and meters usage. The floor is benches/floor.rs: a bare"
  echo "Pingora proxy with no filters. Both use the system allocator (glibc)."
  echo "Rows ending \"profile-guided\" are the same sources built by scripts/pgo.sh (trained on"
  echo "scripts/pgo-mix.lua, not on the bench's request), the floor among them; their second ratio"
  echo "is to that profile-guided floor, so what such a build gives any Pingora proxy is not counted"
  echo "as the gateway's own."
  echo
  echo "Peers, in front of the same upstream mock and pinned the same way (alone on CPU 0): Portkey's"
  echo "gateway (\`@portkey-ai/gateway\` $PORTKEY_VERSION from npm, one Node.js $(node --version 2>/dev/null) process, told the upstream"
  echo "by its \`x-portkey-*\` headers) and the LiteLLM proxy (\`litellm[proxy]\` $LITELLM_VERSION from PyPI, one"
  echo "worker, a master key, no database). Neither meters a tenant's limits the way the \"all on\" rows"
  echo "do; they are what a user would run instead. Installed by this script when missing, into"
  echo "~/.cache/runestone-bench-peers (or BENCH_PEERS_DIR)."
  echo
  echo "Streams: scripts/open_streams.py opens N streaming requests (runestone-mock paces 2 tokens/s)"
  echo "and reads the proxy's VmRSS while all are open. Chunk delay: runestone-mock --stamp-chunks"
  echo "writes CLOCK_MONOTONIC into each token; benches/chunk_delay.rs (a thread per stream) subtracts"
  echo "it on arrival, and times each stream's first token from the request; the gateway's share"
  echo "is the difference between the two rows (\"added\"). Direct is the same stamping mock on CPU 1;"
  echo "the floor and the gateways all run (on CPU 0) and the paths take turns, round after round."
  echo
  echo "$table"
  echo
  echo "Micro-benchmarks of the hot functions: \`cargo bench --bench hot_paths\` (criterion)."
  echo "How the hot path was profiled, what changed and what is left: docs/performance.md."
} > docs/BENCHMARKS.md
echo
echo "written to docs/BENCHMARKS.md"
