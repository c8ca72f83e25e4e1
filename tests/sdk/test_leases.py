"""Quota taken ahead from Redis (`redis.lease`), through the official OpenAI
Python SDK, with llmock (software we did not write) as the provider: two
instances share one limit, bill each request once, and the SDK sees
OpenAI's rate-limit error and headers."""

import json
import time
import urllib.request

import openai
import pytest

from conftest import Llmock, Redis, Runestone, server_yaml, wait_ready, TENANT_KEY


class Leasing(Runestone):
    """runestone in front of llmock, tenant `acme` with `limits`, on Redis
    with `redis.lease`."""

    def __init__(self, llmock: Llmock, redis: Redis, limits: str):
        def config(port, metrics_port, directory):
            return server_yaml(port, metrics_port, directory) + f"""
providers:
  - {{ name: llmock, kind: openai, base_url: "{llmock.base_url}", api_key: "sk-llmock" }}
models:
  - name: gpt-4o-mini
    targets: [{{ provider: llmock }}]
tenants:
  - id: acme
    keys: ["{TENANT_KEY}"]
    limits: {limits}
pricing:
  gpt-4o-mini: {{ input: 1.0, output: 2.0 }}
redis: {{ url: "{redis.url}", timeout_ms: 2000, lease: {{ share: 0.25, ms: 5000 }} }}
"""

        super().__init__(config)

    def usage(self) -> dict:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/usage",
            headers={"authorization": f"Bearer {TENANT_KEY}"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.load(resp)


def leased(g: Runestone) -> float:
    """`runestone_leased_admissions_total` of tenant acme."""
    for line in g.metrics().splitlines():
        if line.startswith('runestone_leased_admissions_total{tenant="acme"} '):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture()
def pair():
    llmock, redis = Llmock(), Redis()
    # 20 a minute: one more every 3 s; a share of 5 ahead per instance.
    gateways = [Leasing(llmock, redis, "{ requests_per_minute: 20, max_concurrent: 8 }") for _ in range(2)]
    # Ready once Redis has answered: until then each instance would admit
    # in process, on its own.
    for g in gateways:
        wait_ready(f"http://127.0.0.1:{g.port}/ready", g.proc, "runestone with Redis")
    yield llmock, gateways
    for g in gateways:
        g.stop()
    redis.stop()
    llmock.stop()


def test_two_leasing_instances_share_one_limit_through_the_sdk(pair):
    llmock, (a, b) = pair
    served, refused, remaining = 0, 0, []
    started = time.monotonic()
    for i in range(30):
        client = (a if i % 2 == 0 else b).client()
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
        except openai.RateLimitError as e:
            assert e.code == "rate_limit_exceeded"
            assert e.response.headers["x-ratelimit-limit-requests"] == "20"
            refused += 1
            continue
        completion = raw.parse()
        assert completion.choices[0].message.content
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        served += 1
    # Never more than the limit and its refill (one every 3 s) while the
    # test ran; what each instance holds unused is at most its share.
    refill = int((time.monotonic() - started) / 3) + 1
    assert 10 <= served <= 20 + refill, (served, refused, refill)
    assert all(0 <= r < 20 for r in remaining), remaining
    assert len(llmock.journal()) == served
    # Both instances skipped Redis for some of them.
    for g in (a, b):
        assert leased(g) >= 1, g.metrics()
    # Every request billed once, seen from either instance.
    for g in (a, b):
        deadline = time.monotonic() + 10
        while g.usage()["requests"] != served:
            assert time.monotonic() < deadline, g.usage()
            time.sleep(0.05)


def test_leased_streams_are_billed_with_the_providers_usage(pair):
    _, (a, b) = pair
    tokens = 0
    for g in (a, b, a, b):
        stream = g.client().chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "stream please"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = [c.usage for c in stream if c.usage]
        assert len(usage) == 1
        tokens += usage[0].prompt_tokens + usage[0].completion_tokens
    deadline = time.monotonic() + 10
    while True:
        report = b.usage()
        if report["requests"] == 4:
            break
        assert time.monotonic() < deadline, report
        time.sleep(0.05)
    assert report["prompt_tokens"] + report["completion_tokens"] == tokens
