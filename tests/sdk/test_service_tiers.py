"""Processing tiers (`service_tier`) billed at their own prices, through
the OpenAI Python SDK: the tier an answer says served it, else the one
asked for; a tier the config does not price for a model that prices tiers
is refused before anything is sent."""

import json
import time

import httpx
import openai
import pytest

from conftest import (PROVIDER_KEY, TENANT_KEY, Llmock, LocalServer, Runestone,
                      server_yaml)

# USD per 1M tokens: (input, output) by tier.
PRICES = {"default": (1.0, 8.0), "flex": (0.5, 4.0), "priority": (2.0, 16.0)}


def tiered_config(base_url: str):
    def config(port, metrics_port, directory):
        return server_yaml(port, metrics_port, directory) + f"""
providers:
  - {{ name: acct, base_url: "{base_url}", api_key: "{PROVIDER_KEY}" }}
models:
  - name: tiered
    targets: [{{ provider: acct, model: m-tiered }}]
  - name: plain
    targets: [{{ provider: acct, model: m-plain }}]
  - name: spill
    targets: [{{ provider: acct, model: m-spill }}]
    fallbacks: [tiered]
tenants:
  - id: acme
    keys: ["{TENANT_KEY}"]
pricing:
  tiered:
    input: {PRICES["default"][0]}
    output: {PRICES["default"][1]}
    service_tiers:
      flex: {{ input: {PRICES["flex"][0]}, output: {PRICES["flex"][1]} }}
      priority: {{ input: {PRICES["priority"][0]}, output: {PRICES["priority"][1]} }}
  plain: {{ input: 1.0, output: 8.0 }}
  spill: {{ input: 1.0, output: 8.0 }}
"""
    return config


@pytest.fixture(scope="module")
def gateway(mock):
    g = Runestone(tiered_config(mock.base_url))
    yield g
    g.stop()


def spent(gateway: Runestone) -> float:
    usage = httpx.get(f"http://127.0.0.1:{gateway.port}/v1/usage",
                      headers={"authorization": f"Bearer {TENANT_KEY}"}, timeout=10)
    return usage.json()["cost_usd"]


def cost(tier: str, prompt: int, completion: int) -> float:
    price_in, price_out = PRICES[tier]
    return (prompt * price_in + completion * price_out) / 1e6


def access_line(gateway: Runestone, request_id: str) -> dict:
    """The access log line of `request_id` (the log is written off the
    request path: waited for, within a bound)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in gateway.output().splitlines():
            if '"type":"access"' in line and request_id in line:
                return json.loads(line)
        time.sleep(0.05)
    raise AssertionError(f"no access log line for {request_id}")


def billed_at(gateway, tier, call):
    """Runs `call` (which returns the answer's usage and request id) and
    checks what it added to the tenant's spend is `tier`'s price."""
    before = spent(gateway)
    (prompt, completion), request_id = call()
    assert prompt > 0 and completion > 0
    assert spent(gateway) - before == pytest.approx(cost(tier, prompt, completion), abs=1e-12), tier
    return access_line(gateway, request_id)


def chat(client, model, stream=False, **extra):
    messages = [{"role": "user", "content": "Say something"}]
    if not stream:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=messages, **extra)
        answer = raw.parse()
        return answer, raw.headers["x-request-id"]
    with client.chat.completions.with_streaming_response.create(
            model=model, messages=messages, stream=True,
            stream_options={"include_usage": True}, **extra) as raw:
        chunks = list(raw.parse())
        return chunks, raw.headers["x-request-id"]


@pytest.mark.parametrize("asked,served", [
    ("priority", "priority"), ("fast", "priority"), ("flex", "flex"), ("default", "default"),
])
def test_a_chat_answer_is_billed_at_the_tier_that_served_it(gateway, asked, served):
    client = gateway.client()

    def call():
        answer, request_id = chat(client, "tiered", service_tier=asked)
        assert answer.service_tier == served
        return (answer.usage.prompt_tokens, answer.usage.completion_tokens), request_id

    line = billed_at(gateway, served, call)
    # The log says which tier's price the tokens were billed at.
    assert line.get("service_tier") == (None if served == "default" else served), line


def test_a_chat_stream_is_billed_at_the_tier_its_chunks_name(gateway):
    client = gateway.client()

    def call():
        chunks, request_id = chat(client, "tiered", stream=True, service_tier="flex")
        assert {c.service_tier for c in chunks} == {"flex"}
        usage = chunks[-1].usage
        return (usage.prompt_tokens, usage.completion_tokens), request_id

    assert billed_at(gateway, "flex", call)["service_tier"] == "flex"


def test_the_tier_the_answer_names_wins_over_the_one_asked_for(gateway):
    """OpenAI may serve a priority request at the standard tier (past its
    ramp), and a request left to `auto` at the project's tier: the answer
    says which, and that is what is billed."""
    client = gateway.client()
    for stream in (False, True):
        for asked, served in [("priority", "default"), ("auto", "priority"), ("flex", "priority")]:
            def call():
                answer, request_id = chat(client, "tiered", stream=stream, service_tier=asked,
                                          extra_body={"mock_service_tier": served})
                last = answer[-1] if stream else answer
                assert last.service_tier == served
                return (last.usage.prompt_tokens, last.usage.completion_tokens), request_id

            billed_at(gateway, served, call)


def test_a_responses_answer_is_billed_at_its_tier(gateway):
    client = gateway.client()

    def call():
        raw = client.responses.with_raw_response.create(
            model="tiered", input="Say something", service_tier="priority")
        response = raw.parse()
        assert response.service_tier == "priority"
        return (response.usage.input_tokens, response.usage.output_tokens), raw.headers["x-request-id"]

    billed_at(gateway, "priority", call)

    def streamed():
        with client.responses.with_streaming_response.create(
                model="tiered", input="Say something", service_tier="auto", stream=True,
                extra_body={"mock_service_tier": "flex"}) as raw:
            events = list(raw.parse())
            completed = events[-1].response
            assert (events[-1].type, completed.service_tier) == ("response.completed", "flex")
            usage = completed.usage
            return (usage.input_tokens, usage.output_tokens), raw.headers["x-request-id"]

    billed_at(gateway, "flex", streamed)


def test_a_tier_without_a_price_is_refused_before_anything_is_sent(gateway, mock):
    client = gateway.client()
    sent = len(mock.requests())
    before = spent(gateway)
    for model, tier in [("tiered", "scale"), ("tiered", "turbo"), ("spill", "scale")]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], service_tier=tier)
        error = refused.value.body
        assert error["param"] == "service_tier", error
        assert error["code"] == "invalid_value", error
        # The model whose price lacks it is named (a fallback's too), and
        # what it takes.
        assert "'tiered'" in error["message"], error
        assert "auto, default, flex, priority" in error["message"], error
    assert len(mock.requests()) == sent
    assert spent(gateway) == before


def test_a_model_without_tier_prices_bills_every_tier_at_its_one_price(gateway):
    client = gateway.client()

    def call():
        answer, request_id = chat(client, "plain", service_tier="priority")
        assert answer.service_tier == "priority"
        return (answer.usage.prompt_tokens, answer.usage.completion_tokens), request_id

    # `plain` costs what `tiered` costs at the standard tier.
    assert "service_tier" not in billed_at(gateway, "default", call)


def test_an_answer_that_names_no_tier_is_billed_at_the_one_asked_for_but_a_discount():
    """llmock (a server we did not write) says nothing of tiers: priority
    asked for is billed at priority, flex (cheaper) at the standard price,
    as such a server serves what it always serves."""
    llmock = Llmock()
    gateway = Runestone(tiered_config(llmock.base_url))
    try:
        client = gateway.client()
        for stream in (False, True):
            for asked, billed in [("priority", "priority"), ("flex", "default")]:
                def call():
                    answer, request_id = chat(client, "tiered", stream=stream, service_tier=asked)
                    last = answer[-1] if stream else answer
                    assert last.service_tier is None
                    return (last.usage.prompt_tokens, last.usage.completion_tokens), request_id

                line = billed_at(gateway, billed, call)
                assert line.get("service_tier") == (None if billed == "default" else billed)
        sent = [r["body"].get("service_tier") for r in llmock.journal()
                if r["path"] == "/v1/chat/completions"]
        assert sent == ["priority", "flex"] * 2, "passed on as asked"
    finally:
        gateway.stop()
        llmock.stop()


def test_a_provider_that_repeats_the_tier_is_read_whole_and_billed_at_the_last():
    """A hand-written provider whose answers give `service_tier` twice (as
    JSON readers do, the last counts): nothing of its stream is lost."""
    def chunk(delta, finish=None, usage=None):
        event = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage:
            event["usage"] = usage
        text = json.dumps(event)
        return "data: " + text.replace('"id"', '"service_tier": "default", "service_tier": "priority", "id"', 1) + "\n\n"

    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}

    def post(request, body):
        if json.loads(body).get("stream"):
            events = [chunk({"role": "assistant", "content": "Hel"}), chunk({"content": "lo"}),
                      chunk({}, "stop"), chunk({}, usage=usage), "data: [DONE]\n\n"]
            return 200, "text/event-stream", "".join(events).encode()
        answer = {"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                               "finish_reason": "stop"}], "usage": usage}
        text = json.dumps(answer)[:-1] + ', "service_tier": "default", "service_tier": "priority"}'
        return 200, "application/json", text.encode()

    provider = LocalServer(post)
    gateway = Runestone(tiered_config(provider.base_url))
    try:
        client = gateway.client()
        for stream in (False, True):
            def call():
                answer, request_id = chat(client, "tiered", stream=stream, service_tier="flex")
                if stream:
                    assert "".join(c.choices[0].delta.content or "" for c in answer if c.choices) == "Hello"
                    answer = answer[-1]
                assert answer.service_tier == "priority"
                return (answer.usage.prompt_tokens, answer.usage.completion_tokens), request_id

            billed_at(gateway, "priority", call)
    finally:
        gateway.stop()
        provider.stop()
