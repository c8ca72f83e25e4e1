#!/usr/bin/env bash
# The one test command (README and .ci/run call it): installs what the machine
# lacks, checks formatting and lints, then runs `cargo test` (unit tests and
# integration tests against the real binaries), the mix scripts/pgo.sh trains
# its build on (to see the gateway still serves it), and the OpenAI Python and
# Node SDK suites.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
fi
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --workspace --all-targets --quiet -- -D warnings
fi

cargo build --workspace --bins
cargo test --workspace

echo "== scripts/pgo.sh's training mix, through the debug build"
scripts/pgo.sh --check

echo "== OpenAI Python SDK suite"
RUNESTONE_BIN_DIR="$PWD/target/debug" .venv/bin/python -m pytest tests/sdk -q

echo "== OpenAI Node SDK suite"
# Node.js 22 or later, as the SDK needs: the system's, else the one
# scripts/setup.sh put under .tools/node.
node_bin=node
if [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 22 ]; then
  node_bin="$PWD/.tools/node/node_modules/node/bin/node"
fi
"$node_bin" --version
(cd tests/sdk-node && RUNESTONE_BIN_DIR="$PWD/../../target/debug" "$node_bin" --test)
