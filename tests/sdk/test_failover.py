"""Issue #16 through the official OpenAI Python SDK, against a provider we
did not write: llmock (PyPI) as one provider account serving three models,
`small` falling back to `large` and `solo` alone. llmock's fault scenarios
break things; its journal says what each model was asked.

llmock does not continue a prefill (it answers a fixed text naming the
model), so a broken stream is restarted on the fallback and the text the
client already has is skipped.
"""

import time

import openai
import pytest

from conftest import TENANT_KEY, Llmock, Runestone, server_yaml


class Gateway(Runestone):
    """runestone in front of llmock: `small` -> `large`, and `solo`.

    The account's idle timeout is what ends llmock's 30 s `stall`; it is
    also a limit every stream of the tests must keep between two chunks, on
    a loaded machine too (a stream cut short changes which model answers),
    and it must be well above the first-token timeout (1.5 s) for the
    late-first-token test to tell the two apart: hence 4 s.
    """

    def __init__(self, llmock: Llmock):
        def config(port, metrics_port, directory):
            return server_yaml(port, metrics_port, directory) + f"""
providers:
  - {{ name: acct, base_url: "{llmock.base_url}", api_key: "sk-llmock-provider-key-16", timeouts: {{ first_token_ms: 1500, idle_ms: 4000 }} }}
models:
  - name: small
    targets: [{{ provider: acct, model: m-small }}]
    fallbacks: [large]
    context_fallbacks: [large]
  - name: large
    targets: [{{ provider: acct, model: m-large }}]
  - name: solo
    targets: [{{ provider: acct, model: m-solo }}]
tenants:
  - id: acme
    keys: ["{TENANT_KEY}"]
pricing:
  small: {{ input: 1.0, output: 2.0 }}
  large: {{ input: 10.0, output: 20.0 }}
  solo: {{ input: 1.0, output: 2.0 }}
"""

        super().__init__(config)


@pytest.fixture(scope="module")
def llmock():
    server = Llmock()
    yield server
    server.stop()


@pytest.fixture()
def gateway(llmock):
    llmock.reset()
    gateway = Gateway(llmock)
    yield gateway
    gateway.stop()


def asked(llmock: Llmock, model: str) -> list:
    """The chat requests llmock saw for `model`, oldest first."""
    return [r for r in llmock.journal()
            if r["path"] == "/v1/chat/completions" and r["body"].get("model") == model]


def billed(gateway: Gateway) -> tuple:
    """Prompt and completion tokens the gateway billed."""
    totals = {"prompt": 0, "completion": 0}
    for line in gateway.metrics().splitlines():
        if line.startswith("runestone_tokens_total{"):
            for kind in totals:
                if f'kind="{kind}"' in line:
                    totals[kind] += int(float(line.rsplit(" ", 1)[1]))
    return totals["prompt"], totals["completion"]


def test_a_fallback_on_the_same_account_serves_when_the_model_fails(gateway, llmock):
    llmock.scenario({"type": "fail", "status": 503, "times": 2, "match": {"model": "m-small"}})
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="small", messages=[{"role": "user", "content": "hi"}])
    answer = raw.parse()
    assert answer.choices[0].message.content == "Mock response from m-large."
    assert raw.headers["x-runestone-attempts"] == "3"
    assert (len(asked(llmock, "m-small")), len(asked(llmock, "m-large"))) == (2, 1)
    assert billed(gateway) == (answer.usage.prompt_tokens, answer.usage.completion_tokens)
    # The other models on the account are untouched.
    assert gateway.client().chat.completions.create(
        model="solo", messages=[{"role": "user", "content": "hi"}]).choices[0].message.content


def test_a_provider_429_is_waited_out_when_nothing_else_can_serve(gateway, llmock):
    # llmock names a one-second wait (retry-after-ms: 1000), within the 2 s
    # the gateway waits by default.
    llmock.scenario({"type": "fail", "status": 429, "times": 1, "match": {"model": "m-solo"}})
    started = time.monotonic()
    answer = gateway.client().chat.completions.create(
        model="solo", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "Mock response from m-solo."
    assert 0.9 < time.monotonic() - started < 3
    assert len(asked(llmock, "m-solo")) == 2


def stream_text(gateway: Gateway, model: str) -> tuple:
    """Streams a chat with usage; returns the text, the chunks and the
    usage the stream reported."""
    chunks = list(gateway.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = [c.usage for c in chunks if c.usage]
    assert len(usage) == 1, chunks
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1, "one stream"
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
    return text, chunks, usage[0]


@pytest.mark.parametrize("kind", ["disconnect", "stall", "malformed"])
def test_a_broken_stream_is_finished_by_the_fallback(gateway, llmock, kind):
    llmock.scenario({"type": "stream_fault", "kind": kind, "after_chunks": 2, "times": 1,
                     "match": {"model": "m-small"}})
    text, chunks, usage = stream_text(gateway, "small")
    # m-small delivered "Mock " (llmock counts the role event as a chunk);
    # m-large said it all again and the repeat was skipped.
    assert text == "Mock response from m-large.", text
    assert chunks[0].model == "m-small", "the first attempt's model throughout"
    restart = asked(llmock, "m-large")[-1]["body"]
    assert restart["messages"] == [{"role": "user", "content": "hi"}], "no prefill"
    assert billed(gateway) == (usage.prompt_tokens, usage.completion_tokens)
    assert 'runestone_stream_resumptions_total{model="small",outcome="resumed"} 1' in gateway.metrics()


def test_a_stream_with_nowhere_to_go_raises_in_the_sdk(gateway, llmock):
    llmock.scenario({"type": "stream_fault", "kind": "disconnect", "after_chunks": 2, "times": 1,
                     "match": {"model": "m-solo"}})
    got = ""
    with pytest.raises(openai.APIError) as err:
        for chunk in gateway.client().chat.completions.create(
                model="solo", messages=[{"role": "user", "content": "hi"}], stream=True):
            got += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert got == "Mock "
    assert "could not be resumed" in str(err.value)


def test_a_late_first_token_fails_over_with_nothing_sent(gateway, llmock):
    llmock.scenario({"type": "slow_first_token", "seconds": 5, "times": 1,
                     "match": {"model": "m-small"}})
    started = time.monotonic()
    text, chunks, _ = stream_text(gateway, "small")
    assert text == "Mock response from m-large."
    assert chunks[0].model == "m-large", "nothing of m-small reached the client"
    # Failed over after the account's first-token 1.5 s: not after its idle
    # 4 s, nor after m-small's 5 s.
    assert 1.4 < time.monotonic() - started < 3.5


def test_a_prompt_too_long_moves_to_the_context_fallback(gateway, llmock):
    llmock.scenario({"type": "fail", "status": 400, "code": "context_length_exceeded",
                     "message": "This model's maximum context length is 8192 tokens.",
                     "times": 1, "match": {"model": "m-small"}})
    answer = gateway.client().chat.completions.create(
        model="small", messages=[{"role": "user", "content": "a long prompt"}])
    assert answer.choices[0].message.content == "Mock response from m-large."
    assert (len(asked(llmock, "m-small")), len(asked(llmock, "m-large"))) == (1, 1)


def test_a_content_policy_rejection_is_the_answer(gateway, llmock):
    llmock.scenario({"type": "fail", "status": 400, "code": "content_policy_violation",
                     "message": "Rejected by the safety system.", "times": 1,
                     "match": {"model": "m-small"}})
    with pytest.raises(openai.BadRequestError) as err:
        gateway.client().chat.completions.create(
            model="small", messages=[{"role": "user", "content": "something"}])
    assert err.value.code == "content_policy_violation"
    assert (len(asked(llmock, "m-small")), len(asked(llmock, "m-large"))) == (1, 0)
    assert billed(gateway) == (0, 0)
