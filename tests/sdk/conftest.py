"""Fixtures for the OpenAI Python SDK suite.

Starts the real `runestone-mock` and `runestone` binaries (built by
`cargo build`, found in target/debug unless RUNESTONE_BIN_DIR says
otherwise) on free loopback ports, waits for readiness, and stops them.
"""

import hashlib
import http.server
import json
import threading
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("RUNESTONE_BIN_DIR", ROOT / "target" / "debug"))

TENANT_KEY = "sk-sdk-tenant-key-0001"
RESTRICTED_KEY = "sk-sdk-restricted-key-0002"
PROVIDER_KEY = "sk-sdk-provider-key-0003"
LIMITED_KEY = "sk-sdk-limited-key-0004"
BROKE_KEY = "sk-sdk-broke-key-0005"


def _ephemeral_low() -> int:
    """The lowest port of the kernel's ephemeral range (32768 if unknown)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports free_port() has handed out in this process: never handed twice (a
# server given one may not have bound it yet, or may have stopped).
_handed_out: set = set()


def free_port() -> int:
    """A free TCP port on 127.0.0.1, below the kernel's ephemeral range.

    A port from `bind(0)` comes from the ephemeral range, the one the local
    ports of outgoing connections come from too: between this check and the
    server binding it, any connection (a gateway's to its provider, a
    client's) could take it, and the server would not start. Ports below
    that range are never given to connections. So: a random port in
    [10000, ephemeral low) (random, so test processes running side by side
    rarely try the same ones), free if it can be bound now, and not one
    this process handed out before. As tests/common/mod.rs does for the
    Rust tests.
    """
    low = _ephemeral_low()
    span = low - 10_000
    if span < 1_000:
        # An ephemeral range tuned down to the low ports: none below it to
        # spare, so one from the kernel.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    start = random.randrange(span)
    for step in range(span):
        port = 10_000 + (start + step) % span
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port below the ephemeral range ({low})")


def wait_ready(url: str, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited during start-up with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=0.5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready at {url}")
        time.sleep(0.02)


class Mock:
    """A running runestone-mock and its control API."""

    def __init__(self, *args: str):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(BIN_DIR / "runestone-mock"), "--listen", f"127.0.0.1:{self.port}", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_ready(f"http://127.0.0.1:{self.port}/health", self.proc, "runestone-mock")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}") as resp:
            return json.load(resp)

    def requests(self) -> list:
        return self._get("/_mock/requests")

    def stats(self) -> dict:
        return self._get("/_mock/stats")

    def fault(self, spec: dict) -> None:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/_mock/faults",
            data=json.dumps(spec).encode(),
            headers={"content-type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(req).close()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Runestone:
    """A running runestone on the config `config(port, metrics_port, dir)`
    returns; its SDK client, metrics and output."""

    def __init__(self, config, env=None):
        self.port = free_port()
        self.metrics_port = free_port()
        self.dir = tempfile.TemporaryDirectory(prefix="runestone-sdk-")
        path = Path(self.dir.name) / "runestone.yaml"
        path.write_text(config(self.port, self.metrics_port, self.dir.name))
        self.log_path = Path(self.dir.name) / "gateway.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(BIN_DIR / "runestone"), "--config", str(path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        wait_ready(f"http://127.0.0.1:{self.port}/health", self.proc, "runestone")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, key: str = TENANT_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=30)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as resp:
            return resp.read().decode()

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()
        self.dir.cleanup()


def server_yaml(port: int, metrics_port: int, directory: str) -> str:
    """The `server:` section every test config starts with."""
    return f"""
server:
  listen: "127.0.0.1:{port}"
  metrics_listen: "127.0.0.1:{metrics_port}"
  threads: 2
  max_request_body_bytes: 1048576
  grace_period_seconds: 1
  pid_file: "{directory}/gw.pid"
  upgrade_sock: "{directory}/gw.sock"
"""


class Gateway(Runestone):
    """runestone in front of one runestone-mock (several provider kinds)."""

    def __init__(self, mock: Mock, extra_models: str = ""):
        restricted = "sha256:" + hashlib.sha256(RESTRICTED_KEY.encode()).hexdigest()

        def config(port, metrics_port, directory):
            return server_yaml(port, metrics_port, directory) + f"""
providers:
  - {{ name: mock, kind: openai, base_url: "{mock.base_url}", api_key: "{PROVIDER_KEY}" }}
  - {{ name: dead, kind: openai, base_url: "http://127.0.0.1:{free_port()}/v1" }}
  - {{ name: claude, kind: anthropic, base_url: "http://127.0.0.1:{mock.port}", api_key: "{PROVIDER_KEY}" }}
  - {{ name: azure, kind: azure, base_url: "http://127.0.0.1:{mock.port}", api_key: "{PROVIDER_KEY}", api_version: "2024-10-21" }}
models:
  - name: gpt-4o-mini
    targets: [{{ provider: mock, model: mock-small }}]
  - name: text-embedding-3-small
    targets: [{{ provider: mock }}]
  - name: unreachable
    targets: [{{ provider: dead }}]
  - name: claude
    targets: [{{ provider: claude, model: claude-test }}]
  - name: azure-chat
    targets: [{{ provider: azure, model: my-chat-deployment }}]
  - name: azure-embed
    targets: [{{ provider: azure, model: my-embedding-deployment }}]
{extra_models}
tenants:
  - id: acme
    keys: ["{TENANT_KEY}"]
  - id: restricted
    keys: ["{restricted}"]
    models: [text-embedding-3-small]
  - id: limited
    keys: ["{LIMITED_KEY}"]
    limits: {{ requests_per_minute: 2 }}
  - id: broke
    keys: ["{BROKE_KEY}"]
    limits: {{ budget_usd: {{ amount: 0.000001, period: total }} }}
pricing:
  gpt-4o-mini: {{ input: 1.0, output: 2.0 }}
"""

        super().__init__(config, env={"RUST_LOG": "debug"})


class Llmock:
    """A running llmock server (PyPI: an OpenAI-compatible server we did not
    write), its journal and its scenario API."""

    def __init__(self):
        self.port = free_port()
        exe = Path(sys.executable).parent / "llmock"
        self.proc = subprocess.Popen(
            [str(exe), "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "warning", "--response-style", "static", "--tool-mode", "off"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_ready(f"http://127.0.0.1:{self.port}/health", self.proc, "llmock", timeout=30)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.load(resp)

    def journal(self) -> list:
        return self._call("GET", "/_llmock/requests")["requests"]

    def scenario(self, *behaviors: dict) -> None:
        """Queues fault behaviours (llmock's `/_llmock/scenario`)."""
        self._call("POST", "/_llmock/scenario", {"behaviors": list(behaviors)})

    def reset(self) -> None:
        self._call("POST", "/_llmock/reset", {})

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def mock():
    m = Mock("--api-key", PROVIDER_KEY, "--tokens-per-second", "200")
    yield m
    m.stop()


@pytest.fixture(scope="module")
def gateway(mock):
    g = Gateway(mock)
    yield g
    g.stop()


@pytest.fixture()
def client(gateway):
    return gateway.client()


class Redis:
    """A redis-server of its own on a free loopback port, nothing saved."""

    def __init__(self):
        self.port = free_port()
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class LocalServer:
    """An HTTP server of the test's own on a free loopback port (a scripted
    provider, a trace collector): `post(request, body)` answers each POST
    with `(status, content_type or None, bytes)`, or with None when it wrote
    its answer itself (raw, on `request.wfile`), which ends the connection."""

    def __init__(self, post):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                answer = post(self, body)
                if answer is None:
                    self.close_connection = True
                    return
                status, content_type, data = answer
                self.send_response(status)
                if content_type:
                    self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.server.shutdown()
