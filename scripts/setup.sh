#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build, test and demo Runestone:
# cmake (Pingora's zlib-ng), redis-server, curl, openssl, Node.js, a Python
# venv (.venv) with the official OpenAI SDK and pytest, and the official
# OpenAI Node SDK (tests/sdk-node). Safe to run again: it skips what is there.
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

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import openai, pytest, httpx, llmock, opentelemetry.proto' 2>/dev/null; then
  echo "setup: creating .venv with the OpenAI SDK, pytest, llmock and opentelemetry-proto"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r tests/sdk/requirements.txt
fi

# The official OpenAI Node SDK, pinned by tests/sdk-node/package-lock.json.
if [ ! -d tests/sdk-node/node_modules/openai ]; then
  echo "setup: installing the OpenAI Node SDK (tests/sdk-node)"
  (cd tests/sdk-node && npm ci --no-audit --no-fund --silent)
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
