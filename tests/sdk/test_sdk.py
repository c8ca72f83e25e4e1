"""The official OpenAI Python SDK against Runestone.

What the SDK does against the gateway must match what it does against the
provider: same objects, same streams, same exception classes.
"""

import time
import uuid

import httpx
import openai
import pytest

from conftest import BROKE_KEY, LIMITED_KEY, PROVIDER_KEY, RESTRICTED_KEY, TENANT_KEY


def test_chat_completion(client, mock):
    before = len(mock.requests())
    resp = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}]
    )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content.startswith("tok0")
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    seen = mock.requests()[before]
    assert seen["model"] == "mock-small"
    assert seen["headers"]["authorization"] == f"Bearer {PROVIDER_KEY}"


def test_chat_completion_with_raw_response_headers(client):
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    uuid.UUID(raw.headers["x-request-id"])  # a UUID, which model servers accept
    assert raw.headers["x-runestone-provider"] == "mock"
    assert raw.parse().choices[0].finish_reason == "stop"


def test_chat_stream_arrives_in_chunks(client):
    chunks = []
    first_at = None
    started = time.monotonic()
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "count"}],
        stream=True,
        extra_body={"mock_tokens": 40},
    )
    for chunk in stream:
        if first_at is None and chunk.choices and chunk.choices[0].delta.content:
            first_at = time.monotonic() - started
        chunks.append(chunk)
    total = time.monotonic() - started
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == [f"tok{i}" for i in range(40)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    # 40 tokens at 200/s take ~0.2 s; the first arrives long before the end.
    assert first_at is not None and first_at < total


def test_chat_stream_with_include_usage(client):
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 16


def test_legacy_completions(client):
    resp = client.completions.create(model="gpt-4o-mini", prompt="Once upon a time", max_tokens=5)
    assert resp.object == "text_completion"
    assert resp.choices[0].text.split() == [f"tok{i}" for i in range(5)]
    assert resp.choices[0].finish_reason == "length"


def test_embeddings(client):
    resp = client.embeddings.create(model="text-embedding-3-small", input=["one", "two", "three"])
    assert [d.index for d in resp.data] == [0, 1, 2]
    assert all(len(d.embedding) == 8 for d in resp.data)


def test_models_lists_what_the_tenant_may_use(gateway):
    ids = [m.id for m in gateway.client().models.list()]
    assert ids == ["gpt-4o-mini", "text-embedding-3-small", "unreachable", "claude", "azure-chat", "azure-embed"]
    restricted = [m.id for m in gateway.client(RESTRICTED_KEY).models.list()]
    assert restricted == ["text-embedding-3-small"]


def test_large_body_is_forwarded_whole(client, mock):
    content = "word " * 150_000  # ~750 KB, far above Pingora's 64 KiB retry buffer
    resp = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}]
    )
    assert resp.usage.prompt_tokens > 150_000
    assert mock.requests()[-1]["body_bytes"] > 750_000


def test_unknown_key_raises_authentication_error(gateway):
    with pytest.raises(openai.AuthenticationError) as err:
        gateway.client("sk-not-a-tenant").chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert err.value.status_code == 401
    assert err.value.code == "invalid_api_key"


def test_model_outside_allow_list_raises_permission_denied(gateway):
    with pytest.raises(openai.PermissionDeniedError) as err:
        gateway.client(RESTRICTED_KEY).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert err.value.code == "model_not_allowed"


def test_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-99", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found"


def test_missing_model_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "missing_model"


def test_wrong_field_type_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_body={"stream": "no"}
        )
    assert err.value.param == "stream"


def test_body_over_the_limit_raises_413(client):
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 2_000_000}]
        )
    assert err.value.status_code == 413
    assert err.value.code == "request_too_large"


def test_unreachable_provider_raises_internal_server_error(client):
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="unreachable", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 502
    assert err.value.code == "upstream_error"


def test_provider_5xx_with_nowhere_to_fail_over_is_a_502(client, mock):
    # Twice: a 500 is tried once more on the same deployment.
    mock.fault({"status": 500, "count": 2, "path": "/v1/chat/completions"})
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 502
    assert err.value.code == "upstream_error"


def test_provider_client_error_passes_through(client, mock):
    mock.fault({"status": 400, "count": 1, "path": "/v1/chat/completions"})
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 400


def test_stream_broken_mid_way_raises_in_the_sdk(client, mock):
    mock.fault({"disconnect_after_chunks": 3, "count": 1})
    received = []
    with pytest.raises(openai.APIError):
        for chunk in client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            received.append(chunk)
    assert 1 <= len(received) <= 4
    # The gateway keeps serving.
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])


def test_unknown_path_and_wrong_method(gateway):
    resp = httpx.post(f"{gateway.base_url}/nothing", headers={"authorization": f"Bearer {TENANT_KEY}"})
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "unknown_url"
    resp = httpx.delete(f"{gateway.base_url}/chat/completions")
    assert resp.status_code == 405


def test_no_key_appears_in_logs_or_metrics(gateway, client):
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        gateway.client("sk-sdk-unknown-key-77").models.list()
    text = gateway.output() + gateway.metrics()
    for key in (TENANT_KEY, RESTRICTED_KEY, PROVIDER_KEY, "sk-sdk-unknown-key-77"):
        assert key not in text


def test_rate_limit_raises_rate_limit_error(gateway):
    client = gateway.client(LIMITED_KEY)
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "rate_limit_exceeded"
    assert 0 < int(err.value.response.headers["retry-after-ms"]) <= 30_000


def test_spent_budget_raises_insufficient_quota_without_sdk_retries(gateway, mock):
    client = openai.OpenAI(base_url=gateway.base_url, api_key=BROKE_KEY, timeout=30)  # default retries
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    before = mock.stats()["requests"]
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "insufficient_quota"
    assert err.value.type == "insufficient_quota"
    assert err.value.response.headers["x-should-retry"] == "false"
    assert mock.stats()["requests"] == before
    assert time.monotonic() - started < 2, "the SDK did not back off and retry"


def test_usage_endpoint_reports_the_tenants_period(gateway):
    try:
        gateway.client(BROKE_KEY).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    except openai.RateLimitError:
        pass  # already spent by an earlier test
    resp = httpx.get(f"{gateway.base_url}/usage", headers={"authorization": f"Bearer {BROKE_KEY}"})
    assert resp.status_code == 200
    usage = resp.json()
    assert usage["object"] == "runestone.usage"
    assert usage["tenant"] == "broke"
    assert usage["period"] == "total"
    assert usage["requests"] >= 1
    assert usage["cost_usd"] > 0
    assert usage["budget"]["remaining_usd"] == 0


def test_azure_chat_and_embeddings(client, mock):
    resp = client.chat.completions.create(model="azure-chat", messages=[{"role": "user", "content": "hi"}])
    assert resp.object == "chat.completion"
    seen = mock.requests()[-1]
    assert seen["path"] == "/openai/deployments/my-chat-deployment/chat/completions"
    assert seen["headers"]["api-key"] == PROVIDER_KEY
    emb = client.embeddings.create(model="azure-embed", input="hello")
    assert len(emb.data[0].embedding) == 8
    assert mock.requests()[-1]["path"] == "/openai/deployments/my-embedding-deployment/embeddings"


def test_a_model_is_looked_up_for_its_tenant_only(gateway):
    model = gateway.client().models.retrieve("gpt-4o-mini")
    assert (model.id, model.object) == ("gpt-4o-mini", "model")
    with pytest.raises(openai.NotFoundError) as err:
        gateway.client(RESTRICTED_KEY).models.retrieve("gpt-4o-mini")
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        gateway.client().models.retrieve("no-such-model")
