#!/usr/bin/env bash
# Profile-guided release build: the gateway is built once with counters,
# run through a mix of traffic (scripts/pgo-mix.lua: chat, streams, a
# failover, embeddings, Responses, refused and malformed requests; in
# process, with Redis, with Redis and `redis.lease`, and with the access
# log to a file; runestone-mock as the provider), and built again from what the counters saw. Same sources,
# same behaviour: the compiler lays out and inlines for the paths that run.
# docs/performance.md, "a profile-guided build", says what it buys.
#
#   scripts/pgo.sh            # target/pgo/release/runestone
#   scripts/pgo.sh --floor    # target/pgo-floor/release/examples/floor
#                             # (the bench's floor, trained the same way)
#   scripts/pgo.sh --check    # no build: the debug gateway through the same
#                             # mix, to see that it still serves it as the
#                             # mix expects (scripts/test.sh)
#   scripts/pgo.sh --sources  # what a build would be stamped as built from
#                             # (target/pgo/built-from; scripts/bench.sh's
#                             # PGO=built compares)
#
# Each state's traffic must be answered as the mix expects (its statuses in
# their shares, no socket errors, Redis up in the Redis states, admissions
# against quota taken ahead in the lease state), or the script stops and
# shows the gateway's log: a build is not trained on refusals. Needs
# llvm-profdata of the LLVM rustc is built on (`rustc -vV`): rustup's
# llvm-tools component, or Debian's llvm-<major>, installed when missing. Takes about two and a half times a release build's time.
# One at a time in a checkout (a lock under target/). Loopback only; stops
# what it starts.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the build is made from: the trees of the sources at HEAD (so a
# commit that changes only tests or docs keeps a build good) and what the
# checkout changed in them; fails outside a git checkout.
sources() {
  git rev-parse HEAD:src HEAD:crates HEAD:benches HEAD:Cargo.toml HEAD:Cargo.lock \
    && git status --porcelain --untracked-files=no -- src crates benches Cargo.toml Cargo.lock
}

mode=${1:-gateway}
case "$mode" in
  gateway | --floor | --check) ;;
  --sources) sources; exit ;;
  *) echo "usage: scripts/pgo.sh [--floor | --check | --sources]" >&2; exit 2 ;;
esac
case "$PWD" in
  *[[:space:]]*) echo "pgo: the checkout's path has a space, which RUSTFLAGS cannot carry: $PWD" >&2; exit 1 ;;
esac
target=${CARGO_TARGET_DIR:-target}
mkdir -p "$target"
profiles_root=$(cd "$target" && pwd)/pgo-profiles
exec 9>"$target/pgo.lock"
flock -n 9 || { echo "pgo: another scripts/pgo.sh runs in this checkout; waiting for it" >&2; flock 9; }

sudo_cmd=""
[ "$(id -u)" -eq 0 ] || sudo_cmd=sudo
# apt_install PACKAGE...: Debian's packages, the lists refreshed if need be.
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  $sudo_cmd apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 \
    || { $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
}
for tool in redis-server wrk curl python3; do
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

# What runs through the mix, and the provider it is sent to. The user's
# own RUSTFLAGS are kept beside the profile's.
case "$mode" in
  --check)
    cargo build --locked -p runestone --bin runestone
    cargo build --locked -p runestone-mock
    trained=$target/debug/runestone mock=$target/debug/runestone-mock ;;
  *)
    need_profdata
    what=(--bin runestone) trained=$target/pgo-generate/release/runestone
    dir=$target/pgo binary=release/runestone profiles=$profiles_root/gateway
    if [ "$mode" = --floor ]; then
      what=(--example floor) trained=$target/pgo-generate/release/examples/floor
      dir=$target/pgo-floor binary=release/examples/floor profiles=$profiles_root/floor
    fi
    rm -rf "$profiles"
    mkdir -p "$profiles"
    echo "pgo: building ${what[*]} with counters ($target/pgo-generate)" >&2
    CARGO_TARGET_DIR=$target/pgo-generate RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$profiles" \
      cargo build --release --locked "${what[@]}"
    # Build scripts ran with counters too: only the traffic below counts.
    rm -f "$profiles"/*.profraw
    cargo build --release --locked -p runestone-mock
    mock=$target/release/runestone-mock ;;
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
# fail WHAT: says what went wrong, with the gateway's log, and stops.
fail() {
  echo "pgo: $1" >&2
  [ -s "$work/gw.log" ] && { echo "pgo: its log:" >&2; tail -n 40 "$work/gw.log" >&2; }
  exit 1
}
# wait_port PORT PID NAME: until PID listens on PORT; stops at once if it exits.
wait_port() {
  for _ in $(seq 1 600); do
    (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || fail "$3 exited before it listened on port $1"
    sleep 0.05
  done
  fail "$3 did not listen on port $1 within 30 s"
}
mock_port=$(free_port)
redis_port=$(free_port)
"$mock" --listen "127.0.0.1:$mock_port" >/dev/null 2>&1 &
pids+=($!)
wait_port "$mock_port" "$!" runestone-mock
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
pids+=($!)
wait_port "$redis_port" "$!" redis-server

# reports METRICS_PORT PATTERN: whether the gateway's metrics have a line
# matching PATTERN. Read whole first: `curl | grep -q` under pipefail fails
# when grep stops reading before curl has written everything.
reports() {
  local text
  text=$(curl -fsS "http://127.0.0.1:$1/metrics") && grep -q "$2" <<<"$text"
}

# redis_up METRICS_PORT: whether the gateway reports Redis up within 5 s.
redis_up() {
  local _
  for _ in $(seq 50); do
    reports "$1" '^runestone_redis_up 1' && return 0
    sleep 0.1
  done
  return 1
}

# serve_mix STATE: the binary serves the mix for a few seconds, in process,
# with Redis or with the access log to a file, is held to what the mix
# expects, and is stopped as operators stop it (a counting build writes
# its counters as it exits).
serve_mix() {
  local port metrics pid extra="" log=false verdict rc
  port=$(free_port) metrics=$(free_port)
  : >"$work/gw.log"
  if [ "$mode" = --floor ]; then
    "$trained" "127.0.0.1:$port" "127.0.0.1:$mock_port" >/dev/null 2>"$work/gw.log" &
  else
    [ "$1" = redis ] && extra="redis: { url: \"redis://127.0.0.1:$redis_port/0\" }"
    # redis.lease: most admissions against quota taken ahead.
    [ "$1" = redis-lease ] && extra="redis: { url: \"redis://127.0.0.1:$redis_port/0\", lease: { share: 0.05 } }"
    [ "$1" = access-log ] && log=true
    cat >"$work/gw.yaml" <<YAML
server:
  listen: "127.0.0.1:$port"
  metrics_listen: "127.0.0.1:$metrics"
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
  wait_port "$port" "$pid" "$trained"
  wrk -t1 -c16 -d"${PGO_SECONDS:-4}s" -s scripts/pgo-mix.lua "http://127.0.0.1:$port" >"$work/wrk.out" 2>&1 \
    || { cat "$work/wrk.out" >&2; fail "$1: wrk failed"; }
  # An answer slower than `timeout_ms` under the load (a debug build's,
  # say) marks Redis down until the next probe, half a second later: give
  # it a few probes to come back before calling Redis missing.
  if [[ "$1" == redis* ]] && ! redis_up "$metrics"; then
    fail "$1: the gateway did not have Redis (runestone_redis_up is not 1)"
  fi
  if [ "$1" = redis-lease ] && ! reports "$metrics" '^runestone_leased_admissions_total{tenant="limited"} [1-9]'; then
    fail "$1: no admission was made against quota taken ahead"
  fi
  kill -0 "$pid" 2>/dev/null || fail "$trained exited while serving the mix ($1)"
  kill -INT "$pid" 2>/dev/null || true
  rc=0
  wait "$pid" || rc=$?
  [ "$rc" = 0 ] || fail "$trained stopped with exit code $rc ($1)"
  # Every status in its share of the mix, give or take two points (the
  # requests cut off at the run's end), none it does not expect (the
  # floor forwards every request, so it is held only to answering them),
  # and no socket errors.
  verdict=$(awk -v floor="$([ "$mode" = --floor ] && echo 1 || echo 0)" '
    /^mix: / {
      for (i = 2; i <= NF; i++) {
        split($i, kv, "="); split(kv[2], sv, "/")
        if (kv[1] == "total") { total = kv[2]; continue }
        seen[kv[1]] = sv[1]; share[kv[1]] = sv[2]
      }
    }
    /Socket errors/ { errors = $0 }
    END {
      if (total < 500) { print "too few answers: " total + 0; exit }
      if (errors != "") { print errors; exit }
      if (floor) { exit }
      for (s in seen) {
        d = seen[s] / total - share[s]
        if (d > 0.02 || d < -0.02) bad = bad sprintf(" %s: %.1f%% of the answers, %.1f%% expected;", s, 100 * seen[s] / total, 100 * share[s])
      }
      if (bad != "") print bad
    }' "$work/wrk.out")
  echo "pgo: $1: $(grep '^mix:' "$work/wrk.out" || echo 'no answers counted')" >&2
  [ -z "$verdict" ] || { cat "$work/wrk.out" >&2; fail "$1: the mix was not answered as it expects:$verdict"; }
}
if [ "$mode" = --floor ]; then
  serve_mix floor
else
  serve_mix in-process
  serve_mix redis
  serve_mix redis-lease
  serve_mix access-log
fi
[ "$mode" != --check ] || exit 0

"$profdata" merge -o "$profiles/merged.profdata" "$profiles"/*.profraw
# From nothing: cargo would not see that the profile changed.
rm -rf "$dir"
echo "pgo: building ${what[*]} from the profile ($dir)" >&2
CARGO_TARGET_DIR=$dir RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$profiles/merged.profdata -Cllvm-args=-pgo-warn-missing-function=false" \
  cargo build --release --locked "${what[@]}"
# What it was built from, for scripts/bench.sh's PGO=built to check.
# Outside a git checkout there is nothing to check it against.
sources >"$dir/built-from" 2>/dev/null || echo "not a git checkout" >"$dir/built-from"
echo "pgo: $dir/$binary" >&2
