#!/usr/bin/env bash
# Profile-guided release build: the gateway is built once with counters,
# run through a mix of traffic (scripts/pgo-mix.lua: chat, streams, a
# failover, embeddings, Responses, refused and malformed requests; in
# process, with Redis and with the access log to a file; runestone-mock as
# the provider), and built again from what the counters saw. Same sources,
# same behaviour: the compiler lays out and inlines for the paths that run.
# docs/performance.md, "a profile-guided build", says what it buys.
#
#   scripts/pgo.sh            # target/pgo/release/runestone
#   scripts/pgo.sh --floor    # target/pgo-floor/release/examples/floor
#                             # (the bench's floor, trained the same way)
#   scripts/pgo.sh --check    # no build: the debug gateway through the same
#                             # mix, to see that it still serves it
#                             # (scripts/test.sh)
#
# Needs llvm-profdata of the LLVM rustc is built on (`rustc -vV`): rustup's
# llvm-tools component, or Debian's llvm-<major>, installed when missing.
# Takes about twice a release build's time. Loopback only; stops what it
# starts.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-gateway}
case "$mode" in
  gateway | --floor | --check) ;;
  *) echo "usage: scripts/pgo.sh [--floor | --check]" >&2; exit 2 ;;
esac
profiles=$PWD/target/pgo-profiles

sudo_cmd=""
[ "$(id -u)" -eq 0 ] || sudo_cmd=sudo
# apt_install PACKAGE...: Debian's packages, the lists refreshed if need be.
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  $sudo_cmd apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 \
    || { $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
}
for tool in redis-server wrk curl; do
  command -v "$tool" >/dev/null || apt_install "$tool"
done

# llvm-profdata of rustc's own LLVM: a profile is read only by the
# version that wrote it.
major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
find_profdata() {
  local host candidate
  host=$(rustc -vV | sed -n 's/^host: //p')
  for candidate in "$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata" \
    "/usr/lib/llvm-$major/bin/llvm-profdata" "$(command -v "llvm-profdata-$major" || true)"; do
    [ -x "$candidate" ] && { echo "$candidate"; return 0; }
  done
  return 1
}
need_profdata() {
  profdata=$(find_profdata) && return 0
  echo "pgo: installing llvm-profdata for LLVM $major" >&2
  rustup component add llvm-tools >/dev/null 2>&1 || apt_install "llvm-$major" || true
  profdata=$(find_profdata) || {
    echo "pgo: no llvm-profdata for LLVM $major here (rustup component add llvm-tools, or Debian's llvm-$major)" >&2
    exit 1
  }
}

# What runs through the mix, and the provider it is sent to.
case "$mode" in
  --check)
    cargo build --locked -p runestone --bin runestone
    cargo build --locked -p runestone-mock
    trained=target/debug/runestone mock=target/debug/runestone-mock ;;
  *)
    need_profdata
    what=(--bin runestone) trained=target/pgo-generate/release/runestone
    [ "$mode" = --floor ] && what=(--example floor) trained=target/pgo-generate/release/examples/floor
    rm -rf "$profiles"
    mkdir -p "$profiles"
    echo "pgo: building ${what[*]} with counters (target/pgo-generate)" >&2
    CARGO_TARGET_DIR=target/pgo-generate RUSTFLAGS="-Cprofile-generate=$profiles" \
      cargo build --release --locked "${what[@]}"
    # Build scripts ran with counters too: only the traffic below counts.
    rm -f "$profiles"/*.profraw
    cargo build --release --locked -p runestone-mock
    mock=target/release/runestone-mock ;;
esac

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 600); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "pgo: nothing listened on port $1" >&2
  exit 1
}
mock_port=$(free_port)
redis_port=$(free_port)
"$mock" --listen "127.0.0.1:$mock_port" >/dev/null 2>&1 &
pids+=($!)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
pids+=($!)
wait_port "$mock_port"
wait_port "$redis_port"

# serve_mix STATE: the binary serves the mix for a few seconds, in process,
# with Redis or with the access log to a file, and is stopped as operators
# stop it (a counting build writes its counters as it exits).
serve_mix() {
  local port pid extra="" log=false sent refused
  port=$(free_port)
  if [ "$mode" = --floor ]; then
    "$trained" "127.0.0.1:$port" "127.0.0.1:$mock_port" >/dev/null 2>&1 &
  else
    [ "$1" = redis ] && extra="redis: { url: \"redis://127.0.0.1:$redis_port/0\" }"
    [ "$1" = access-log ] && log=true
    cat >"$work/gw.yaml" <<YAML
server:
  listen: "127.0.0.1:$port"
  metrics_listen: "127.0.0.1:$(free_port)"
  threads: 1
  access_log: $log
  grace_period_seconds: 1
  pid_file: "$work/gw.pid"
  upgrade_sock: "$work/gw.sock"
providers:
  - { name: mock, base_url: "http://127.0.0.1:$mock_port/v1", api_key: "sk-pgo-provider-key" }
  - { name: down, base_url: "http://127.0.0.1:$(free_port)/v1", api_key: "sk-pgo-provider-down" }
models:
  - name: gpt-4o-mini
    targets: [{ provider: mock, model: mock-small }]
  - name: gpt-4o
    targets: [{ provider: down, model: mock-large }, { provider: mock, model: mock-large }]
  - name: text-embedding-3-small
    targets: [{ provider: mock, model: mock-embed }]
pricing:
  gpt-4o-mini: { input: 0.15, output: 0.60 }
  gpt-4o: { input: 2.50, output: 10.00 }
  text-embedding-3-small: { input: 0.02, output: 0 }
tenants:
  - id: limited
    keys: ["sk-pgo-tenant-limited"]
    limits: { requests_per_minute: 100000000, tokens_per_minute: 100000000000, max_concurrent: 100000, budget_usd: { amount: 100000.0, period: monthly } }
  - id: open
    keys: ["sk-pgo-tenant-open"]
$extra
YAML
    "$trained" --config "$work/gw.yaml" >"$work/access.log" 2>"$work/gw.log" &
  fi
  pid=$!
  pids+=("$pid")
  wait_port "$port"
  wrk -t1 -c16 -d"${PGO_SECONDS:-4}s" -s scripts/pgo-mix.lua "http://127.0.0.1:$port" >"$work/wrk.out"
  kill -INT "$pid"
  wait "$pid" || { echo "pgo: $trained did not stop cleanly ($1):" >&2; cat "$work/gw.log" >&2 2>/dev/null; exit 1; }
  # Most of the mix is answered (3 of its 19 requests are refused), so a
  # config the gateway no longer serves as meant is seen here.
  sent=$(awk '/requests in/ {print $1}' "$work/wrk.out")
  refused=$(awk '/Non-2xx or 3xx responses/ {print $5}' "$work/wrk.out")
  echo "pgo: $1: $sent requests, ${refused:-0} refused" >&2
  if [ "${sent:-0}" -lt 100 ] || [ $((${refused:-0} * 3)) -gt "$sent" ]; then
    echo "pgo: $1: the mix was not served as meant" >&2
    cat "$work/wrk.out" "$work/gw.log" >&2 2>/dev/null
    exit 1
  fi
}
if [ "$mode" = --floor ]; then
  serve_mix floor
else
  serve_mix in-process
  serve_mix redis
  serve_mix access-log
fi
[ "$mode" != --check ] || exit 0

dir=target/pgo binary=release/runestone
[ "$mode" = --floor ] && dir=target/pgo-floor binary=release/examples/floor
"$profdata" merge -o "$profiles/merged.profdata" "$profiles"/*.profraw
# From nothing: cargo would not see that the profile changed.
rm -rf "$dir"
echo "pgo: building ${what[*]} from the profile ($dir)" >&2
CARGO_TARGET_DIR=$dir RUSTFLAGS="-Cprofile-use=$profiles/merged.profdata -Cllvm-args=-pgo-warn-missing-function=false" \
  cargo build --release --locked "${what[@]}"
echo "pgo: $dir/$binary" >&2
