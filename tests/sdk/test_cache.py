"""Issue #22 through the official OpenAI Python SDK: the response cache.
Hits and misses with the provider's own request count checked (runestone-mock
and llmock, an upstream we did not write), expiry, tenant isolation, key
canonicalisation, stream-from-JSON and JSON-from-stream replays parsed by
the SDK, 50 concurrent identical requests making one provider call, two
instances sharing Redis, Redis down, the in-process bound, Cache-Control,
only complete answers stored, and the accounting of hits.
"""

import concurrent.futures
import json
import time

import httpx
import pytest

from conftest import PROVIDER_KEY, TENANT_KEY, Llmock, LocalServer, Redis, Runestone, server_yaml

OTHER_KEY = "sk-sdk-cache-other-0022"
OPTED_OUT_KEY = "sk-sdk-cache-optout-0023"

# `short-lived`'s TTL: long enough that a second ask lands within it even on
# a slow machine, so the test waits it out once.
SHORT_TTL_S = 3

# How long the mock holds a first request's answer back where a test needs
# that request in flight while others join it: far longer than sending and
# admitting a few requests takes, even on a loaded machine. Each such test
# waits it out once.
HOLD_MS = 5000

# Redis calls are bounded by this: a call over it is a miss (or a store
# lost). Tests here kill Redis, they never make it slow, so it is generous:
# a loaded machine's slow round trip (or the first connection) must not
# change an outcome.
REDIS_TIMEOUT_MS = 2000


class Gateway(Runestone):
    """runestone with a response cache in front of `base_url`: `gpt-4o-mini`
    (priced), `short-lived` (a TTL of SHORT_TTL_S), `uncached` (cache: false),
    `text-embedding-3-small`; tenants `acme`, `other` and `optout`."""

    def __init__(self, base_url: str, cache: str = "{}", redis_url: str | None = None):
        redis = f'redis: {{ url: "{redis_url}", timeout_ms: {REDIS_TIMEOUT_MS} }}' if redis_url else ""

        def config(port, metrics_port, directory):
            return server_yaml(port, metrics_port, directory) + f"""
{redis}
providers:
  - {{ name: upstream, base_url: "{base_url}", api_key: "{PROVIDER_KEY}" }}
models:
  - name: gpt-4o-mini
    targets: [{{ provider: upstream, model: mock-small }}]
  - name: short-lived
    targets: [{{ provider: upstream, model: mock-small }}]
    cache: {{ ttl_seconds: {SHORT_TTL_S} }}
  - name: uncached
    targets: [{{ provider: upstream, model: mock-small }}]
    cache: false
  - name: text-embedding-3-small
    targets: [{{ provider: upstream }}]
tenants:
  - id: acme
    keys: ["{TENANT_KEY}"]
  - id: other
    keys: ["{OTHER_KEY}"]
  - id: optout
    keys: ["{OPTED_OUT_KEY}"]
    cache: false
pricing:
  gpt-4o-mini: {{ input: 1.0, output: 2.0 }}
  short-lived: {{ input: 1.0, output: 2.0 }}
cache: {cache}
"""

        super().__init__(config)

    def usage(self, key: str = TENANT_KEY) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.port}/v1/usage",
                         headers={"authorization": f"Bearer {key}"}).json()

    def metric(self, name: str, **labels) -> float:
        """The sum of the series of `name` with these labels."""
        return sum(float(line.rsplit(" ", 1)[1]) for line in self.metrics().splitlines()
                   if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))


@pytest.fixture()
def gateway(mock):
    g = Gateway(mock.base_url)
    yield g
    g.stop()


def eventually(check, timeout: float = 5.0):
    """Polls `check` until it is true or `timeout` passes; its last value.
    A request's metrics are written after its last byte, so a client can
    read its answer's end before they are."""
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


class Held:
    """The mock's hold (HOLD_MS) on the answer to a request about to be
    sent: the hold starts only once the request reaches the mock, so until
    HOLD_MS after now, that request is surely still in flight. `check`
    says when others joined only after the hold may have ended: the
    machine was too slow, or the gateway did not take them in while the
    first was in flight."""

    def __init__(self):
        self.until = time.monotonic() + HOLD_MS / 1000

    def check(self, what: str) -> None:
        assert time.monotonic() < self.until, (
            f"{what} only after the first request's {HOLD_MS} ms hold at the mock may "
            "have ended: either the machine is too slow for this test, or the gateway "
            "did not admit or serve them while the first was in flight")


def wait_admitted(gateway, count: int, held: Held, what: str) -> None:
    """Waits until `count` of acme's requests are admitted and in flight,
    which must be while the first one is still `held`."""
    while True:
        admitted = gateway.metric("runestone_inflight_requests", tenant="acme") >= count
        held.check(what)  # after the read: it was admitted in time
        if admitted:
            return
        time.sleep(0.01)


def calls(mock) -> int:
    return mock.stats()["by_path"].get("/v1/chat/completions", 0)


def ask(gateway, content="What is 2+2?", key=TENANT_KEY, model="gpt-4o-mini", headers=None, **kwargs):
    kwargs.setdefault("temperature", 0)
    raw = gateway.client(key).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}], extra_headers=headers or {}, **kwargs)
    return raw.headers, raw.parse()


def test_a_repeated_request_is_answered_once(gateway, mock):
    before = calls(mock)
    first_headers, first = ask(gateway)
    assert first_headers["x-runestone-cache"] == "miss"
    headers, again = ask(gateway)
    assert headers["x-runestone-cache"] == "hit"
    assert int(headers["age"]) >= 0
    assert calls(mock) == before + 1
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage == first.usage
    assert again.model == first.model
    assert again.id != first.id and again.id.startswith("chatcmpl-")
    assert headers["x-request-id"] != first_headers["x-request-id"]
    assert "x-ratelimit-limit-requests" not in headers or headers["x-ratelimit-limit-requests"]


def test_the_key_is_canonical_and_a_changed_sampling_misses(gateway, mock):
    url = f"http://127.0.0.1:{gateway.port}/v1/chat/completions"
    auth = {"authorization": f"Bearer {TENANT_KEY}", "content-type": "application/json"}
    bodies = [
        '{"model":"gpt-4o-mini","temperature":0,"messages":[{"role":"user","content":"canon"}]}',
        '{ "messages": [ { "content": "canon", "role": "user" } ],\n  "temperature": 0, "model": "gpt-4o-mini", "user": "u-7", "metadata": {"run": "x"} }',
    ]
    before = calls(mock)
    answers = [httpx.post(url, headers=auth, content=b, timeout=10) for b in bodies]
    assert [a.headers["x-runestone-cache"] for a in answers] == ["miss", "hit"]
    assert calls(mock) == before + 1
    changed = httpx.post(url, headers=auth, timeout=10,
                         content='{"model":"gpt-4o-mini","temperature":0,"seed":3,"messages":[{"role":"user","content":"canon"}]}')
    assert changed.headers["x-runestone-cache"] == "miss"
    assert calls(mock) == before + 2


def test_only_deterministic_requests_are_cached_and_opt_outs_bypass(gateway, mock):
    before = calls(mock)
    for _ in range(2):
        headers, _ = ask(gateway, "sampled", temperature=0.7)
        assert headers["x-runestone-cache"] == "bypass"
    headers, _ = ask(gateway, "seeded", temperature=0.7, seed=42)
    assert headers["x-runestone-cache"] == "miss"
    headers, _ = ask(gateway, "seeded", temperature=0.7, seed=42)
    assert headers["x-runestone-cache"] == "hit"
    for _ in range(2):
        assert ask(gateway, "opted out", key=OPTED_OUT_KEY)[0]["x-runestone-cache"] == "bypass"
        assert ask(gateway, "model off", model="uncached")[0]["x-runestone-cache"] == "bypass"
    assert calls(mock) == before + 2 + 1 + 4


def test_tenants_never_share_an_answer(gateway, mock):
    before = calls(mock)
    assert ask(gateway, "shared question")[0]["x-runestone-cache"] == "miss"
    assert ask(gateway, "shared question", key=OTHER_KEY)[0]["x-runestone-cache"] == "miss"
    assert ask(gateway, "shared question", key=OTHER_KEY)[0]["x-runestone-cache"] == "hit"
    assert calls(mock) == before + 2


def test_an_entry_expires_with_its_ttl(gateway, mock):
    before = calls(mock)
    # Before the entry is stored: it cannot expire before SHORT_TTL_S from here.
    sent = time.monotonic()
    assert ask(gateway, "ephemeral", model="short-lived")[0]["x-runestone-cache"] == "miss"
    assert ask(gateway, "ephemeral", model="short-lived")[0]["x-runestone-cache"] == "hit"
    # Hits until the TTL runs out, then one more provider call.
    deadline = sent + SHORT_TTL_S + 10
    while ask(gateway, "ephemeral", model="short-lived")[0]["x-runestone-cache"] == "hit":
        assert time.monotonic() < deadline, "the entry outlived its TTL"
        time.sleep(0.1)
    assert time.monotonic() - sent >= SHORT_TTL_S, "the entry expired before its TTL"
    assert calls(mock) == before + 2


def test_cache_control_no_cache_refreshes_and_no_store_leaves_no_trace(gateway, mock):
    before = calls(mock)
    assert ask(gateway, "control", headers={"cache-control": "no-store"})[0]["x-runestone-cache"] == "bypass"
    assert ask(gateway, "control")[0]["x-runestone-cache"] == "miss", "no-store stored nothing"
    assert ask(gateway, "control", headers={"cache-control": "max-age=0, No-Cache"})[0]["x-runestone-cache"] == "bypass"
    assert ask(gateway, "control")[0]["x-runestone-cache"] == "hit"
    assert calls(mock) == before + 3


def stream(gateway, content, include_usage, key=TENANT_KEY):
    raw = gateway.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}], temperature=0, stream=True,
        stream_options={"include_usage": True} if include_usage else None)
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = [c.usage for c in chunks if c.usage]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return raw.headers, chunks, text, usage, finish


def test_a_stream_replays_a_json_answer_and_json_replays_a_stream(gateway, mock):
    before = calls(mock)
    _, original = ask(gateway, "json first")
    headers, chunks, text, usage, finish = stream(gateway, "json first", include_usage=True)
    assert headers["x-runestone-cache"] == "hit"
    assert headers["content-type"].startswith("text/event-stream")
    assert text == original.choices[0].message.content
    assert usage == [original.usage]
    assert finish == [original.choices[0].finish_reason]
    assert len({c.id for c in chunks}) == 1 and chunks[0].id != original.id
    # Without include_usage, no usage chunk.
    _, _, again, usage, _ = stream(gateway, "json first", include_usage=False)
    assert again == text and usage == []

    headers, chunks, streamed, usage, finish = stream(gateway, "stream first", include_usage=False)
    assert headers["x-runestone-cache"] == "miss"
    headers, answer = ask(gateway, "stream first")
    assert headers["x-runestone-cache"] == "hit"
    assert answer.choices[0].message.content == streamed
    assert answer.choices[0].finish_reason == finish[0]
    assert answer.object == "chat.completion" and answer.model == chunks[0].model
    assert answer.usage.completion_tokens > 0
    assert calls(mock) == before + 2


def test_fifty_concurrent_identical_requests_make_one_provider_call(gateway, mock):
    before = calls(mock)
    # The first answer takes a while (longer than fifty threads take to
    # send, even on a loaded machine), so other requests find it in flight;
    # any that come later find it stored.
    mock.fault({"first_token_ms": 2000, "count": 1, "path": "/v1/chat/completions"})

    def one(i):
        if i % 2:
            _, _, text, usage, _ = stream(gateway, "stampede", include_usage=True)
            return text, usage[0].total_tokens
        headers, answer = ask(gateway, "stampede")
        return answer.choices[0].message.content, answer.usage.total_tokens

    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(one, range(50)))
    assert calls(mock) == before + 1
    assert len(set(answers)) == 1, answers
    def outcomes():
        return {o: gateway.metric("runestone_cache_total", outcome=o, tenant="acme") for o in ("miss", "hit", "coalesced")}
    eventually(lambda: sum(outcomes().values()) == 50)
    outcomes = outcomes()
    assert outcomes["miss"] == 1 and outcomes["coalesced"] + outcomes["hit"] == 49, outcomes
    assert outcomes["coalesced"] > 0, "none joined the first request's call while it was in flight"


def test_errors_and_broken_streams_are_never_stored(gateway, mock):
    before = calls(mock)
    mock.fault({"status": 500, "count": 2, "path": "/v1/chat/completions"})
    with pytest.raises(Exception):
        ask(gateway, "fails")
    assert ask(gateway, "fails")[0]["x-runestone-cache"] == "miss"
    mock.fault({"disconnect_after_chunks": 2, "count": 1, "path": "/v1/chat/completions"})
    with pytest.raises(Exception):
        stream(gateway, "breaks", include_usage=False)
    assert stream(gateway, "breaks", include_usage=False)[0]["x-runestone-cache"] == "miss"
    assert ask(gateway, "breaks")[0]["x-runestone-cache"] == "hit"
    assert calls(mock) >= before + 4


def test_embeddings_are_cached_whatever_the_sampling(gateway, mock):
    client = gateway.client()
    first = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["a", "b"])
    again = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["a", "b"])
    assert (first.headers["x-runestone-cache"], again.headers["x-runestone-cache"]) == ("miss", "hit")
    assert again.parse().data[1].embedding == first.parse().data[1].embedding
    assert mock.stats()["by_path"]["/v1/embeddings"] >= 1


def test_hits_are_accounted_as_requests_without_tokens_and_their_savings_shown(gateway, mock):
    before = gateway.usage()
    _, answer = ask(gateway, "accounting")
    cost = (answer.usage.prompt_tokens * 1.0 + answer.usage.completion_tokens * 2.0) / 1e6
    for _ in range(3):
        assert ask(gateway, "accounting")[0]["x-runestone-cache"] == "hit"
    after = gateway.usage()
    assert after["requests"] == before["requests"] + 4
    assert after["prompt_tokens"] == before["prompt_tokens"] + answer.usage.prompt_tokens
    assert after["completion_tokens"] == before["completion_tokens"] + answer.usage.completion_tokens
    assert after["cost_usd"] == pytest.approx(before["cost_usd"] + cost)
    assert after["cache_hits"] == before["cache_hits"] + 3
    assert after["cache_saved_usd"] == pytest.approx(before["cache_saved_usd"] + 3 * cost)
    assert gateway.metric("runestone_cache_saved_usd_total", tenant="acme", model="gpt-4o-mini") == pytest.approx(after["cache_saved_usd"])
    lines = [json.loads(l) for l in gateway.output().splitlines() if l.startswith("{") and '"cache":"hit"' in l]
    assert lines and all(l["prompt_tokens"] == 0 and l["cost_usd"] == 0 and l["attempts"] == 0 for l in lines)
    assert gateway.metric("runestone_requests_total", tenant="acme", model="gpt-4o-mini", status="200") == 4


def test_the_in_process_store_keeps_its_bound(mock):
    gateway = Gateway(mock.base_url, cache="{ max_entry_bytes: 2048, max_memory_bytes: 16384 }")
    try:
        before = calls(mock)
        for i in range(60):
            assert ask(gateway, f"distinct {i}")[0]["x-runestone-cache"] == "miss"
        assert ask(gateway, "distinct 59")[0]["x-runestone-cache"] == "hit", "the newest is kept"
        assert ask(gateway, "distinct 0")[0]["x-runestone-cache"] == "miss", "the oldest went"
        assert calls(mock) == before + 61
        big = "x" * 3000
        assert ask(gateway, big)[0]["x-runestone-cache"] == "miss"
        assert ask(gateway, big)[0]["x-runestone-cache"] == "hit", "the answer is small; the prompt is not stored"
    finally:
        gateway.stop()


def test_two_instances_share_entries_in_redis_and_redis_down_is_a_miss(mock):
    redis = Redis()
    a = Gateway(mock.base_url, redis_url=redis.url)
    b = Gateway(mock.base_url, redis_url=redis.url)
    try:
        before = calls(mock)
        assert ask(a, "shared by instances")[0]["x-runestone-cache"] == "miss"
        headers, answer = ask(b, "shared by instances")
        assert headers["x-runestone-cache"] == "hit"
        assert calls(mock) == before + 1
        assert ask(b, "shared by instances", key=OTHER_KEY)[0]["x-runestone-cache"] == "miss"
        redis.stop()
        for gateway in (a, b):
            headers, again = ask(gateway, "shared by instances")
            assert headers["x-runestone-cache"] == "miss"
            assert again.choices[0].message.content == answer.choices[0].message.content
        redis.start()
        deadline = time.monotonic() + 15
        while ask(a, "after the restart")[0]["x-runestone-cache"] != "hit":
            assert time.monotonic() < deadline, "entries are stored again once Redis is back"
            time.sleep(0.2)
    finally:
        a.stop()
        b.stop()
        redis.stop()


def test_llmock_answers_replay_as_the_sdk_expects():
    llmock = Llmock()
    gateway = Gateway(llmock.base_url)
    try:
        _, original = ask(gateway, "llmock json")
        headers, _, text, usage, finish = stream(gateway, "llmock json", include_usage=True)
        assert headers["x-runestone-cache"] == "hit"
        assert text == original.choices[0].message.content
        assert usage[0].total_tokens == original.usage.total_tokens
        headers, _, streamed, _, _ = stream(gateway, "llmock stream", include_usage=False)
        assert headers["x-runestone-cache"] == "miss"
        headers, answer = ask(gateway, "llmock stream")
        assert headers["x-runestone-cache"] == "hit"
        assert answer.choices[0].message.content == streamed
        asked = [r for r in llmock.journal() if r["path"] == "/v1/chat/completions"]
        assert len(asked) == 2
    finally:
        gateway.stop()
        llmock.stop()


def test_a_stream_whose_client_leaves_at_done_is_whole_and_stored(gateway, mock):
    # The SDK stops reading at `[DONE]` and closes; a provider may end its
    # body a moment later. The answer was whole: the gateway reads the
    # body's end, stores the answer and keeps the provider's connection
    # (it dropped both, and the next identical request was a miss).
    before = calls(mock)
    disconnects = mock.stats()["disconnects"]
    broken = gateway.metric("runestone_errors_total", reason="provider_stream_broken")
    mock.fault({"linger_ms": 700, "count": 1, "path": "/v1/chat/completions"})
    headers, _, streamed, _, _ = stream(gateway, "the end trails", include_usage=False)
    assert headers["x-runestone-cache"] == "miss"
    headers, answer = ask(gateway, "the end trails")
    assert headers["x-runestone-cache"] == "hit"
    assert answer.choices[0].message.content == streamed
    assert calls(mock) == before + 1
    assert mock.stats()["disconnects"] == disconnects, "the provider's body was read to its end"
    assert gateway.metric("runestone_errors_total", reason="provider_stream_broken") == broken


def raw_stream(gateway, content, key=TENANT_KEY, read_events=None, before_leaving=None):
    """Streams with httpx; reads `read_events` events (then, once
    `before_leaving()` returns, leaves) or the whole stream. The events
    read, as text."""
    events = []
    with httpx.stream("POST", f"http://127.0.0.1:{gateway.port}/v1/chat/completions",
                      headers={"authorization": f"Bearer {key}"}, timeout=30,
                      json={"model": "gpt-4o-mini", "temperature": 0, "stream": True,
                            "messages": [{"role": "user", "content": content}]}) as answer:
        for line in answer.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if read_events is not None and len(events) >= read_events:
                    if before_leaving:
                        before_leaving()
                    break
    return events


def stream_text_of(events) -> str:
    text = ""
    for event in events:
        if event != "[DONE]":
            chunk = json.loads(event)
            if chunk.get("choices"):
                text += chunk["choices"][0]["delta"].get("content") or ""
    return text


def wait_for_call(mock, before, timeout=10):
    deadline = time.monotonic() + timeout
    while calls(mock) == before:
        assert time.monotonic() < deadline, "the first request never reached the provider"
        time.sleep(0.01)


def test_waiters_keep_the_call_going_when_the_first_client_leaves_before_its_answer(gateway, mock):
    reference = ask(gateway, "left early reference")[1].choices[0].message.content
    before = calls(mock)
    # The answer comes HOLD_MS after the call; the first client leaves well
    # before (its read times out after `leaves_s`), and the others must be
    # waiting by then: `leaves_s` is their time to come in.
    leaves_s = HOLD_MS / 2000
    mock.fault({"first_token_ms": HOLD_MS, "count": 1, "path": "/v1/chat/completions"})
    started = time.monotonic()
    sent = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=11) as pool:
        def leaves():
            with pytest.raises(httpx.TimeoutException):
                httpx.post(f"http://127.0.0.1:{gateway.port}/v1/chat/completions",
                           headers={"authorization": f"Bearer {TENANT_KEY}"}, timeout=leaves_s,
                           json={"model": "gpt-4o-mini", "temperature": 0,
                                 "messages": [{"role": "user", "content": "left early"}]})
            return time.monotonic() - started

        def waiter(answer):
            sent.append(time.monotonic() - started)
            return answer()

        first = pool.submit(leaves)
        wait_for_call(mock, before)
        jsons = [pool.submit(waiter, lambda: ask(gateway, "left early")[1].choices[0].message.content)
                 for _ in range(5)]
        streams = [pool.submit(waiter, lambda: stream_text_of(raw_stream(gateway, "left early")))
                   for _ in range(5)]
        left = first.result()
        answers = [f.result() for f in jsons + streams]
    assert calls(mock) == before + 1, (
        "one provider call for all of them "
        f"(the waiters were sent {min(sent):.2f}-{max(sent):.2f} s in, the first client left {left:.2f} s in"
        + ("; too late: a machine this slow cannot run this test)" if max(sent) >= left else ")"))
    assert answers == [reference] * 10


def test_a_waiter_that_leaves_before_the_landing_is_logged_as_such(gateway, mock):
    # Its line had status 0 and no error: neither answered nor failed.
    closed = gateway.metric("runestone_errors_total", reason="client_closed")
    before = calls(mock)
    mock.fault({"first_token_ms": HOLD_MS, "count": 1, "path": "/v1/chat/completions"})
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(ask, gateway, "the waiter leaves")
        wait_for_call(mock, before)
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"http://127.0.0.1:{gateway.port}/v1/chat/completions",
                       headers={"authorization": f"Bearer {TENANT_KEY}", "x-request-id": "waiter-leaves"},
                       timeout=HOLD_MS / 5000,
                       json={"model": "gpt-4o-mini", "temperature": 0,
                             "messages": [{"role": "user", "content": "the waiter leaves"}]})
        line = eventually(lambda: next((json.loads(l) for l in gateway.output().splitlines()
                                        if '"request_id":"waiter-leaves"' in l), None))
        first.result()
    assert line["error"] == "client_closed" and line["status"] == 0
    assert calls(mock) == before + 1
    assert gateway.metric("runestone_errors_total", reason="client_closed") == closed + 1


def test_followers_get_the_whole_stream_when_the_first_client_leaves_mid_stream(gateway, mock):
    reference = stream_text_of(raw_stream(gateway, "mid-stream reference"))
    before = calls(mock)
    mock.fault({"stall_after_chunks": 3, "stall_ms": HOLD_MS, "count": 1, "path": "/v1/chat/completions"})
    held = Held()

    def followers_in():
        # The first client leaves once the five others are in (admitted),
        # while the mock still holds the rest of the stream: mid-stream.
        wait_admitted(gateway, 6, held, "the five followers were admitted")

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        first = pool.submit(raw_stream, gateway, "mid-stream", TENANT_KEY, 2, followers_in)
        wait_for_call(mock, before)
        followers = [pool.submit(raw_stream, gateway, "mid-stream") for _ in range(5)]
        assert len(first.result()) == 2
        got = [f.result() for f in followers]
    assert all(events[-1] == "[DONE]" and stream_text_of(events) == reference for events in got)
    assert calls(mock) == before + 1


def test_a_follower_leaving_mid_stream_is_a_coalesced_request_not_a_broken_stream(gateway, mock):
    # SDKs close a stream at `[DONE]`, often before the first request's
    # body has ended: a follower leaving is its client's doing, served from
    # the flight as far as it read (it was counted as a broken provider
    # stream, and its request and cache outcome went uncounted).
    before = calls(mock)
    mock.fault({"stall_after_chunks": 3, "stall_ms": HOLD_MS, "count": 1, "path": "/v1/chat/completions"})

    broken = gateway.metric("runestone_errors_total", reason="provider_stream_broken")
    closed = gateway.metric("runestone_errors_total", reason="client_closed")
    coalesced = gateway.metric("runestone_cache_total", outcome="coalesced", tenant="acme")
    saved = gateway.metric("runestone_cache_saved_usd_total", tenant="acme")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        held = Held()
        first = pool.submit(raw_stream, gateway, "follower leaves")
        wait_for_call(mock, before)
        # It reads the start of the first request's stream and leaves while
        # the mock still holds the rest (a stored answer, then, would not be
        # there yet: it follows that stream, not a hit).
        assert len(raw_stream(gateway, "follower leaves", TENANT_KEY, 2,
                              lambda: held.check("the follower read its first events"))) == 2
        assert first.result()[-1] == "[DONE]"
    assert calls(mock) == before + 1
    assert eventually(lambda: gateway.metric("runestone_cache_total", outcome="coalesced", tenant="acme") == coalesced + 1)
    assert gateway.metric("runestone_errors_total", reason="provider_stream_broken") == broken
    # Its client left before the answer was whole (only this one: the
    # first read to its end).
    assert gateway.metric("runestone_errors_total", reason="client_closed") == closed + 1
    # Left mid-stream, so nothing counted as saved (a follower that read
    # the whole stream would have saved the call's cost).
    assert gateway.metric("runestone_cache_saved_usd_total", tenant="acme") == saved


def test_followers_of_a_stream_larger_than_an_entry_get_all_of_it(mock):
    gateway = Gateway(mock.base_url, cache="{ max_entry_bytes: 1024 }")
    try:
        before = calls(mock)
        mock.fault({"stall_after_chunks": 3, "stall_ms": HOLD_MS, "count": 1, "path": "/v1/chat/completions"})
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            held = Held()
            first = pool.submit(raw_stream, gateway, "long stream")
            wait_for_call(mock, before)
            followers = [pool.submit(raw_stream, gateway, "long stream") for _ in range(3)]
            # They join while the mock holds the stream: followers, not
            # later requests of their own.
            wait_admitted(gateway, 4, held, "the three followers were admitted")
            whole = first.result()
            got = [f.result() for f in followers]
        assert len("\n\n".join(whole)) > 1024 and whole[-1] == "[DONE]"
        assert all(events == whole for events in got), "followers get the same stream, whole"
        assert calls(mock) == before + 1
        # Served whole without a provider call of their own: coalesced, not broken.
        assert eventually(lambda: gateway.metric("runestone_cache_total", outcome="coalesced") == 3)
        assert gateway.metric("runestone_errors_total", reason="provider_stream_broken") == 0
        # Too large to store: the next one asks the provider.
        assert ask(gateway, "long stream")[0]["x-runestone-cache"] == "miss"
    finally:
        gateway.stop()


class OddProvider(LocalServer):
    """A provider that answers 200 with whatever it is told to."""

    def __init__(self):
        self.body = b"{}"
        self.calls = 0
        super().__init__(self.answer)

    def answer(self, request, body):
        self.calls += 1
        return 200, "application/json", self.body


def test_a_200_that_is_not_an_answer_is_never_stored():
    provider = OddProvider()
    gateway = Gateway(provider.base_url)
    url = f"http://127.0.0.1:{gateway.port}/v1/chat/completions"
    body = {"model": "gpt-4o-mini", "temperature": 0, "messages": [{"role": "user", "content": "odd"}]}
    try:
        post = lambda: httpx.post(url, headers={"authorization": f"Bearer {TENANT_KEY}"}, json=body, timeout=10)
        for odd in [b"{}", b'{"detail":"x"}', b'{"object":"chat.completion","choices":[]}']:
            provider.body = odd
            before = provider.calls
            for _ in range(2):
                assert post().headers["x-runestone-cache"] == "miss", odd
            assert provider.calls == before + 2
        # vLLM's error under a 200 is the error it carries, asked again each time.
        provider.body = b'{"object":"error","message":"The server is overloaded"}'
        before = provider.calls
        for _ in range(2):
            answer = post()
            assert answer.status_code == 502
            assert answer.json()["error"]["message"] == "The server is overloaded"
        assert provider.calls >= before + 2
    finally:
        gateway.stop()
        provider.stop()


def test_a_lowered_ttl_applies_to_entries_already_stored(mock):
    redis = Redis()
    gateway = Gateway(mock.base_url, redis_url=redis.url)
    try:
        assert ask(gateway, "long-lived")[0]["x-runestone-cache"] == "miss"
        assert ask(gateway, "long-lived")[0]["x-runestone-cache"] == "hit"
        gateway.stop()
        gateway = Gateway(mock.base_url, cache="{ ttl_seconds: 1 }", redis_url=redis.url)
        deadline = time.monotonic() + 10
        while ask(gateway, "long-lived")[0]["x-runestone-cache"] == "hit":
            assert time.monotonic() < deadline, "an entry older than the new TTL is not served"
            time.sleep(0.1)
    finally:
        gateway.stop()
        redis.stop()


def test_an_answer_billed_on_the_gateways_own_count_is_not_stored(gateway, mock):
    for include_usage in (True, False):
        content = f"no usage {include_usage}"
        mock.fault({"no_usage": True, "count": 1, "path": "/v1/chat/completions"})
        headers, _, _, usage, _ = stream(gateway, content, include_usage=include_usage)
        assert headers["x-runestone-cache"] == "miss"
        assert bool(usage) == include_usage, "the gateway's count as the usage chunk when asked"
        assert ask(gateway, content)[0]["x-runestone-cache"] == "miss"
        assert ask(gateway, content)[0]["x-runestone-cache"] == "hit", "the provider's own usage is kept"
