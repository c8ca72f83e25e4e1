"""Issue #21 through the official OpenAI Python SDK: the gateway's
OpenTelemetry spans, received by an OTLP/HTTP endpoint these tests run and
decoded with the official `opentelemetry-proto` package (Google's protobuf
runtime, not the gateway's encoder): a JSON chat, a stream, a failover to a
second deployment, a parked request, an async job linked to the request
that queued it; an incoming `traceparent` continued and passed to the
provider; a collector that is down or slow changes no answer; spans queued
at shutdown are flushed; keys never appear, content only when asked.
"""

import concurrent.futures
import json
import os
import signal
import socketserver
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from conftest import (BIN_DIR, PROVIDER_KEY, TENANT_KEY, Llmock, LocalServer, Mock, Runestone, free_port,
                      server_yaml, wait_ready)

OTHER_KEY = "sk-sdk-telemetry-other-0077"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


class Collector(LocalServer):
    """An OTLP/HTTP traces endpoint: decodes every export, or answers
    slowly, or refuses, as told."""

    def __init__(self):
        self.spans = []
        self.bodies = []
        self.headers = []
        self.delay = 0.0
        self.status = 200
        # Answer this many exports 503 ("later") before taking them.
        self.unavailable = 0
        self.lock = threading.Lock()
        super().__init__(self.export)

    def export(self, request, body):
        time.sleep(self.delay)
        with self.lock:
            unavailable = self.unavailable > 0
            self.unavailable -= int(unavailable)
        if self.status != 200 or unavailable:
            return 503 if unavailable else self.status, None, b""
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        with self.lock:
            self.bodies.append(body)
            self.headers.append(dict(request.headers))
            for resource_spans in export.resource_spans:
                resource = {a.key: value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append((resource, span))
        return 200, "application/x-protobuf", ExportTraceServiceResponse().SerializeToString()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def trace(self, request_id: str, count: int, timeout: float = 15.0) -> list:
        """The spans of the trace whose server span has this request id,
        once `count` of them have arrived."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                spans = [s for _, s in self.spans]
            roots = [s for s in spans if attrs(s).get("runestone.request_id") == request_id]
            if roots:
                trace_id = roots[0].trace_id
                found = [s for s in spans if s.trace_id == trace_id]
                if len(found) >= count:
                    return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(roots)} root span(s) for {request_id}, spans: {[s.name for s in spans]}")
            time.sleep(0.05)



def attrs(span) -> dict:
    return {a.key: value(a.value) for a in span.attributes}


def by_kind(spans, kind) -> list:
    return [s for s in spans if s.kind == kind]


class Gateway(Runestone):
    """runestone in front of runestone-mock, a failover model (a dead
    deployment first), a tenant limited to one request at a time with the
    overflow queue, async jobs, and telemetry to `endpoint`."""

    def __init__(self, mock: Mock, endpoint: str, extra: str = ""):
        def config(port, metrics_port, directory):
            return server_yaml(port, metrics_port, directory) + f"""
providers:
  - {{ name: mock, base_url: "{mock.base_url}", api_key: "{PROVIDER_KEY}" }}
  - {{ name: dead, base_url: "http://127.0.0.1:{free_port()}/v1", api_key: "{PROVIDER_KEY}" }}
models:
  - name: gpt-4o-mini
    targets: [{{ provider: mock, model: mock-small }}]
  - name: failing-over
    targets: [{{ provider: dead, model: dead-model }}, {{ provider: mock, model: mock-small }}]
tenants:
  - id: acme
    keys: ["{TENANT_KEY}"]
    overflow: {{ enabled: true }}
  - id: single
    keys: ["{OTHER_KEY}"]
    limits: {{ max_concurrent: 1 }}
    overflow: {{ enabled: true, max_wait_seconds: 30 }}
pricing:
  gpt-4o-mini: {{ input: 1.0, output: 2.0 }}
telemetry:
  otlp_endpoint: "{endpoint}"
  service_name: runestone-test
  headers: {{ authorization: "Bearer otlp-token-123" }}
{extra}
"""

        super().__init__(config)


@pytest.fixture(scope="module")
def collector():
    c = Collector()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def gateway(mock, collector):
    g = Gateway(mock, collector.endpoint)
    yield g
    g.stop()


def chat(gateway, model="gpt-4o-mini", key=TENANT_KEY, headers=None, **kwargs):
    raw = gateway.client(key).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hello there"}],
        extra_headers=headers or {}, **kwargs)
    return raw.headers["x-request-id"], raw.parse()


def access_line(gateway, request_id: str) -> dict:
    deadline = time.monotonic() + 10
    while True:
        for line in gateway.output().splitlines():
            if line.startswith("{") and f'"request_id":"{request_id}"' in line:
                return json.loads(line)
        if time.monotonic() > deadline:
            raise AssertionError(f"no access log line for {request_id}")
        time.sleep(0.05)


def test_a_json_chat_is_a_server_span_with_an_attempt_under_it(gateway, collector, mock):
    request_id, completion = chat(gateway, max_tokens=50)
    spans = collector.trace(request_id, 2)
    [server] = by_kind(spans, Span.SPAN_KIND_SERVER)
    [attempt] = by_kind(spans, Span.SPAN_KIND_CLIENT)
    a = attrs(server)
    assert server.name == "chat gpt-4o-mini"
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "gpt-4o-mini"
    assert a["gen_ai.response.model"] == completion.model
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.usage.input_tokens"] == completion.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == completion.usage.completion_tokens
    assert a["gen_ai.request.max_tokens"] == 50
    assert a["gen_ai.response.finish_reasons"] == [completion.choices[0].finish_reason]
    assert a["http.response.status_code"] == 200
    assert a["runestone.tenant"] == "acme"
    assert a["runestone.attempts"] == 1
    assert a["runestone.usage_estimated"] is False
    assert "openai.request.service_tier" not in a and "openai.response.service_tier" not in a
    expected = (completion.usage.prompt_tokens * 1.0 + completion.usage.completion_tokens * 2.0) / 1e6
    assert a["runestone.cost_usd"] == pytest.approx(expected)
    assert "error.type" not in a
    assert server.status.code == 0
    assert "runestone.first_token" in [e.name for e in server.events]
    assert server.start_time_unix_nano < server.end_time_unix_nano
    # The attempt: a child of the server span, at the provider.
    assert attempt.parent_span_id == server.span_id
    assert attempt.name == "chat mock-small"
    b = attrs(attempt)
    assert b["server.address"] == "127.0.0.1"
    assert b["server.port"] == mock.port
    assert b["http.response.status_code"] == 200
    assert b["runestone.deployment"] == "mock/mock-small"
    assert b["runestone.attempt.next"] == "answered"
    assert server.start_time_unix_nano <= attempt.start_time_unix_nano <= attempt.end_time_unix_nano <= server.end_time_unix_nano
    # The resource, the collector's header, and the trace id in the log.
    resource = next(r for r, s in collector.spans if s.span_id == server.span_id)
    assert resource["service.name"] == "runestone-test"
    assert collector.headers[-1].get("authorization") == "Bearer otlp-token-123"
    assert collector.headers[-1].get("content-type") == "application/x-protobuf"
    assert access_line(gateway, request_id)["trace_id"] == server.trace_id.hex()
    # The provider was given the attempt's span as parent.
    sent = mock.requests()[-1]["headers"]["traceparent"]
    assert sent == f"00-{server.trace_id.hex()}-{attempt.span_id.hex()}-01"


def test_a_stream_has_its_usage_and_first_token(gateway, collector):
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "stream please"}],
        stream=True, stream_options={"include_usage": True},
        service_tier="fast", extra_body={"mock_service_tier": "default"})
    request_id = raw.headers["x-request-id"]
    chunks = list(raw.parse())
    usage = chunks[-1].usage
    spans = collector.trace(request_id, 2)
    [server] = by_kind(spans, Span.SPAN_KIND_SERVER)
    a = attrs(server)
    assert a["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert a["gen_ai.response.model"] == chunks[0].model
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    # Asked for fast (priority), served at the standard tier.
    assert a["openai.request.service_tier"] == "priority"
    assert a["openai.response.service_tier"] == "default"
    [first] = [e for e in server.events if e.name == "runestone.first_token"]
    assert server.start_time_unix_nano < first.time_unix_nano <= server.end_time_unix_nano


def errors(gateway, reason: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in gateway.metrics().splitlines()
               if line.startswith(f'runestone_errors_total{{reason="{reason}"}}'))


def test_a_client_leaving_mid_stream_is_logged_billed_and_traced_as_such(gateway, collector, mock):
    # The SDK's client closes a stream it stops reading. Its access log
    # line said 200 and no error, as if the answer had been whole.
    closed = errors(gateway, "client_closed")
    mock.fault({"stall_after_chunks": 3, "stall_ms": 10000, "count": 1, "path": "/v1/chat/completions"})
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "a long story"}],
        stream=True, max_tokens=40)
    request_id = raw.headers["x-request-id"]
    stream = raw.parse()
    read = [next(stream) for _ in range(2)]
    stream.close()
    line = access_line(gateway, request_id)
    assert line["status"] == 200 and line["error"] == "client_closed"
    # What went by is billed, counted by the gateway (no usage came).
    assert line["completion_tokens"] >= len([c for c in read if c.choices and c.choices[0].delta.content])
    assert line["completion_tokens"] > 0 and line["usage_estimated"] is True
    assert line["cost_usd"] > 0
    assert errors(gateway, "client_closed") == closed + 1
    spans = collector.trace(request_id, 2)
    [server] = by_kind(spans, Span.SPAN_KIND_SERVER)
    [attempt] = by_kind(spans, Span.SPAN_KIND_CLIENT)
    assert attrs(server)["error.type"] == "client_closed"
    assert attrs(attempt)["error.type"] == "client_closed"
    assert attrs(attempt)["runestone.attempt.next"] == "answered"
    # A whole stream read to its end is no error.
    request_id, _ = chat(gateway)
    assert access_line(gateway, request_id)["error"] is None
    assert errors(gateway, "client_closed") == closed + 1


def test_a_provider_error_event_the_client_leaves_at_is_the_providers_failure(gateway, mock):
    # The SDK raises at the provider's in-band error event and closes the
    # stream, while the provider keeps its body open: the answer had failed
    # before the client left (it was logged client_closed, and no breaker
    # counted the failure).
    closed, broken = errors(gateway, "client_closed"), errors(gateway, "provider_stream_broken")
    mock.fault({"error_after_chunks": 3, "linger_ms": 5000, "count": 1, "path": "/v1/chat/completions"})
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "fails midway"}], stream=True,
        extra_headers={"x-request-id": "error-event-then-gone"})
    stream = raw.parse()
    with pytest.raises(openai.APIError, match="overloaded"):
        for _ in stream:
            pass
    stream.close()
    line = access_line(gateway, "error-event-then-gone")
    assert line["status"] == 200 and line["error"] == "provider_stream_broken"
    assert line["completion_tokens"] >= 3
    assert errors(gateway, "provider_stream_broken") == broken + 1
    assert errors(gateway, "client_closed") == closed


def chunk_event(delta, finish=None, **extra) -> str:
    """A chat completion chunk's SSE event."""
    return "data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", **extra,
                                  "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"


class ScriptedProvider:
    """A provider that answers every request with a 200 event stream of
    `events` (SSE text, each sent on its own; a number is a pause of that
    many seconds), then keeps its body open for `linger` seconds: any bytes
    a provider might send. `requests` counts the requests it got."""

    def __init__(self, events, linger=0.0):
        self.requests = 0
        provider = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                provider.requests += 1
                headers = {}
                self.rfile.readline()
                while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                    name, value = line.decode().split(":", 1)
                    headers[name.strip().lower()] = value.strip()
                self.rfile.read(int(headers.get("content-length", "0")))
                self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n")
                try:
                    for event in events:
                        if isinstance(event, (int, float)):
                            time.sleep(event)
                            continue
                        data = event.encode()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()
                    time.sleep(linger)
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def scripted_gateway(provider: ScriptedProvider, mock: Mock, failures: int = 1, kind: str = "openai") -> Runestone:
    """runestone with `scripted` (of provider `kind`) first and the mock
    second for gpt-4o-mini, each breaker opening at `failures` in a row."""
    base_url = provider.base_url.removesuffix("/v1") if kind == "anthropic" else provider.base_url

    def config(port, metrics_port, directory):
        return server_yaml(port, metrics_port, directory) + f"""
providers:
  - {{ name: scripted, kind: {kind}, base_url: "{base_url}", api_key: "{PROVIDER_KEY}", timeouts: {{ idle_ms: 30000 }} }}
  - {{ name: mock, base_url: "{mock.base_url}", api_key: "{PROVIDER_KEY}" }}
models:
  - name: gpt-4o-mini
    strategy: priority
    targets: [{{ provider: scripted, model: served }}, {{ provider: mock, model: mock-small }}]
tenants:
  - id: acme
    keys: ["{TENANT_KEY}"]
circuit_breaker: {{ consecutive_failures: {failures}, open_seconds: 30 }}
"""

    return Runestone(config)


def read_stream(gateway, request_id: str) -> list:
    """The events of a streamed chat read to its end with a plain client."""
    with httpx.stream("POST", f"http://127.0.0.1:{gateway.port}/v1/chat/completions", timeout=20,
                      headers={"authorization": f"Bearer {TENANT_KEY}", "x-request-id": request_id},
                      json={"model": "gpt-4o-mini", "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}) as answer:
        return [e for e in answer.read().decode().split("\n\n") if e.strip()]


TOKENS = [chunk_event({"role": "assistant", "content": ""})] + [chunk_event({"content": f"tok{i} "}) for i in range(3)]
VLLM_ERROR = ('data: {"object":"error","message":"overloaded","type":"InternalServerError",'
              '"param":null,"code":500}\n\n')


def test_a_stream_after_a_vllm_error_event_is_not_resumed_elsewhere(mock):
    # The error event went to the client; the stream was still resumable
    # (the record did not take this error shape as its end), and the next
    # deployment was asked to continue it: for nobody when the client had
    # left at the event (a paid call), and after the error when it read on.
    provider = ScriptedProvider(TOKENS + [VLLM_ERROR], linger=1.5)
    gateway = scripted_gateway(provider, mock, failures=5)
    try:
        before = len(mock.requests())
        read = b""
        with httpx.stream("POST", f"http://127.0.0.1:{gateway.port}/v1/chat/completions", timeout=20,
                          headers={"authorization": f"Bearer {TENANT_KEY}", "x-request-id": "gone-at-error"},
                          json={"model": "gpt-4o-mini", "stream": True,
                                "messages": [{"role": "user", "content": "hi"}]}) as answer:
            for piece in answer.iter_raw():
                read += piece
                if b'"object":"error"' in read:
                    break
        line = access_line(gateway, "gone-at-error")
        assert (line["attempts"], line["resumptions"], line["provider"]) == (1, 0, "scripted")
        # Its code (500) says it was the provider's failure.
        assert line["error"] == "provider_stream_broken"
        assert len(mock.requests()) == before
        # Read to its end: the error is the stream's last event.
        events = read_stream(gateway, "read-past-error")
        assert '"object":"error"' in events[-1], events
        line = access_line(gateway, "read-past-error")
        assert (line["attempts"], line["resumptions"], line["error"]) == (1, 0, "provider_stream_broken")
        assert len(mock.requests()) == before
    finally:
        gateway.stop()
        provider.stop()


@pytest.mark.parametrize("error,reason", [
    # TGI: its message in `error`, its class in `error_type`.
    ('data: {"error":"Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 9000",'
     '"error_type":"validation"}\n\n', "invalid_request"),
    # A prompt too long, said only in words.
    ('data: {"error":{"message":"This model\'s maximum context length is 4096 tokens. However, you requested '
     '9000 tokens."}}\n\n', "invalid_request"),
    # A request's fault whose code names a server.
    ('data: {"error":{"message":"bad url","type":"invalid_request_error","code":"invalid_mcp_server_url"}}\n\n',
     "invalid_request"),
    (VLLM_ERROR, "provider_stream_broken"),
    # The gateway's key refused: nothing said of the deployment's health.
    ('data: {"error":{"message":"Incorrect API key provided.","type":"invalid_request_error",'
     '"code":"invalid_api_key"}}\n\n', "provider_5xx"),
])
def test_an_error_event_ends_the_stream_at_once_and_is_judged_by_its_class(mock, error, reason):
    # What the provider sent after its error event went on to the client
    # (more text, a `[DONE]`, the gateway's own usage chunk), and a body
    # kept open after it held the client's stream until the idle timeout
    # (here 30 s). A request's fault told in TGI's words, or only in the
    # message, or in a code that names a server, opened the breaker.
    provider = ScriptedProvider(TOKENS + [error, chunk_event({"content": "after"}), "data: [DONE]\n\n"],
                                linger=20)
    gateway = scripted_gateway(provider, mock)
    try:
        started = time.monotonic()
        events = read_stream(gateway, "error-then-more")
        assert time.monotonic() - started < 10
        assert events[-1] == error.strip(), events
        line = access_line(gateway, "error-then-more")
        assert (line["status"], line["error"], line["provider"]) == (200, reason, "scripted"), line
        assert line["completion_tokens"] >= 3
        # A request's fault leaves the deployment serving.
        read_stream(gateway, "next")
        then = "mock" if reason == "provider_stream_broken" else "scripted"
        assert access_line(gateway, "next")["provider"] == then
    finally:
        gateway.stop()
        provider.stop()


def test_an_empty_error_member_in_every_chunk_is_no_error(mock):
    # Some servers put `"error": ""` (or false, or {}) in every chunk: a
    # whole stream was taken for the provider's failure and opened the
    # breaker, and (with an error ending what the client gets) cut short.
    events = [chunk_event({"role": "assistant", "content": ""}, error=""),
              chunk_event({"content": "hel"}, error=False),
              chunk_event({"content": "lo"}, error={}),
              chunk_event({}, finish="stop", error=None), "data: [DONE]\n\n"]
    provider = ScriptedProvider(events)
    gateway = scripted_gateway(provider, mock)
    try:
        chunks = list(gateway.client().chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True,
            extra_headers={"x-request-id": "empty-errors"}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello"
        line = access_line(gateway, "empty-errors")
        assert (line["error"], line["provider"]) == (None, "scripted")
        read_stream(gateway, "next")
        assert access_line(gateway, "next")["provider"] == "scripted"
    finally:
        gateway.stop()
        provider.stop()


def test_a_responses_stream_ended_by_a_server_error_is_the_providers_failure_when_the_client_leaves(gateway, mock):
    # Its `error` event (code server_error) ends a Responses stream: the
    # provider failed, whether the client reads on to the body's end or
    # leaves at the event.
    closed, broken = errors(gateway, "client_closed"), errors(gateway, "provider_stream_broken")
    mock.fault({"error_after_chunks": 3, "linger_ms": 5000, "count": 1, "path": "/v1/responses"})
    read = b""
    with httpx.stream("POST", f"http://127.0.0.1:{gateway.port}/v1/responses", timeout=20,
                      headers={"authorization": f"Bearer {TENANT_KEY}", "x-request-id": "responses-error-gone"},
                      json={"model": "gpt-4o-mini", "stream": True, "input": "fails midway"}) as answer:
        for piece in answer.iter_raw():
            read += piece
            if b"overloaded" in read:
                break
    line = access_line(gateway, "responses-error-gone")
    assert line["status"] == 200 and line["error"] == "provider_stream_broken"
    assert errors(gateway, "provider_stream_broken") == broken + 1
    assert errors(gateway, "client_closed") == closed


class PairGateway(Runestone):
    """Two deployments of one model on runestone-mock in priority order,
    `first` then `second`, as OpenAI-compatible servers (`pair`) and as
    Anthropic (`claude-pair`); a breaker opens at its first failure."""

    def __init__(self, mock: Mock):
        def config(port, metrics_port, directory):
            return server_yaml(port, metrics_port, directory) + f"""
providers:
  - {{ name: first, base_url: "{mock.base_url}", api_key: "{PROVIDER_KEY}" }}
  - {{ name: second, base_url: "{mock.base_url}", api_key: "{PROVIDER_KEY}" }}
  - {{ name: first-claude, kind: anthropic, base_url: "http://127.0.0.1:{mock.port}", api_key: "{PROVIDER_KEY}" }}
  - {{ name: second-claude, kind: anthropic, base_url: "http://127.0.0.1:{mock.port}", api_key: "{PROVIDER_KEY}" }}
models:
  - name: pair
    strategy: priority
    targets: [{{ provider: first, model: mock-small }}, {{ provider: second, model: mock-small }}]
  - name: claude-pair
    strategy: priority
    targets: [{{ provider: first-claude, model: claude-test }}, {{ provider: second-claude, model: claude-test }}]
tenants:
  - id: acme
    keys: ["{TENANT_KEY}"]
circuit_breaker: {{ consecutive_failures: 1, open_seconds: 30 }}
"""

        super().__init__(config)


@pytest.mark.parametrize("path,model,code,linger,reason,then", [
    # The SDK raises at the event and leaves while the provider lingers.
    ("/v1/chat/completions", "pair", "invalid_prompt", 3000, "invalid_request", "first"),
    ("/v1/chat/completions", "pair", None, 3000, "provider_stream_broken", "second"),
    ("/v1/chat/completions", "claude-pair", "invalid_request_error", 3000, "invalid_request", "first-claude"),
    ("/v1/chat/completions", "claude-pair", None, 3000, "provider_stream_broken", "second-claude"),
    # Read to the body's end.
    ("/v1/chat/completions", "pair", "rate_limit_exceeded", None, "provider_429", "second"),
    ("/v1/responses", "pair", "invalid_prompt", None, "invalid_request", "first"),
    ("/v1/responses", "pair", None, None, "provider_stream_broken", "second"),
])
def test_an_in_band_error_counts_against_the_deployment_only_when_the_provider_failed(
        mock, path, model, code, linger, reason, then):
    # A stream's error event came with a 200: it was a breaker failure when
    # a completion stream ended at it (whatever its class: a request the
    # provider refused opened the breaker of a healthy deployment for every
    # tenant), and a success when the stream went on to `[DONE]` or was a
    # Responses stream (a provider failing mid-answer opened nothing, and
    # its line said no error). Its code now says whose fault it was.
    gateway = PairGateway(mock)
    try:
        # Anthropic is asked at its own path.
        fault_path = "/v1/messages" if model == "claude-pair" else path
        fault = {"error_after_chunks": 2, "count": 1, "path": fault_path}
        if code:
            fault["error_code"] = code
        if linger:
            fault["linger_ms"] = linger
        mock.fault(fault)
        before = errors(gateway, reason)
        if linger:
            stream = gateway.client().chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], stream=True,
                extra_headers={"x-request-id": "in-band-error"})
            with pytest.raises(openai.APIError):
                for _ in stream:
                    pass
            stream.close()
        else:
            body = ({"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
                    if path == "/v1/chat/completions" else {"model": model, "stream": True, "input": "hi"})
            with httpx.stream("POST", f"http://127.0.0.1:{gateway.port}{path}", timeout=20, json=body,
                              headers={"authorization": f"Bearer {TENANT_KEY}",
                                       "x-request-id": "in-band-error"}) as answer:
                events = [e for e in answer.read().decode().split("\n\n") if e.strip()]
            assert "error" in events[-1] and "[DONE]" not in events[-1], events
        line = access_line(gateway, "in-band-error")
        assert (line["status"], line["error"], line["attempts"]) == (200, reason, 1), line
        assert line["completion_tokens"] >= 2
        assert errors(gateway, reason) == before + 1
        # The deployment at fault rests (its breaker open, or cooling down
        # after a 429); one that answered a bad request serves on.
        gateway.client().chat.completions.create(
            model=model, messages=[{"role": "user", "content": "next"}], extra_headers={"x-request-id": "next"})
        assert access_line(gateway, "next")["provider"] == then
    finally:
        gateway.stop()


@pytest.mark.parametrize("code", [None, "invalid_api_key", "invalid_prompt", "context_length_exceeded"])
def test_an_in_band_error_before_any_content_is_answered_by_its_status(mock, code):
    # The error event came before anything was sent on: the client got a
    # 200 and the event, and even a server error was not failed over; a
    # refused key reached the client.
    gateway = PairGateway(mock)
    try:
        fault = {"error_after_chunks": 0, "count": 1, "path": "/v1/chat/completions"}
        if code:
            fault["error_code"] = code
        mock.fault(fault)

        def create():
            return gateway.client().chat.completions.create(
                model="pair", messages=[{"role": "user", "content": "hi"}], stream=True,
                extra_headers={"x-request-id": "error-first"})

        if code in (None, "invalid_api_key"):
            # The provider failed, or refused the gateway's key: the next
            # deployment answers, whole.
            text = "".join(c.choices[0].delta.content or "" for c in create() if c.choices)
            assert text
            line = access_line(gateway, "error-first")
            assert (line["status"], line["error"], line["attempts"], line["provider"]) == (200, None, 2, "second")
        else:
            # The request's fault: its status, and the provider's words.
            with pytest.raises(openai.BadRequestError) as refused:
                create()
            assert refused.value.status_code == 400
            assert code in refused.value.message
            if code == "context_length_exceeded":
                assert refused.value.code == "context_length_exceeded"
            line = access_line(gateway, "error-first")
            assert (line["status"], line["error"], line["attempts"]) == (400, "invalid_request", 1), line
            gateway.client().chat.completions.create(
                model="pair", messages=[{"role": "user", "content": "next"}], extra_headers={"x-request-id": "next"})
            assert access_line(gateway, "next")["provider"] == "first"
    finally:
        gateway.stop()


def anthropic_event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"


ANTHROPIC_START = anthropic_event("message_start", {"message": {
    "id": "msg_1", "type": "message", "role": "assistant", "content": [],
    "usage": {"input_tokens": 3, "output_tokens": 1}}})


def anthropic_text(text: str) -> str:
    return anthropic_event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}})


@pytest.mark.parametrize("case", ["anthropic_more_after_error", "error_without_its_blank_line_first",
                                  "error_with_usage_not_asked_for"])
def test_error_event_edges(mock, case):
    # An Anthropic error with more events behind it in one read: they were
    # translated and sent on. An error event the body ended in without its
    # blank line, before any content: it reached the client in a 200 (no
    # failover). An error event that also carried usage, for a client that
    # did not ask for usage: it was left out with the usage, and the
    # stream just stopped (the SDKs did not raise).
    kind = "openai"
    if case == "anthropic_more_after_error":
        kind = "anthropic"
        events = [ANTHROPIC_START + anthropic_text("Hel")
                  + anthropic_event("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}})
                  + anthropic_text("lo") + anthropic_event("message_stop", {})]
    elif case == "error_without_its_blank_line_first":
        events = [TOKENS[0], 'data: {"error":{"message":"engine down","type":"server_error"}}']
    else:
        events = TOKENS + ['data: {"error":{"message":"engine down","type":"server_error"},'
                           '"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}\n\n']
    provider = ScriptedProvider(events)
    gateway = scripted_gateway(provider, mock, failures=5, kind=kind)
    try:
        events = read_stream(gateway, "edge")
        line = access_line(gateway, "edge")
        if case == "error_without_its_blank_line_first":
            assert (line["error"], line["attempts"], line["provider"]) == (None, 2, "mock"), line
            assert events[-1] == "data: [DONE]", events
            return
        assert "error" in events[-1] and "[DONE]" not in "".join(events), events
        assert not any('"lo"' in e for e in events), events
        assert (line["error"], line["provider"]) == ("provider_stream_broken", "scripted"), line
        with pytest.raises(openai.APIError):
            for _ in gateway.client().chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True,
                    extra_headers={"x-request-id": "edge-sdk"}):
                pass
    finally:
        gateway.stop()
        provider.stop()


def test_a_follower_of_a_stream_the_provider_refused_is_logged_with_its_reason(mock):
    # A request that joined the first one's call (the response cache) was
    # logged provider_stream_broken whatever error ended that stream.
    refused = 'data: {"error":{"message":"no","type":"invalid_request_error","code":"invalid_prompt"}}\n\n'
    provider = ScriptedProvider(TOKENS + [2.5, refused])

    def config(port, metrics_port, directory):
        return server_yaml(port, metrics_port, directory) + f"""
providers:
  - {{ name: scripted, base_url: "{provider.base_url}", api_key: "{PROVIDER_KEY}" }}
models:
  - name: gpt-4o-mini
    targets: [{{ provider: scripted, model: served }}]
tenants:
  - id: acme
    keys: ["{TENANT_KEY}"]
cache: {{}}
"""

    def ask(request_id):
        with httpx.stream("POST", f"http://127.0.0.1:{gateway.port}/v1/chat/completions", timeout=20,
                          headers={"authorization": f"Bearer {TENANT_KEY}", "x-request-id": request_id},
                          json={"model": "gpt-4o-mini", "stream": True, "temperature": 0,
                                "messages": [{"role": "user", "content": "hi"}]}) as answer:
            return [e for e in answer.read().decode().split("\n\n") if e.strip()]

    gateway = Runestone(config)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            first = pool.submit(ask, "leader")
            deadline = time.monotonic() + 10
            while provider.requests == 0:
                assert time.monotonic() < deadline, "the first request never reached the provider"
                time.sleep(0.01)
            follower = ask("follower")
            leader = first.result()
        assert provider.requests == 1, "the follower did not join the first call (a machine too slow?)"
        assert leader[-1] == follower[-1] == refused.strip()
        for request_id in ("leader", "follower"):
            assert access_line(gateway, request_id)["error"] == "invalid_request", request_id
        assert access_line(gateway, "follower")["cache"] == "coalesced"
    finally:
        gateway.stop()
        provider.stop()


def test_a_responses_error_before_any_content_fails_over(mock):
    # Its error event was taken for content: the client got a 200 stream
    # with the error, and no other deployment was asked.
    gateway = PairGateway(mock)
    try:
        mock.fault({"error_after_chunks": 0, "count": 1, "path": "/v1/responses"})
        with gateway.client().responses.create(model="pair", input="hi", stream=True,
                                               extra_headers={"x-request-id": "responses-error-first"}) as stream:
            kinds = [event.type for event in stream]
        assert kinds[-1] == "response.completed" and "error" not in kinds, kinds
        line = access_line(gateway, "responses-error-first")
        assert (line["status"], line["error"], line["attempts"], line["provider"]) == (200, None, 2, "second")
    finally:
        gateway.stop()


def test_an_error_chunk_before_any_content_fails_over_or_moves_to_a_larger_context(mock):
    # OpenRouter's in-band error chunk (its choice has finish_reason
    # "error") was taken for content; a prompt too long said so before any
    # content reached the client as a 400, past the context fallbacks.
    openrouter = ScriptedProvider([chunk_event({"role": "assistant", "content": ""}),
                                   chunk_event({"content": ""}, finish="error",
                                               error={"code": 502, "message": "upstream died"})])
    too_long = ScriptedProvider([chunk_event({"role": "assistant", "content": ""}),
                                 'data: {"error":{"message":"This model\'s maximum context length is 4096 tokens. '
                                 'However, you requested 9000 tokens.","type":"BadRequestError","code":400}}\n\n'])

    def config(port, metrics_port, directory):
        return server_yaml(port, metrics_port, directory) + f"""
providers:
  - {{ name: openrouter, base_url: "{openrouter.base_url}", api_key: "{PROVIDER_KEY}" }}
  - {{ name: small, base_url: "{too_long.base_url}", api_key: "{PROVIDER_KEY}" }}
  - {{ name: mock, base_url: "{mock.base_url}", api_key: "{PROVIDER_KEY}" }}
models:
  - name: routed
    strategy: priority
    targets: [{{ provider: openrouter, model: any }}, {{ provider: mock, model: mock-small }}]
  - name: ctx
    targets: [{{ provider: small, model: small }}]
    context_fallbacks: [big]
  - name: big
    targets: [{{ provider: mock, model: mock-large }}]
tenants:
  - id: acme
    keys: ["{TENANT_KEY}"]
"""

    gateway = Runestone(config)
    try:
        for model, request_id, provider in [("routed", "openrouter-first", "mock"), ("ctx", "too-long-first", "mock")]:
            chunks = list(gateway.client().chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], stream=True,
                extra_headers={"x-request-id": request_id}))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), model
            line = access_line(gateway, request_id)
            assert (line["status"], line["error"], line["attempts"], line["provider"]) == (200, None, 2, provider)
        assert access_line(gateway, "too-long-first")["model"] == "big"
    finally:
        gateway.stop()
        openrouter.stop()
        too_long.stop()


def test_a_provider_key_in_a_long_error_before_any_content_is_masked_whole(mock):
    # The message was cut to 1,000 characters before the key was masked:
    # a key cut in two went to the client in part.
    message = "y" * 985 + " " + PROVIDER_KEY + " tail"
    provider = ScriptedProvider([chunk_event({"role": "assistant", "content": ""}),
                                 "data: " + json.dumps({"error": {"message": message,
                                                                  "type": "invalid_request_error"}}) + "\n\n"])
    gateway = scripted_gateway(provider, mock)
    try:
        with pytest.raises(openai.BadRequestError) as refused:
            gateway.client().chat.completions.create(model="gpt-4o-mini", stream=True,
                                                     messages=[{"role": "user", "content": "hi"}])
        text = refused.value.response.text
        assert "y" * 900 in text
        assert PROVIDER_KEY[:8] not in text and PROVIDER_KEY[-8:] not in text, text[-80:]
    finally:
        gateway.stop()
        provider.stop()


def test_an_error_event_too_long_to_hold_is_judged_by_its_class(mock):
    # An error over 1 MiB whose first member is not `error` (vLLM's flat
    # shape) was not seen: the gateway added its own error after it, and
    # the request's fault opened the breaker.
    error = "data: " + json.dumps({"object": "error", "message": "x" * (1100 * 1024),
                                   "type": "BadRequestError", "param": None, "code": 400}) + "\n\n"
    provider = ScriptedProvider(TOKENS + [error])
    gateway = scripted_gateway(provider, mock)
    try:
        events = read_stream(gateway, "huge-error")
        assert events[-1] == error.strip() and '"object": "error"' in events[-1]
        assert sum('"error"' in e for e in events) == 1
        line = access_line(gateway, "huge-error")
        assert (line["status"], line["error"], line["provider"]) == (200, "invalid_request", "scripted"), line
        read_stream(gateway, "next")
        assert access_line(gateway, "next")["provider"] == "scripted"
    finally:
        gateway.stop()
        provider.stop()


def test_a_client_leaving_before_the_answer_is_logged_as_such(gateway, mock):
    closed = errors(gateway, "client_closed")
    mock.fault({"stall_after_chunks": 0, "stall_ms": 10000, "count": 1, "path": "/v1/chat/completions"})
    with pytest.raises(Exception):
        gateway.client().with_options(timeout=1.0, max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "too slow"}],
            extra_headers={"x-request-id": "leaves-before-the-answer"})
    line = access_line(gateway, "leaves-before-the-answer")
    assert line["error"] == "client_closed"
    assert line["status"] == 0 and line["attempts"] == 1
    assert errors(gateway, "client_closed") == closed + 1


def test_a_failover_shows_both_attempts_and_why(gateway, collector):
    request_id, _ = chat(gateway, model="failing-over")
    spans = collector.trace(request_id, 3)
    [server] = by_kind(spans, Span.SPAN_KIND_SERVER)
    attempts = sorted(by_kind(spans, Span.SPAN_KIND_CLIENT), key=lambda s: s.start_time_unix_nano)
    assert attrs(server)["runestone.attempts"] == 2
    assert [attrs(s)["runestone.deployment"] for s in attempts] == ["dead/dead-model", "mock/mock-small"]
    failed, served = (attrs(s) for s in attempts)
    assert failed["runestone.attempt.next"] == "failed_over"
    assert failed["error.type"] == "provider_5xx"
    assert "http.response.status_code" not in failed
    assert attempts[0].status.code == Status.STATUS_CODE_ERROR
    assert attempts[1].status.code == Status.STATUS_CODE_UNSET
    assert served["runestone.attempt.next"] == "answered"
    assert served["http.response.status_code"] == 200
    assert all(s.parent_span_id == server.span_id for s in attempts)


def test_an_incoming_traceparent_is_continued_and_passed_on(gateway, collector, mock):
    state = "vendor=abc,other=xyz"
    request_id, _ = chat(gateway, headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "tracestate": state})
    spans = collector.trace(request_id, 2)
    [server] = by_kind(spans, Span.SPAN_KIND_SERVER)
    [attempt] = by_kind(spans, Span.SPAN_KIND_CLIENT)
    assert server.trace_id.hex() == CLIENT_TRACE
    assert server.parent_span_id.hex() == CLIENT_SPAN
    assert server.trace_state == state
    assert server.flags & 0x300 == 0x300, "the parent is marked remote"
    headers = mock.requests()[-1]["headers"]
    assert headers["traceparent"] == f"00-{CLIENT_TRACE}-{attempt.span_id.hex()}-01"
    assert headers["tracestate"] == state


def test_an_unsampled_traceparent_is_passed_on_but_not_recorded(gateway, collector, mock):
    before = len(collector.spans)
    request_id, _ = chat(gateway, headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"})
    sent = mock.requests()[-1]["headers"]["traceparent"]
    assert sent.startswith(f"00-{CLIENT_TRACE}-") and sent.endswith("-00")
    assert not sent.split("-")[2] == CLIENT_SPAN, "the gateway's own span is the provider's parent"
    # A later sampled request's spans arrive; the unsampled one's never do.
    marker, _ = chat(gateway)
    collector.trace(marker, 2)
    assert not [s for _, s in collector.spans[before:] if attrs(s).get("runestone.request_id") == request_id]
    assert access_line(gateway, request_id)["trace_id"] == CLIENT_TRACE


def parked(gateway, tenant: str) -> float:
    prefix = f'runestone_overflow_parked{{tenant="{tenant}"}} '
    return sum(float(line.split()[-1]) for line in gateway.metrics().splitlines() if line.startswith(prefix))


def wait_until_sent(mock, before: int, first) -> None:
    """Waits until the mock has more than `before` requests (the `first`
    request's future reached it), at most 10 s."""
    deadline = time.monotonic() + 10
    while len(mock.requests()) == before:
        assert time.monotonic() < deadline and not first.done()
        time.sleep(0.02)


def test_a_parked_request_has_its_wait_in_the_queue(gateway, collector, mock):
    # The first request holds the tenant's only slot for 5 s: time enough,
    # on a loaded machine too, for the second to come in and be parked.
    hold_s = 5
    held_until = time.monotonic() + hold_s  # the mock's hold starts later
    mock.fault({"first_token_ms": hold_s * 1000, "count": 1, "path": "/v1/chat/completions"})
    before = len(mock.requests())
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(chat, gateway, key=OTHER_KEY)
        # The first request holds the tenant's only slot: wait until it is in.
        wait_until_sent(mock, before, first)
        second = pool.submit(chat, gateway, key=OTHER_KEY)
        # Then until the second is parked behind it.
        while not parked(gateway, "single"):
            answered = second.done()
            assert time.monotonic() < held_until, (
                f"the second request was not seen parked within the first one's {hold_s} s hold of the "
                "slot: either the machine is too slow for this test, or it was not parked "
                "(runestone_overflow_parked did not show it)")
            if answered:
                second.result()
                pytest.fail("the second request was answered while the first held the tenant's only slot")
            time.sleep(0.02)
        first.result()
        request_id, _ = second.result()
    spans = collector.trace(request_id, 3)
    [server] = by_kind(spans, Span.SPAN_KIND_SERVER)
    [wait] = by_kind(spans, Span.SPAN_KIND_INTERNAL)
    assert wait.name == "overflow wait"
    assert wait.parent_span_id == server.span_id
    waited_ms = attrs(wait)["runestone.overflow_wait_ms"]
    assert waited_ms > 100
    assert (wait.end_time_unix_nano - wait.start_time_unix_nano) / 1e6 == pytest.approx(waited_ms, abs=1)
    assert access_line(gateway, request_id)["overflow_wait"] > 100


def test_a_client_leaving_while_parked_is_logged_as_such(gateway, mock):
    closed = errors(gateway, "client_closed")
    mock.fault({"first_token_ms": 5000, "count": 1, "path": "/v1/chat/completions"})
    before = len(mock.requests())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(chat, gateway, key=OTHER_KEY)
        # The first request holds the tenant's only slot: wait until it is in.
        wait_until_sent(mock, before, first)
        with pytest.raises(Exception):
            gateway.client(OTHER_KEY).with_options(timeout=1.0, max_retries=0).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "parked"}],
                extra_headers={"x-request-id": "leaves-while-parked"})
        line = access_line(gateway, "leaves-while-parked")
        first.result()
    assert line["error"] == "client_closed" and line["status"] == 0
    assert line["overflow_wait"] > 0 and line["attempts"] == 0
    assert errors(gateway, "client_closed") == closed + 1


def test_an_async_job_is_a_trace_linked_to_its_submission(gateway, collector):
    submitted = httpx.post(
        f"http://127.0.0.1:{gateway.port}/v1/chat/completions",
        headers={"authorization": f"Bearer {TENANT_KEY}", "prefer": "respond-async"},
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "later"}]},
        timeout=10,
    )
    assert submitted.status_code == 202
    job_id = submitted.json()["id"]
    submission_id = submitted.headers["x-request-id"]
    [submission] = by_kind(collector.trace(submission_id, 1), Span.SPAN_KIND_SERVER)
    assert attrs(submission)["http.response.status_code"] == 202
    spans = collector.trace(job_id, 2)
    [job] = by_kind(spans, Span.SPAN_KIND_CONSUMER)
    [attempt] = by_kind(spans, Span.SPAN_KIND_CLIENT)
    assert job.name == "chat gpt-4o-mini"
    assert attrs(job)["runestone.job_attempt"] == 1
    assert attempt.parent_span_id == job.span_id
    [link] = job.links
    assert (link.trace_id, link.span_id) == (submission.trace_id, submission.span_id)
    assert job.trace_id != submission.trace_id


def test_a_job_answer_too_large_to_keep_is_the_providers_failure(collector):
    # A job's collector refuses an answer past 16 MiB as a client that
    # leaves would: its line said client_closed, though a job has none.
    def answer(request, raw):
        content = "x" * (17 << 20)
        return 200, "application/json", json.dumps({
            "id": "chatcmpl-big", "object": "chat.completion", "created": 1, "model": "big",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}).encode()

    provider = LocalServer(answer)
    gateway = Gateway(provider, collector.endpoint)
    try:
        submitted = httpx.post(
            f"http://127.0.0.1:{gateway.port}/v1/chat/completions",
            headers={"authorization": f"Bearer {TENANT_KEY}", "prefer": "respond-async"},
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a big one"}]}, timeout=10)
        assert submitted.status_code == 202
        line = access_line(gateway, submitted.json()["id"])
        assert line["status"] == 502 and line["error"] == "provider_5xx"
        assert errors(gateway, "client_closed") == 0
    finally:
        gateway.stop()
        provider.stop()


def test_no_key_is_exported_and_content_only_when_asked(gateway, collector):
    request_id, _ = chat(gateway)
    spans = collector.trace(request_id, 2)
    for span in spans:
        assert not [e for e in span.events if e.name.startswith("gen_ai.content")]
    with collector.lock:
        every = b"".join(collector.bodies)
    for secret in (TENANT_KEY, OTHER_KEY, PROVIDER_KEY, "otlp-token-123"):
        assert secret.encode() not in every


def test_captured_content_has_the_prompt_and_a_redacted_completion(mock):
    collector = Collector()
    gateway = Gateway(mock, collector.endpoint, extra="  capture_content: true\n")
    try:
        mock.fault({"echo_key": True, "count": 1, "path": "/v1/chat/completions"})
        request_id, completion = chat(gateway)
        assert PROVIDER_KEY not in completion.choices[0].message.content
        [server] = by_kind(collector.trace(request_id, 2), Span.SPAN_KIND_SERVER)
        events = {e.name: {a.key: value(a.value) for a in e.attributes} for e in server.events}
        prompt = json.loads(events["gen_ai.content.prompt"]["gen_ai.prompt"])
        assert prompt == [{"role": "user", "content": "hello there"}]
        text = events["gen_ai.content.completion"]["gen_ai.completion"]
        assert text == completion.choices[0].message.content
        assert PROVIDER_KEY not in text
        assert PROVIDER_KEY.encode() not in b"".join(collector.bodies)
    finally:
        gateway.stop()
        collector.stop()


class AccountGateway(Runestone):
    """runestone in front of llmock (an upstream we did not write) as one
    provider account: `small` falls back to `large`. Its idle timeout (2 s)
    is more than a loaded machine's pause between two of llmock's chunks:
    only the faults the tests ask for break a stream."""

    def __init__(self, llmock: Llmock, endpoint: str):
        def config(port, metrics_port, directory):
            return server_yaml(port, metrics_port, directory) + f"""
providers:
  - {{ name: acct, base_url: "{llmock.base_url}", api_key: "sk-llmock-telemetry-21", timeouts: {{ first_token_ms: 1500, idle_ms: 2000 }} }}
models:
  - name: small
    targets: [{{ provider: acct, model: m-small }}]
    fallbacks: [large]
  - name: large
    targets: [{{ provider: acct, model: m-large }}]
tenants:
  - id: acme
    keys: ["{TENANT_KEY}"]
telemetry: {{ otlp_endpoint: "{endpoint}" }}
"""

        super().__init__(config)


def test_a_broken_stream_resumed_on_the_fallback_is_in_the_trace(collector):
    llmock = Llmock()
    gateway = AccountGateway(llmock, collector.endpoint)
    try:
        llmock.scenario({"type": "stream_fault", "kind": "disconnect", "after_chunks": 2, "times": 1,
                         "match": {"model": "m-small"}})
        raw = gateway.client().chat.completions.with_raw_response.create(
            model="small", messages=[{"role": "user", "content": "hi"}], stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        assert text == "Mock response from m-large."
        spans = collector.trace(raw.headers["x-request-id"], 3)
        [server] = by_kind(spans, Span.SPAN_KIND_SERVER)
        events = [e.name for e in sorted(server.events, key=lambda e: e.time_unix_nano)]
        assert events == ["runestone.first_token", "runestone.stream.broken", "runestone.stream.resumed"]
        assert server.status.code == Status.STATUS_CODE_UNSET, "resumed: the request succeeded"
        broken, resumed = sorted(by_kind(spans, Span.SPAN_KIND_CLIENT), key=lambda s: s.start_time_unix_nano)
        assert attrs(broken)["error.type"] == "provider_stream_broken"
        assert attrs(broken)["runestone.attempt.next"] == "failed_over"
        assert attrs(broken)["http.response.status_code"] == 200
        assert (broken.name, resumed.name) == ("chat m-small", "chat m-large")
        assert attrs(resumed)["runestone.attempt.next"] == "answered"

        # A stream with nowhere to go: the server span fails.
        llmock.scenario({"type": "stream_fault", "kind": "disconnect", "after_chunks": 2, "times": 1,
                         "match": {"model": "m-large"}})
        raw = gateway.client().chat.completions.with_raw_response.create(
            model="large", messages=[{"role": "user", "content": "hi"}], stream=True)
        with pytest.raises(Exception):
            list(raw.parse())
        [server] = by_kind(collector.trace(raw.headers["x-request-id"], 2), Span.SPAN_KIND_SERVER)
        assert attrs(server)["error.type"] == "provider_stream_broken"
        assert server.status.code == Status.STATUS_CODE_ERROR
    finally:
        gateway.stop()
        llmock.stop()


def test_a_resumed_stream_whose_fallback_says_something_else_has_every_attempt_in_the_trace(collector):
    llmock = Llmock()
    gateway = AccountGateway(llmock, collector.endpoint)
    try:
        # The fallback restarts (llmock takes no prefill) and begins with
        # other words than the client already has: the stream cannot go on.
        llmock.scenario(
            {"type": "reply", "text": "Alpha beta gamma delta epsilon.", "match": {"model": "m-small"}},
            {"type": "stream_fault", "kind": "disconnect", "after_chunks": 3, "times": 1,
             "match": {"model": "m-small"}},
            {"type": "reply", "text": "Something else entirely.", "match": {"model": "m-large"}},
        )
        raw = gateway.client().chat.completions.with_raw_response.create(
            model="small", messages=[{"role": "user", "content": "hi"}], stream=True)
        text = ""
        with pytest.raises(openai.APIError, match="began differently"):
            for chunk in raw.parse():
                text += "".join(c.delta.content or "" for c in chunk.choices)
        assert text.startswith("Alpha") and "Something" not in text
        spans = collector.trace(raw.headers["x-request-id"], 3)
        [server] = by_kind(spans, Span.SPAN_KIND_SERVER)
        assert attrs(server)["error.type"] == "provider_stream_broken"
        broken, diverged = sorted(by_kind(spans, Span.SPAN_KIND_CLIENT), key=lambda s: s.start_time_unix_nano)
        assert (broken.name, diverged.name) == ("chat m-small", "chat m-large")
        assert attrs(broken)["runestone.attempt.next"] == "failed_over"
        # The attempt that said something else is in the trace, as what
        # ended the request.
        assert attrs(diverged)["error.type"] == "provider_stream_broken"
        assert attrs(diverged)["runestone.attempt.next"] == "gave_up"
    finally:
        gateway.stop()
        llmock.stop()


def dropped(gateway, reason: str) -> float:
    for line in gateway.metrics().splitlines():
        if line.startswith(f'runestone_telemetry_dropped_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def answers(gateway, n: int) -> list:
    out = []
    for _ in range(n):
        _, completion = chat(gateway)
        out.append((completion.choices[0].message.content, completion.usage.total_tokens))
    return out


def test_a_collector_down_or_slow_changes_no_answer(mock, gateway):
    reference = answers(gateway, 5)
    down = Gateway(mock, f"http://127.0.0.1:{free_port()}")
    try:
        assert answers(down, 5) == reference
        deadline = time.monotonic() + 10
        while dropped(down, "export_failed") < 5:
            assert time.monotonic() < deadline, down.metrics()
            time.sleep(0.1)
    finally:
        down.stop()
    slow_collector = Collector()
    slow_collector.delay = 3.0
    slow = Gateway(mock, slow_collector.endpoint)
    try:
        assert answers(slow, 5) == reference
        request_id, _ = chat(slow)
        slow_collector.trace(request_id, 2, timeout=20)
    finally:
        slow.stop()
        slow_collector.stop()
    refusing = Collector()
    refusing.status = 503
    refused = Gateway(mock, refusing.endpoint)
    try:
        assert answers(refused, 3) == reference[:3]
        deadline = time.monotonic() + 10
        while dropped(refused, "export_failed") < 3:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert "trace export failed" in refused.output()
        assert "Bearer" not in refused.output()
    finally:
        refused.stop()
        refusing.stop()


def test_spans_queued_at_shutdown_are_flushed(mock):
    collector = Collector()
    gateway = Gateway(mock, collector.endpoint)
    try:
        ids = [chat(gateway)[0] for _ in range(3)]
        gateway.proc.send_signal(signal.SIGTERM)
        gateway.proc.wait(timeout=20)
        for request_id in ids:
            collector.trace(request_id, 2, timeout=1)
    finally:
        gateway.stop()
        collector.stop()


def test_only_tenants_requests_are_traced_and_a_duplicate_traceparent_starts_anew(gateway, collector):
    sampled = f"00-{CLIENT_TRACE[:-4]}beef-{CLIENT_SPAN}-01"
    for path, key in [("/v1/chat/completions", "sk-wrong-key-123456"), ("/health", None), ("/v1/nothing", TENANT_KEY)]:
        headers = {"traceparent": sampled}
        if key:
            headers["authorization"] = f"Bearer {key}"
        httpx.post(f"http://127.0.0.1:{gateway.port}{path}", headers=headers, json={"model": "gpt-4o-mini"}, timeout=10)
    request_id, _ = chat(gateway)
    collector.trace(request_id, 2)
    with collector.lock:
        assert not [s for _, s in collector.spans if s.trace_id.hex() == sampled.split("-")[1]], \
            "no span for an unauthenticated request, a probe or an unknown path"
    # Two traceparents: ambiguous, so the request starts its own trace.
    raw = httpx.post(
        f"http://127.0.0.1:{gateway.port}/v1/chat/completions",
        headers=[("authorization", f"Bearer {TENANT_KEY}"), ("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),
                 ("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")],
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    [server] = by_kind(collector.trace(raw.headers["x-request-id"], 2), Span.SPAN_KIND_SERVER)
    assert server.trace_id.hex() != CLIENT_TRACE and not server.parent_span_id


def test_every_attempt_failing_ends_with_gave_up_and_a_passed_on_4xx_is_a_failed_call(gateway, collector, mock):
    mock.fault({"status": 500, "count": 6, "path": "/v1/chat/completions"})
    raw = httpx.post(f"http://127.0.0.1:{gateway.port}/v1/chat/completions",
                     headers={"authorization": f"Bearer {TENANT_KEY}"},
                     json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}, timeout=20)
    assert raw.status_code == 502
    spans = collector.trace(raw.headers["x-request-id"], 2)
    attempts = sorted(by_kind(spans, Span.SPAN_KIND_CLIENT), key=lambda s: s.start_time_unix_nano)
    assert attrs(attempts[-1])["runestone.attempt.next"] == "gave_up"
    assert all(a.status.code == Status.STATUS_CODE_ERROR for a in attempts)
    [server] = by_kind(spans, Span.SPAN_KIND_SERVER)
    assert server.status.code == Status.STATUS_CODE_ERROR and attrs(server)["error.type"] == "provider_5xx"
    # Whatever faults the failing attempts left unused go.
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{mock.port}/_mock/reset", data=b"{}", method="POST")).close()
    mock.fault({"status": 400, "count": 1, "path": "/v1/chat/completions"})
    raw = httpx.post(f"http://127.0.0.1:{gateway.port}/v1/chat/completions",
                     headers={"authorization": f"Bearer {TENANT_KEY}"},
                     json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}, timeout=20)
    assert raw.status_code == 400
    spans = collector.trace(raw.headers["x-request-id"], 2)
    [attempt] = by_kind(spans, Span.SPAN_KIND_CLIENT)
    assert attrs(attempt)["error.type"] == "400" and attempt.status.code == Status.STATUS_CODE_ERROR
    [server] = by_kind(spans, Span.SPAN_KIND_SERVER)
    assert server.status.code == Status.STATUS_CODE_UNSET, "the client's 4xx is not the server span's failure"


def echoing_provider() -> LocalServer:
    """A provider that puts the key it was sent into its answer's id,
    model and finish reason (JSON and streamed)."""

    def answer(request, raw):
        body = json.loads(raw)
        key = request.headers["authorization"].removeprefix("Bearer ")
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        if body.get("stream"):
            chunk = {"id": key, "object": "chat.completion.chunk", "created": 1, "model": key,
                     "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": key}]}
            data = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps({**chunk, 'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"
            return 200, "text/event-stream", data.encode()
        data = json.dumps({"id": key, "object": "chat.completion", "created": 1, "model": key,
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
                                        "finish_reason": key}], "usage": usage})
        return 200, "application/json", data.encode()

    return LocalServer(answer)


def test_a_provider_echoing_its_key_into_model_and_finish_reason_leaks_nothing(collector):
    provider = echoing_provider()
    gateway = Gateway(provider, collector.endpoint)
    try:
        for stream in (False, True):
            raw = httpx.post(f"http://127.0.0.1:{gateway.port}/v1/chat/completions",
                             headers={"authorization": f"Bearer {TENANT_KEY}"},
                             json={"model": "gpt-4o-mini", "stream": stream,
                                   "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
            assert PROVIDER_KEY not in raw.text
            [server] = by_kind(collector.trace(raw.headers["x-request-id"], 2), Span.SPAN_KIND_SERVER)
            assert PROVIDER_KEY not in json.dumps(attrs(server))
        with collector.lock:
            assert PROVIDER_KEY.encode() not in b"".join(collector.bodies)
    finally:
        gateway.stop()
        provider.stop()


def test_a_collector_that_says_later_gets_the_spans_again(mock):
    collector = Collector()
    collector.unavailable = 2
    gateway = Gateway(mock, collector.endpoint)
    try:
        request_id, _ = chat(gateway)
        collector.trace(request_id, 2, timeout=20)
        assert dropped(gateway, "export_failed") == 0
    finally:
        gateway.stop()
        collector.stop()


def test_a_daemon_exports_its_spans_and_stops_cleanly(mock, collector):
    gateway = Gateway(mock, collector.endpoint)
    pid_file = Path(gateway.dir.name) / "gw.pid"
    config = Path(gateway.dir.name) / "runestone.yaml"
    port = gateway.port
    gateway.proc.kill()
    gateway.proc.wait()
    daemon = subprocess.run([str(BIN_DIR / "runestone"), "--config", str(config), "--daemon"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
    assert daemon.returncode == 0
    pid = None
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the daemon did not come up"
                time.sleep(0.05)
        pid = int(pid_file.read_text())
        ids = [chat(gateway)[0] for _ in range(3)]
        for request_id in ids:
            collector.trace(request_id, 2)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text():
            assert time.monotonic() < deadline, "the daemon did not stop"
            time.sleep(0.05)
        pid = None
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
        gateway.dir.cleanup()


def test_a_non_blocking_stdout_keeps_every_access_line_whole(mock, tmp_path):
    """stdout a non-blocking pipe read slowly (as some log shippers hand
    it over): a full pipe refuses a write instead of waiting. The writer
    used to give up on the batch it was writing, a line torn and the rest
    lost without being counted as dropped; now it waits, as on a blocking
    pipe, and every line arrives whole, or is counted."""
    config = tmp_path / "runestone.yaml"
    port, metrics_port = free_port(), free_port()
    config.write_text(server_yaml(port, metrics_port, str(tmp_path)) + f"""
providers:
  - {{ name: mock, base_url: "{mock.base_url}", api_key: "{PROVIDER_KEY}" }}
models:
  - name: gpt-4o-mini
    targets: [{{ provider: mock, model: mock-small }}]
tenants:
  - id: acme
    keys: ["{TENANT_KEY}"]
""")
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    proc = subprocess.Popen([str(BIN_DIR / "runestone"), "--config", str(config)],
                            stdout=write_end, stderr=subprocess.DEVNULL)
    os.close(write_end)
    received = []

    def read_slowly():
        # About 80 KB/s: the pipe's 64 KiB fill within the first second.
        while chunk := os.read(read_end, 4096):
            received.append(chunk)
            time.sleep(0.05)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc, "runestone")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TENANT_KEY,
                               max_retries=0, timeout=30)
        requests = 1500
        for _ in range(requests):
            client.models.list()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
            metrics = resp.read().decode()
        dropped = next(float(line.split()[1]) for line in metrics.splitlines()
                       if line.startswith("runestone_access_log_dropped_total "))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        reader.join(timeout=30)
        os.close(read_end)
    lines = b"".join(received).split(b"\n")
    assert lines.pop() == b"", "the output ends at a line's end"
    access = [json.loads(line) for line in lines if b'"type":"access"' in line]
    listed = [line for line in access if line["endpoint"] == "models"]
    assert len(listed) + dropped == requests, (len(listed), dropped)
