"""The OpenAI Python SDK against an Anthropic-kind route: the gateway speaks
the Messages API upstream and OpenAI to the client."""

import json

import httpx
import openai
import pytest

from conftest import PROVIDER_KEY, TENANT_KEY, Gateway, LocalServer, Runestone, server_yaml


def test_chat(client, mock):
    resp = client.chat.completions.create(
        model="claude",
        max_tokens=4,
        messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
    )
    assert resp.object == "chat.completion"
    assert resp.model == "claude"
    assert resp.choices[0].message.content == "tok0 tok1 tok2 tok3"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 4
    assert mock.requests()[-1]["path"] == "/v1/messages"


def test_stream_without_usage(client):
    chunks = list(
        client.chat.completions.create(
            model="claude", max_tokens=5, stream=True, messages=[{"role": "user", "content": "Count"}]
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == [f"tok{i}" for i in range(5)]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)


def test_stream_with_usage(client):
    chunks = list(
        client.chat.completions.create(
            model="claude",
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Count"}],
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 3
    assert chunks[-1].usage.prompt_tokens > 0


def test_tools(client):
    resp = client.chat.completions.create(
        model="claude",
        messages=[{"role": "user", "content": "Look it up"}],
        tools=[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
        tool_choice="required",
    )
    call = resp.choices[0].message.tool_calls[0]
    assert call.function.name == "lookup"
    assert call.function.arguments == '{"mock":true}'
    assert resp.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    "status,exception",
    [
        (400, openai.BadRequestError),
        (404, openai.NotFoundError),
        (500, openai.InternalServerError),
        (529, openai.InternalServerError),
    ],
)
def test_upstream_errors_raise_the_usual_classes(client, mock, status, exception):
    # Twice: a 5xx is tried once more on the same deployment.
    mock.fault({"status": status, "count": 2 if status >= 500 else 1, "path": "/v1/messages"})
    with pytest.raises(exception):
        client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}])


def test_upstream_rate_limit_raises_rate_limit_error(mock):
    # Its own gateway: a provider 429 rests the deployment for its wait
    # (longer than the gateway's max_retry_wait_ms, so not waited out).
    gateway = Gateway(mock)
    try:
        mock.fault({"status": 429, "retry_after": 30, "path": "/v1/messages"})
        with pytest.raises(openai.RateLimitError):
            gateway.client().chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}])
    finally:
        gateway.stop()


def test_structured_outputs_parse_through_a_forced_tool(client, mock):
    from pydantic import BaseModel

    class Answer(BaseModel):
        mock: bool

    resp = client.chat.completions.parse(
        model="claude", messages=[{"role": "user", "content": "JSON please"}], response_format=Answer
    )
    assert resp.choices[0].message.parsed == Answer(mock=True)
    assert resp.choices[0].finish_reason == "stop"
    with client.chat.completions.stream(
        model="claude", messages=[{"role": "user", "content": "JSON please"}], response_format=Answer
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == Answer(mock=True)


@pytest.mark.parametrize(
    "field,value",
    [("n", 2), ("logprobs", True), ("seed", 7), ("temperature", 1.5), ("reasoning_effort", "high")],
)
def test_a_field_anthropic_cannot_honour_is_refused_naming_it(client, field, value):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="claude", messages=[{"role": "user", "content": "hi"}], extra_body={field: value}
        )
    assert err.value.param == field


def test_a_tool_only_stream_leaves_the_content_null(client):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    with client.chat.completions.stream(
        model="claude", messages=[{"role": "user", "content": "use the tool"}], tools=tools,
        parallel_tool_calls=False,
    ) as stream:
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert message.content is None
    assert message.tool_calls[0].function.name == "lookup"


class ScriptedClaude(LocalServer):
    """An Anthropic Messages endpoint answering with the usage it is told."""

    TEXT = "a short answer of a few words"

    def __init__(self):
        self.usage = None
        self.thinking = None
        super().__init__(self.answer)

    def answer(self, request, body):
        content = [{"type": "text", "text": self.TEXT}]
        if self.thinking:
            content.insert(0, {"type": "thinking", "thinking": self.thinking, "signature": "c2ln"})
        message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
                   "content": content, "stop_reason": "end_turn", "usage": self.usage}
        if not json.loads(body).get("stream"):
            return 200, "application/json", json.dumps(message).encode()
        # Streamed, each event's JSON split over several `data:` lines (the
        # SSE format joins them; a payload is not one line by rule).
        events = [
            ("message_start", {"type": "message_start", "message": {**message, "content": [],
                                                                     "usage": {"input_tokens": 11, "output_tokens": 1}}}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            *[("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": word}})
              for word in self.TEXT.split(" ")],
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                               "usage": {"output_tokens": 7}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        stream = "".join(
            f"event: {kind}\n" + "".join(f"data: {line}\n" for line in json.dumps(data, indent=1).splitlines()) + "\n"
            for kind, data in events)
        return 200, "text/event-stream", stream.encode()


def test_an_answer_without_usage_to_bill_by_is_counted_not_billed_as_reported():
    provider = ScriptedClaude()

    def config(port, metrics_port, directory):
        return server_yaml(port, metrics_port, directory) + f"""
providers:
  - {{ name: claude, kind: anthropic, base_url: "http://127.0.0.1:{provider.port}", api_key: "{PROVIDER_KEY}" }}
models:
  - name: claude
    targets: [{{ provider: claude, model: claude-x }}]
pricing:
  claude: {{ input: 3, output: 15 }}
tenants:
  - id: acme
    keys: ["{TENANT_KEY}"]
"""

    gateway = Runestone(config)
    try:
        client = gateway.client()
        for usage in [None, {}, {"input_tokens": 1e15, "output_tokens": 5},
                      {"input_tokens": 10, "output_tokens": -5}]:
            provider.usage = usage
            answer = client.chat.completions.create(
                model="claude", max_tokens=20, messages=[{"role": "user", "content": "Say something short"}])
            assert answer.choices[0].message.content == "a short answer of a few words"
            # The gateway's own count, in the answer and in the bill.
            assert 0 < answer.usage.completion_tokens < 20, usage
            assert 0 < answer.usage.prompt_tokens < 100, usage
        counted = answer.usage.completion_tokens
        # The prompt's counts without the completion's: the prompt is the
        # provider's, the completion the gateway's count.
        for usage in [{"input_tokens": 41}, {"input_tokens": 41, "output_tokens": None}]:
            provider.usage = usage
            answer = client.chat.completions.create(
                model="claude", max_tokens=20, messages=[{"role": "user", "content": "Say something short"}])
            assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (41, counted), usage
        # Thinking the answer has no place for is billed as output all the same.
        provider.usage, provider.thinking = None, "The user wants something short, so a few words will do."
        answer = client.chat.completions.create(
            model="claude", max_tokens=100, messages=[{"role": "user", "content": "Say something short"}])
        assert answer.choices[0].message.content == ScriptedClaude.TEXT
        assert answer.usage.completion_tokens > counted + 8, answer.usage
        provider.thinking = None
        provider.usage = {"input_tokens": 11, "output_tokens": 7}
        answer = client.chat.completions.create(
            model="claude", max_tokens=20, messages=[{"role": "user", "content": "Say something short"}])
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (11, 7)
        billed = httpx.get(f"http://127.0.0.1:{gateway.port}/v1/usage",
                           headers={"authorization": f"Bearer {TENANT_KEY}"}, timeout=10).json()
        assert billed["requests"] == 8
        assert billed["estimated_requests"] == 7
        assert billed["prompt_tokens"] < 500, billed
        assert billed["cost_usd"] < 0.01, billed
        # A stream whose events' JSON spans several `data:` lines reads whole.
        stream = client.chat.completions.create(
            model="claude", max_tokens=20, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Say something short"}])
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ScriptedClaude.TEXT.replace(" ", "")
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (11, 7)
    finally:
        gateway.stop()
        provider.stop()


class HugeEventClaude(LocalServer):
    """An Anthropic Messages endpoint whose streams carry one event over
    1 MiB, the gateway's bound on an event it translates: `before` text
    deltas, then the huge one, then a proper end."""

    def __init__(self):
        self.before = 0
        super().__init__(self.answer)

    def answer(self, request, body):
        def event(kind, data):
            return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

        def delta(text):
            return event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                 "delta": {"type": "text_delta", "text": text}})

        stream = [
            event("message_start", {"type": "message_start", "message": {
                "id": "msg_h", "type": "message", "role": "assistant", "content": [],
                "usage": {"input_tokens": 9, "output_tokens": 1}}}),
            event("content_block_start", {"type": "content_block_start", "index": 0,
                                          "content_block": {"type": "text", "text": ""}}),
            *[delta(f"word{i} ") for i in range(self.before)],
            delta("x" * (1100 * 1024)),
            event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                    "usage": {"output_tokens": 300000}}),
            event("message_stop", {"type": "message_stop"}),
        ]
        return 200, "text/event-stream", "".join(stream).encode()


def test_a_stream_event_too_long_to_translate_breaks_off_like_a_provider_break():
    """Before anything reached the client the request fails over (here to
    llmock, a provider we did not write); after, the client's stream ends
    with an error, never with a silent gap, and the tenant's one slot is
    free at once."""
    from conftest import Llmock

    provider, llmock = HugeEventClaude(), Llmock()

    def config(port, metrics_port, directory):
        return server_yaml(port, metrics_port, directory) + f"""
providers:
  - {{ name: claude, kind: anthropic, base_url: "http://127.0.0.1:{provider.port}", api_key: "{PROVIDER_KEY}" }}
  - {{ name: other, base_url: "{llmock.base_url}", api_key: "sk-llmock-provider-key-16" }}
models:
  - name: claude
    targets: [{{ provider: claude, model: claude-x }}]
    fallbacks: [other]
  - name: claude-alone
    targets: [{{ provider: claude, model: claude-x }}]
  - name: other
    targets: [{{ provider: other, model: m-other }}]
tenants:
  - id: acme
    keys: ["{TENANT_KEY}"]
    limits: {{ max_concurrent: 1 }}
"""

    gateway = Runestone(config)
    try:
        client = gateway.client()
        messages = [{"role": "user", "content": "Say something"}]
        # Cut before any content: served by the fallback, whole.
        chunks = list(client.chat.completions.create(model="claude", stream=True, messages=messages))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text and "x" * 100 not in text
        assert any(r["body"]["model"] == "m-other" for r in llmock.journal())
        # Cut after some content, where nothing can resume it: an error.
        provider.before = 3
        with pytest.raises(openai.APIError, match="longer than"):
            for _ in client.chat.completions.create(model="claude-alone", stream=True, messages=messages):
                pass
        # The slot is free: the next request is not refused.
        answer = client.chat.completions.create(model="other", messages=messages)
        assert answer.choices[0].message.content
        # The cut attempt is the provider's failure, logged as a break.
        assert "too long to translate" in gateway.output()
    finally:
        gateway.stop()
        provider.stop()
        llmock.stop()


def test_a_translated_error_event_ends_the_response_however_long_the_provider_lingers():
    """Anthropic's `error` event ends its stream: before any content, the
    deployment failed (nothing reached the client); after some, the
    client's response ends there (settled, the tenant's one slot free),
    though the provider keeps the body open with keep-alive comments."""
    import http.server
    import threading
    import time

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            if not body.get("stream"):
                answer = json.dumps({"id": "msg_2", "type": "message", "role": "assistant",
                                     "content": [{"type": "text", "text": "fine"}], "stop_reason": "end_turn",
                                     "usage": {"input_tokens": 3, "output_tokens": 1}}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
                return
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("connection", "close")
            self.end_headers()
            start = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                          "content": [], "usage": {"input_tokens": 3, "output_tokens": 1}}}
            # The provider echoes its key in the message: masked however
            # the error reaches the client.
            kind = "invalid_request_error" if "bad first" in json.dumps(body["messages"]) else "overloaded_error"
            error = {"type": "error", "error": {"type": kind, "message": f"Overloaded {PROVIDER_KEY}"}}
            text = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}
            self.wfile.write(f"event: message_start\ndata: {json.dumps(start)}\n\n".encode())
            if "text first" in json.dumps(body["messages"]):
                self.wfile.write(f"event: content_block_delta\ndata: {json.dumps(text)}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.2)
            self.wfile.write(f"event: error\ndata: {json.dumps(error)}\n\n".encode())
            self.wfile.flush()
            try:
                for _ in range(40):
                    time.sleep(0.2)
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def config(port, metrics_port, directory):
        return server_yaml(port, metrics_port, directory) + f"""
providers:
  - {{ name: claude, kind: anthropic, base_url: "http://127.0.0.1:{server.server_address[1]}", api_key: "{PROVIDER_KEY}" }}
models:
  - name: claude
    targets: [{{ provider: claude, model: claude-x }}]
tenants:
  - id: acme
    keys: ["{TENANT_KEY}"]
    limits: {{ max_concurrent: 1 }}
"""

    gateway = Runestone(config)
    try:
        client = gateway.client()
        for first in ["error first", "bad first", "text first"]:
            began = time.monotonic()
            with httpx.stream("POST", f"{gateway.base_url}/chat/completions",
                              headers={"authorization": f"Bearer {TENANT_KEY}"}, timeout=30,
                              json={"model": "claude", "stream": True,
                                    "messages": [{"role": "user", "content": first}]}) as response:
                body = b"".join(response.iter_bytes())
            # Read to its end (a generic SSE reader does), well before the
            # provider's 8 s of keep-alives are over.
            assert time.monotonic() - began < 4, (first, time.monotonic() - began)
            assert b"Overloaded" in body and b"[DONE]" not in body, body
            assert PROVIDER_KEY.encode() not in body, body
            if first == "error first":
                assert response.status_code >= 500, body
            elif first == "bad first":
                # The request's fault, as an HTTP 400 would be: the
                # client's answer, not the deployment's failure.
                assert response.status_code == 400, body
            else:
                assert response.status_code == 200 and b'"Hel"' in body, body
            answer = client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}])
            assert answer.choices[0].message.content == "fine"
        assert PROVIDER_KEY not in gateway.output()
    finally:
        gateway.stop()
        server.shutdown()
