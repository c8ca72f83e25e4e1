#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build, test and demo Runestone:
# cmake (Pingora's zlib-ng), redis-server, curl, openssl, Node.js, a Python
# venv (.venv) with the official OpenAI SDK and pytest, and the official
# OpenAI Node SDK (tests/sdk-node) with Node.js 22 or later. Safe to run
# again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v redis-server >/dev/null || need+=(redis-server)
command -v curl >/dev/null || need+=(curl)
command -v openssl >/dev/null || need+=(openssl)
command -v python3 >/dev/null || need+=(python3)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
  echo "setup: installing ${need[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with the OpenAI SDK, pytest, llmock and opentelemetry-proto"
  python3 -m venv .venv
fi
# Also when .venv holds versions tests/sdk/requirements.txt no longer takes
# (pip asks the index only for what is not satisfied).
.venv/bin/pip install -q --disable-pip-version-check -r tests/sdk/requirements.txt

# The official OpenAI Node SDK, pinned by tests/sdk-node/package-lock.json
# (installed again when another version is there).
want=$(node -p 'require("./tests/sdk-node/package.json").dependencies.openai')
have=$(node -p 'require("./tests/sdk-node/node_modules/openai/package.json").version' 2>/dev/null || true)
if [ "$want" != "$have" ]; then
  echo "setup: installing the OpenAI Node SDK $want (tests/sdk-node)"
  (cd tests/sdk-node && npm ci --no-audit --no-fund --silent)
fi
# It needs Node.js 22 or later: where the system's is older, Node.js 22 from
# the npm registry (the `node` package's build for this machine) goes under
# .tools/node, and scripts/test.sh runs the suite with it.
if [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 22 ] && [ ! -x .tools/node/node_modules/node/bin/node ]; then
  echo "setup: installing Node.js 22 from npm into .tools/node (the system's is $(node --version))"
  npm install --prefix .tools/node --no-audit --no-fund --silent node@22 >/dev/null
fi

# promtool (for the metrics and alert-rule checks) comes inside Debian's
# prometheus package; only the one binary is unpacked, under .tools/.
if ! command -v promtool >/dev/null && [ ! -x .tools/bin/promtool ]; then
  echo "setup: unpacking promtool from Debian's prometheus package"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  tmp=$(mktemp -d)
  if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
    $sudo_cmd apt-get update -qq
    (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1)
  fi
  dpkg -x "$tmp"/prometheus_*.deb "$tmp/root"
  mkdir -p .tools/bin
  cp "$tmp/root/usr/bin/promtool" .tools/bin/promtool
  rm -rf "$tmp"
fi
