"""Issue #14 through the official OpenAI Python SDK, with an upstream we did
not write (llmock, from PyPI) as well as our own mock.

- llmock as the provider: a body carrying foreign upstream fields reaches it
  without them and otherwise intact (llmock's own journal says what it got),
  async jobs run there and answer their own tenant only, and a crafted body
  is refused before anything reaches it.
- our mock echoing the provider key: the SDK's parsed objects never hold it.
- a provider ending lines with a lone carriage return (as SSE allows): the
  text the SDK reads is the text metered and known to a resumed stream.
"""

import json
import time

import openai
import pytest

from conftest import PROVIDER_KEY, TENANT_KEY, Llmock, LocalServer, Runestone, server_yaml

OTHER_KEY = "sk-sdk-other-tenant-0099"


class Gateway(Runestone):
    """runestone in front of one OpenAI-compatible upstream, two tenants."""

    def __init__(self, base_url: str, api_key: str):
        def config(port, metrics_port, directory):
            return server_yaml(port, metrics_port, directory) + f"""
providers:
  - {{ name: upstream, base_url: "{base_url}", api_key: "{api_key}" }}
models:
  - name: gpt-4o-mini
    targets: [{{ provider: upstream }}]
tenants:
  - id: acme
    keys: ["{TENANT_KEY}"]
    overflow: {{ enabled: true }}
  - id: other
    keys: ["{OTHER_KEY}"]
"""

        super().__init__(config)


@pytest.fixture(scope="module")
def llmock():
    server = Llmock()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def via_llmock(llmock):
    gateway = Gateway(f"http://127.0.0.1:{llmock.port}/v1", "sk-llmock-provider-key-42")
    yield gateway
    gateway.stop()


def poll_job(gateway: Gateway, key: str, job_id: str) -> tuple:
    import httpx
    deadline = time.monotonic() + 20
    while True:
        resp = httpx.get(f"http://127.0.0.1:{gateway.port}/v1/jobs/{job_id}",
                         headers={"authorization": f"Bearer {key}"}, timeout=10)
        if resp.status_code != 202:
            return resp.status_code, resp.json()
        assert time.monotonic() < deadline, f"job {job_id} not done"
        time.sleep(0.05)


def test_foreign_fields_never_reach_an_upstream_we_did_not_write(via_llmock, llmock):
    client = via_llmock.client()
    resp = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hardening"}],
        extra_body={"api_key": "sk-hijack", "base_url": "http://evil.example", "seed": 12345678901234567},
    )
    assert resp.object == "chat.completion"
    seen = [r for r in llmock.journal() if r["path"] == "/v1/chat/completions"][-1]
    assert "api_key" not in seen["body"] and "base_url" not in seen["body"]
    assert seen["body"]["seed"] == 12345678901234567, "big integers arrive as sent"
    assert seen["body"]["messages"] == [{"role": "user", "content": "hardening"}]


def test_crafted_bodies_are_refused_before_the_upstream(via_llmock, llmock):
    client = via_llmock.client()
    before = len(llmock.journal())
    deep = [[[]]]
    for _ in range(200):
        deep = [deep]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}],
            extra_body={"api_key": "sk-x", "nested": deep},
        )
    assert err.value.code == "invalid_json"
    assert len(llmock.journal()) == before


def test_async_jobs_run_on_llmock_and_answer_their_tenant_only(via_llmock, llmock):
    client = via_llmock.client()
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "job"}],
        extra_headers={"prefer": "respond-async"},
    )
    assert raw.status_code == 202
    job = json.loads(raw.content)
    status, body = poll_job(via_llmock, TENANT_KEY, job["id"])
    assert status == 200 and body["object"] == "chat.completion"
    assert body["usage"]["completion_tokens"] > 0
    status, body = poll_job(via_llmock, OTHER_KEY, job["id"])
    assert (status, body["error"]["code"]) == (404, "job_not_found")
    assert "sk-llmock-provider-key-42" not in via_llmock.output()


def test_the_sdk_never_sees_a_key_its_provider_echoes(mock):
    gateway = Gateway(mock.base_url, PROVIDER_KEY)
    try:
        client = gateway.client()
        mock.fault({"echo_key": True})
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        resp = raw.parse()
        assert PROVIDER_KEY not in resp.model_dump_json()
        assert resp.system_fingerprint and set(resp.system_fingerprint) == {"*"}
        assert all(PROVIDER_KEY not in v for v in raw.headers.values())
        mock.fault({"echo_key": True})
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            if c.choices
        )
        assert PROVIDER_KEY not in text and "*****" in text
    finally:
        gateway.stop()


def lone_cr_provider(name: str, text: list, cuts: bool = True) -> LocalServer:
    """A provider streaming `text` in chunks, each event led by a comment.
    The request's message says how lines end: `lf`, `cr` (a lone `\\r`, as
    SSE allows and the OpenAI SDKs read) or `cut` (`cr`, and the body ends
    after the second piece, before the answer finished, when it `cuts`)."""

    def answer(request, raw):
        how = json.loads(raw)["messages"][-1]["content"]
        how = how if cuts or how != "cut" else "cr"
        ident = {"id": f"chatcmpl-{name}", "object": "chat.completion.chunk", "created": 7,
                 "model": name}
        chunks = [{**ident, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None}]}]
        chunks += [{**ident, "choices": [{"index": 0, "delta": {"content": piece},
                                          "finish_reason": None}]} for piece in text]
        chunks.append({**ident, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if how == "cut":
            chunks = chunks[:3]
        events = [f": keep-alive\ndata: {json.dumps(c)}\n\n" for c in chunks]
        if how != "cut":
            events.append("data: [DONE]\n\n")
        body = "".join(events)
        if how != "lf":
            body = body.replace("\n", "\r")
        return 200, "text/event-stream", body.encode()

    return LocalServer(answer)


def test_lines_ended_by_a_lone_carriage_return_are_metered_and_resumed_as_the_sdk_reads_them():
    # The SDK ends a line at a lone "\r": the gateway read such a stream as
    # comments (its text not counted) and a resumed stream did not know
    # what the client had.
    first = lone_cr_provider("m-first", ["Hel", "lo ", "world", "."])
    backup = lone_cr_provider("m-backup", ["Hello ", "world."], cuts=False)

    def config(port, metrics_port, directory):
        return server_yaml(port, metrics_port, directory) + f"""
providers:
  - {{ name: first, base_url: "{first.base_url}", api_key: "sk-first-provider-key-1" }}
  - {{ name: backup, base_url: "{backup.base_url}", api_key: "sk-backup-provider-key-2" }}
models:
  - name: gpt-4o-mini
    targets: [{{ provider: first, model: m-first }}]
    fallbacks: [backup-model]
  - name: backup-model
    targets: [{{ provider: backup, model: m-backup }}]
tenants:
  - id: acme
    keys: ["{TENANT_KEY}"]
"""

    gateway = Runestone(config)
    try:
        def stream(how):
            chunks = list(gateway.client().chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": how}], stream=True,
                stream_options={"include_usage": True}))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            [usage] = [c.usage for c in chunks if c.usage]
            return text, usage.completion_tokens

        lf_text, lf_tokens = stream("lf")
        assert lf_text == "Hello world." and lf_tokens > 0
        assert stream("cr") == (lf_text, lf_tokens), "counted as the same stream with \\n"
        text, tokens = stream("cut")
        assert text == "Hello world.", "the backup's repeat of what the client had is skipped"
        assert tokens > 0
        assert 'runestone_stream_resumptions_total{model="gpt-4o-mini",outcome="resumed"} 1' \
            in gateway.metrics()
    finally:
        gateway.stop()
        first.stop()
        backup.stop()


def test_a_stream_whose_last_event_has_no_blank_line_is_ended_before_the_gateways_done():
    # The provider's last event ends with a single line end and no [DONE]
    # follows: the gateway's [DONE] (and usage chunk) went out glued to
    # that event, so the SDK raised and lost it (while it was billed).
    ident = {"id": "chatcmpl-open", "object": "chat.completion.chunk", "created": 7, "model": "m"}

    def answer(request, raw):
        line_end = json.loads(raw)["messages"][-1]["content"].encode().decode("unicode_escape")
        chunk = lambda delta, finish: {**ident, "choices": [
            {"index": 0, "delta": delta, "finish_reason": finish}]}
        body = (f"data: {json.dumps(chunk({'role': 'assistant', 'content': 'Hi'}, None))}"
                f"{line_end * 2}data: {json.dumps(chunk({'content': '!'}, 'stop'))}{line_end}")
        return 200, "text/event-stream", body.encode()

    provider = LocalServer(answer)
    gateway = Gateway(provider.base_url, "sk-open-provider-key-3")
    try:
        for line_end in ["\\n", "\\r\\n", "\\r"]:
            for include_usage in (True, False):
                chunks = list(gateway.client().chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": line_end}],
                    stream=True, stream_options={"include_usage": include_usage}))
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                assert text == "Hi!", (line_end, include_usage)
                assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
                assert bool([c for c in chunks if c.usage]) == include_usage
    finally:
        gateway.stop()
        provider.stop()


def test_a_stream_is_metered_whatever_the_case_of_its_content_type():
    # Media types are case-insensitive: a stream sent as "Text/Event-Stream"
    # went through unmetered (billed as its whole text, and the usage chunk
    # the gateway asked for reached a client that had not asked for it).
    ident = {"id": "chatcmpl-case", "object": "chat.completion.chunk", "created": 7, "model": "m"}
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}

    def answer(request, raw):
        chunks = [{**ident, "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]},
                  {**ident, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                  {**ident, "choices": [], "usage": usage}]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return 200, json.loads(raw)["messages"][-1]["content"], body.encode()

    provider = LocalServer(answer)
    gateway = Gateway(provider.base_url, "sk-case-provider-key-4")
    try:
        for content_type in ["text/event-stream", "Text/Event-Stream; charset=utf-8"]:
            before = gateway_billed(gateway)
            chunks = list(gateway.client().chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": content_type}],
                stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hi"
            assert [c for c in chunks if c.usage] == [], content_type
            assert gateway_billed(gateway) - before == usage["completion_tokens"], content_type
    finally:
        gateway.stop()
        provider.stop()


def gateway_billed(gateway) -> int:
    """The completion tokens the gateway has billed so far."""
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in gateway.metrics().splitlines()
               if line.startswith("runestone_tokens_total{") and 'kind="completion"' in line)


def quirky_stream() -> bytes:
    """A stream as loose SSE servers write one: a `retry` and an `id`, an
    event that names itself but has no data, stray blank lines, a comment
    that is not UTF-8, and lines ending in \\r\\n, a lone \\r and \\n."""
    ident = {"id": "chatcmpl-quirky", "object": "chat.completion.chunk", "created": 7, "model": "m"}
    chunk = lambda delta, finish=None: json.dumps(
        {**ident, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}).encode()
    usage = json.dumps({**ident, "choices": [],
                        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}})
    return (b"retry: 3000\r\n\r\n"
            b"id: 1\rdata: " + chunk({"role": "assistant", "content": ""}) + b"\r\r"
            b"event: ping\n\n"
            b": \xff\xfe keep-alive\n\n"
            b"\n"
            b"data: " + chunk({"content": "Hello "}) + b"\r\n\r\n"
            b"id\ndata: " + chunk({"content": "world."}) + b"\n\n\n"
            b"data: " + chunk({}, "stop") + b"\r\r"
            b"data: " + usage.encode() + b"\n\ndata: [DONE]\n\n")


def test_a_loosely_written_stream_reaches_the_sdk_whole_and_billed():
    # The Python SDK raised on an event with a field but no data, on a
    # blank line after an `id`, and on bytes that are not UTF-8 in a
    # comment, after the gateway had billed the whole answer.
    provider = LocalServer(lambda request, raw: (200, "text/event-stream", quirky_stream()))
    gateway = Gateway(provider.base_url, "sk-quirky-provider-key-5")
    try:
        for include_usage in (True, False):
            before = gateway_billed(gateway)
            chunks = list(gateway.client().chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True,
                stream_options={"include_usage": include_usage}))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello world."
            assert [c.usage.completion_tokens for c in chunks if c.usage] == ([3] if include_usage else [])
            assert gateway_billed(gateway) - before == 3
    finally:
        gateway.stop()
        provider.stop()
