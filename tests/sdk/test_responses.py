"""The Responses API through the gateway with the official OpenAI Python SDK:
`responses.create` (JSON and streamed), `responses.stream`, retrieve,
delete, cancel and input_items, against runestone-mock (two provider
accounts behind one model, so a follow-up that reached the wrong account
would be refused) and llmock (a server we did not write).

Stored responses are tenant-scoped: a response one tenant created is 404
for another, by id and as `previous_response_id`.
"""

import fcntl
import json
import re
import socket
import struct
import termios
import time
import urllib.request

import openai
import pytest

from conftest import PROVIDER_KEY, TENANT_KEY, Llmock, LocalServer, Mock, Runestone, server_yaml

OTHER_KEY = "sk-sdk-other-tenant-key-0006"


def one_provider_config(name: str, base_url: str, globex: bool = False):
    """A config of one provider `name` at `base_url` serving model `name`,
    for tenant `acme` (and `globex`)."""
    other = f'\n  - id: globex\n    keys: ["{OTHER_KEY}"]' if globex else ""

    def config(port, metrics_port, directory):
        return server_yaml(port, metrics_port, directory) + f"""
providers:
  - {{ name: {name}, base_url: "{base_url}", api_key: "{PROVIDER_KEY}" }}
models:
  - name: {name}
    targets: [{{ provider: {name}, model: m }}]
tenants:
  - id: acme
    keys: ["{TENANT_KEY}"]{other}
"""

    return config


class Gateway(Runestone):
    """`gpt` over two accounts (round robin), `azure-gpt` on Azure, `claude`
    on Anthropic, `ext` on llmock; tenants `acme` and `globex`."""

    def __init__(self, a: Mock, b: Mock, llmock: Llmock, redis_url: str | None = None):
        # A generous Redis timeout (the default is 50 ms): on a loaded
        # machine a slower round trip would count as Redis down.
        redis = f'redis: {{ url: "{redis_url}", timeout_ms: 2000 }}' if redis_url else ""

        def config(port, metrics_port, directory):
            return server_yaml(port, metrics_port, directory) + f"""
{redis}
providers:
  - {{ name: acct-a, base_url: "{a.base_url}", api_key: "{PROVIDER_KEY}" }}
  - {{ name: acct-b, base_url: "{b.base_url}", api_key: "{PROVIDER_KEY}" }}
  - {{ name: azure, kind: azure, base_url: "http://127.0.0.1:{a.port}", api_key: "{PROVIDER_KEY}", api_version: "2025-03-01-preview" }}
  - {{ name: claude, kind: anthropic, base_url: "http://127.0.0.1:{a.port}", api_key: "{PROVIDER_KEY}" }}
  - {{ name: llmock, base_url: "{llmock.base_url}", api_key: "sk-llmock-key" }}
models:
  - name: gpt
    strategy: round_robin
    targets: [{{ provider: acct-a, model: m }}, {{ provider: acct-b, model: m }}]
  - name: only-b
    targets: [{{ provider: acct-b, model: m }}]
  - name: azure-gpt
    targets: [{{ provider: azure, model: my-deployment }}]
  - name: claude
    targets: [{{ provider: claude, model: claude-test }}]
  - name: ext
    targets: [{{ provider: llmock, model: gpt-4o-mini }}]
tenants:
  - id: acme
    keys: ["{TENANT_KEY}"]
  - id: globex
    keys: ["{OTHER_KEY}"]
pricing:
  gpt: {{ input: 1.0, output: 2.0 }}
  ext: {{ input: 1.0, output: 2.0 }}
"""

        super().__init__(config, env={"RUST_LOG": "info"})

    def usage(self, key=TENANT_KEY) -> dict:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/usage", headers={"authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(req) as resp:
            return json.load(resp)


@pytest.fixture(scope="module")
def mocks():
    a = Mock("--api-key", PROVIDER_KEY, "--tokens-per-second", "0")
    b = Mock("--api-key", PROVIDER_KEY, "--tokens-per-second", "0")
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def llmock():
    server = Llmock()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(mocks, llmock):
    g = Gateway(*mocks, llmock)
    yield g
    g.stop()


def clear_faults(*mocks: Mock) -> None:
    for mock in mocks:
        urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{mock.port}/_mock/reset", method="POST", data=b"")
        ).close()


def responses_requests(mock: Mock) -> list:
    return [r for r in mock.requests() if "responses" in r["path"]]


def test_create_returns_the_providers_response_and_bills_its_usage(gateway):
    client = gateway.client()
    before = gateway.usage()["cost_usd"]
    response = client.responses.create(model="gpt", input="Say hello", max_output_tokens=7)
    assert response.id.startswith("resp_")
    assert response.status == "incomplete"
    assert response.output_text
    assert response.usage.output_tokens == 7
    assert response.usage.input_tokens > 0
    after = gateway.usage()["cost_usd"]
    expected = (response.usage.input_tokens * 1.0 + 7 * 2.0) / 1e6
    assert after - before == pytest.approx(expected, rel=1e-6)


def test_a_stream_has_its_typed_events_and_is_billed_from_response_completed(gateway):
    client = gateway.client()
    before = gateway.usage()
    stream = client.responses.create(model="gpt", input="Tell a story", max_output_tokens=12, stream=True)
    types = [event.type for event in stream]
    assert types[0] == "response.created"
    assert "response.output_text.delta" in types
    # Stopped by max_output_tokens: OpenAI's `incomplete` end.
    assert types[-1] == "response.incomplete"
    after = gateway.usage()
    assert after["completion_tokens"] - before["completion_tokens"] == 12
    assert after["estimated_requests"] == before["estimated_requests"]


def test_a_background_response_is_refused_since_its_usage_could_not_be_billed(gateway, mocks):
    client = gateway.client()
    before = sum(len(responses_requests(m)) for m in mocks)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="gpt", input="Say hello", background=True)
    assert e.value.body["param"] == "background"
    assert sum(len(responses_requests(m)) for m in mocks) == before
    # `background: false` is the ordinary request.
    assert client.responses.create(model="gpt", input="Say hello", background=False).usage


def test_a_conversation_is_refused_since_no_tenant_owns_it(gateway, mocks):
    client = gateway.client()
    before = sum(len(responses_requests(m)) for m in mocks)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="gpt", input="Say hello", conversation="conv_someone_elses")
    assert e.value.body["param"] == "conversation"
    assert sum(len(responses_requests(m)) for m in mocks) == before
    # `conversation: null` is no conversation.
    assert client.responses.create(model="gpt", input="Say hello", extra_body={"conversation": None}).usage


def test_the_stream_helper_gives_the_final_response(gateway):
    client = gateway.client()
    with client.responses.stream(
        model="gpt", input="Hi", max_output_tokens=50, extra_body={"mock_tokens": 5}
    ) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.status == "completed"
    # (The mock's deltas each end with a space; its whole text does not.)
    assert final.output_text == text.rstrip()
    assert final.usage.output_tokens == 5


def test_a_follow_up_goes_to_the_account_holding_its_predecessor(gateway, mocks):
    client = gateway.client()
    # Round robin spreads first requests over both accounts; every follow-up
    # must reach the one that holds its predecessor (the other answers 404).
    for _ in range(4):
        first = client.responses.create(model="gpt", input="one", max_output_tokens=3)
        second = client.responses.create(
            model="gpt", input="two", previous_response_id=first.id, max_output_tokens=3
        )
        assert second.previous_response_id == first.id
        streamed = client.responses.create(
            model="gpt", input="three", previous_response_id=second.id, max_output_tokens=3, stream=True
        )
        assert [e.type for e in streamed][-1] == "response.incomplete"


def test_retrieve_input_items_cancel_and_delete(gateway):
    client = gateway.client()
    created = client.responses.create(model="gpt", input="keep me", max_output_tokens=4)
    got = client.responses.retrieve(created.id)
    assert got.id == created.id and got.output_text == created.output_text
    items = client.responses.input_items.list(created.id)
    assert items.data[0].content[0].text == "keep me"
    # A completed response cannot be cancelled: the provider's 400 passes on.
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(created.id)
    before = gateway.usage()
    client.responses.delete(created.id)
    # Reading a stored response bills nothing.
    assert gateway.usage()["completion_tokens"] == before["completion_tokens"]
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.retrieve(created.id)
    assert e.value.body["code"] == "response_not_found"


def test_another_tenants_response_is_not_found(gateway, mocks):
    acme = gateway.client()
    globex = gateway.client(OTHER_KEY)
    created = acme.responses.create(model="gpt", input="secret", max_output_tokens=3)
    a, b = mocks
    before = len(responses_requests(a)) + len(responses_requests(b))
    with pytest.raises(openai.NotFoundError) as e:
        globex.responses.retrieve(created.id)
    assert e.value.body["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        globex.responses.input_items.list(created.id)
    with pytest.raises(openai.NotFoundError):
        globex.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        globex.responses.cancel(created.id)
    with pytest.raises(openai.NotFoundError) as e:
        globex.responses.create(model="gpt", input="x", previous_response_id=created.id)
    assert e.value.body["param"] == "previous_response_id"
    # None of it reached a provider, and acme still has its response.
    assert len(responses_requests(a)) + len(responses_requests(b)) == before
    assert acme.responses.retrieve(created.id).id == created.id


def test_a_response_too_large_to_read_whole_is_still_its_tenants():
    """An answer over 16 MiB (an image in its output, say) is metered from
    its ends; its id, at its start, still makes it the tenant's."""
    asked = []

    def post(request, body):
        asked.append(json.loads(body))
        n = len(asked)
        text = "x" * (17 * 1024 * 1024) if n == 1 else "ok"
        answer = {
            "id": f"resp_large{n}", "object": "response", "created_at": 1, "status": "completed",
            "model": "m", "output": [{"type": "message", "id": f"msg_{n}", "status": "completed",
                                      "role": "assistant", "content": [
                                          {"type": "output_text", "text": text, "annotations": []}]}],
            "usage": {"input_tokens": 3, "output_tokens": 5, "total_tokens": 8},
        }
        return 200, "application/json", json.dumps(answer).encode()

    provider = LocalServer(post)
    gw = Runestone(one_provider_config("big", provider.base_url, globex=True))
    try:
        first = gw.client().responses.create(model="big", input="draw")
        assert first.id == "resp_large1"
        assert len(first.output_text) == 17 * 1024 * 1024
        second = gw.client().responses.create(model="big", input="again", previous_response_id=first.id)
        assert second.id == "resp_large2"
        assert asked[1]["previous_response_id"] == "resp_large1"
        with pytest.raises(openai.NotFoundError):
            gw.client(OTHER_KEY).responses.create(model="big", input="x", previous_response_id=first.id)
        assert len(asked) == 2
    finally:
        gw.stop()
        provider.stop()


def test_ids_that_are_not_response_ids_never_reach_a_provider(gateway, mocks):
    client = gateway.client()
    for bad in ["..%2F..%2Fchat", "resp_%3Fx=1", "a" * 300]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{gateway.port}/v1/responses/{bad}",
            headers={"authorization": f"Bearer {TENANT_KEY}"},
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 404
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_never_made")
    # A stored response's path with a trailing slash is no operation on it.
    created = client.responses.create(model="gpt", input="Say hello", max_output_tokens=4)
    before = sum(len(responses_requests(m)) for m in mocks)
    for method, tail in [("GET", "/"), ("DELETE", "/"), ("GET", "//"), ("POST", "/cancel/")]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{gateway.port}/v1/responses/{created.id}{tail}",
            headers={"authorization": f"Bearer {TENANT_KEY}"},
            method=method,
            data=b"" if method == "POST" else None,
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 404, (method, tail)
    assert sum(len(responses_requests(m)) for m in mocks) == before


def test_openai_paths_beside_a_response_id_are_said_not_served(gateway, mocks):
    # `input_tokens` and `compact` are OpenAI's own paths beside `{id}`: a
    # clear 404, not a 405 naming the methods of a response id.
    client = gateway.client()
    before = sum(len(responses_requests(m)) for m in mocks)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.input_tokens.count(model="gpt", input="Say hello")
    assert e.value.body["code"] == "unknown_url"
    assert "counting a response's input tokens is not served by this gateway" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.compact(model="gpt", input="Say hello")
    assert "compacting a conversation is not served by this gateway" in e.value.body["message"]
    assert sum(len(responses_requests(m)) for m in mocks) == before


def test_the_responses_websocket_mode_is_said_not_served(gateway, mocks):
    # SDK 3.x's `responses.connect()` opens a WebSocket on /v1/responses:
    # a 405 that says why and what to send instead, nothing upstream.
    from websockets.exceptions import InvalidStatus
    before = sum(len(responses_requests(m)) for m in mocks)
    with pytest.raises(InvalidStatus) as e:
        with gateway.client().responses.connect() as connection:
            connection.response.create(model="gpt", input="Say hello")
    answer = e.value.response
    assert (answer.status_code, answer.headers["allow"]) == (405, "POST")
    error = json.loads(bytes(answer.body))["error"]
    assert error["code"] == "method_not_allowed", error
    assert error["message"] == (
        "Method GET is not allowed for /v1/responses: WebSocket connections are not served by "
        "this gateway; send POST /v1/responses (with stream: true for its events)")
    assert sum(len(responses_requests(m)) for m in mocks) == before


def test_a_follow_up_on_a_model_that_cannot_reach_the_holder_is_refused(gateway, mocks):
    client = gateway.client()
    # Round robin puts one of these on account a, which `only-b` cannot
    # reach.
    held_by_a = None
    for _ in range(6):
        r = client.responses.create(model="gpt", input="x", max_output_tokens=2)
        try:
            client.responses.create(model="only-b", input="y", previous_response_id=r.id)
        except openai.BadRequestError as e:
            assert e.body["param"] == "previous_response_id"
            assert "acct-a" in e.body["message"]
            held_by_a = r.id
            break
    assert held_by_a, "round robin never placed a response on account a"


def test_azure_serves_responses_on_its_own_path(gateway, mocks):
    client = gateway.client()
    a, _ = mocks
    response = client.responses.create(model="azure-gpt", input="hi", max_output_tokens=3)
    assert response.usage.output_tokens == 3
    sent = [r for r in a.requests() if "openai/responses" in r["path"]][-1]
    assert (sent["path"], sent["query"]) == ("/openai/responses", "api-version=2025-03-01-preview")
    assert client.responses.retrieve(response.id, include=["message.input_image.image_url"]).id == response.id
    sent = [r for r in a.requests() if "openai/responses" in r["path"]][-1]
    assert sent["path"] == f"/openai/responses/{response.id}"
    assert sent["query"] == "api-version=2025-03-01-preview&include%5B%5D=message.input_image.image_url"


def test_anthropic_targets_do_not_serve_responses(gateway):
    with pytest.raises(openai.BadRequestError) as e:
        gateway.client().responses.create(model="claude", input="hi")
    assert "does not serve responses" in e.value.body["message"]


def test_failover_before_the_first_byte(gateway, mocks):
    a, b = mocks
    for mock in (a, b):
        mock.fault({"status": 500, "count": 1, "path": "/v1/responses"})
    client = gateway.client()
    response = client.responses.create(model="gpt", input="hi", max_output_tokens=3)
    assert response.status == "incomplete" and response.usage.output_tokens == 3
    # One of them took its fault; clear whatever is left.
    clear_faults(a, b)


def test_a_stream_that_breaks_ends_with_the_responses_error_event(gateway, mocks):
    a, b = mocks
    for mock in (a, b):
        mock.fault({"disconnect_after_chunks": 3, "count": 1, "path": "/v1/responses"})
    client = gateway.client()
    events = list(client.responses.create(model="gpt", input="hi", max_output_tokens=20, stream=True))
    clear_faults(a, b)
    assert "response.output_text.delta" in [e.type for e in events]
    # The Responses API's own error event ends the stream (the SDK hands it
    # to the caller; there is no `response.completed`).
    assert events[-1].type == "error"
    assert "broke off" in events[-1].message
    # Numbered after the last event the client got: an SDK resuming the
    # stream `starting_after` a number passes on only events past it.
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(events))), numbers
    with pytest.raises(RuntimeError, match="response.completed"):
        for mock in (a, b):
            mock.fault({"disconnect_after_chunks": 3, "count": 1, "path": "/v1/responses"})
        with client.responses.stream(model="gpt", input="hi", max_output_tokens=20) as stream:
            stream.get_final_response()
    clear_faults(a, b)


def test_llmock_responses_through_the_gateway(gateway, llmock):
    client = gateway.client()
    direct = openai.OpenAI(base_url=llmock.base_url, api_key="sk-llmock-key", max_retries=0)
    want = direct.responses.create(model="gpt-4o-mini", input="Hello there")
    got = client.responses.create(model="ext", input="Hello there")
    assert got.output_text == want.output_text
    assert got.usage.input_tokens == want.usage.input_tokens
    assert got.usage.output_tokens == want.usage.output_tokens
    streamed = client.responses.create(model="ext", input="Hello there", stream=True)
    text = "".join(e.delta for e in streamed if e.type == "response.output_text.delta")
    assert text == want.output_text
    journal = [r for r in llmock.journal() if "responses" in json.dumps(r)]
    assert journal
    # A stream llmock breaks once text went out ends with the error event,
    # numbered after llmock's own events.
    llmock.scenario({"type": "stream_fault", "kind": "disconnect", "after_chunks": 6, "times": 1})
    events = list(client.responses.create(model="ext", input="Hello there", stream=True))
    assert events[-1].type == "error" and "broke off" in events[-1].message, events[-1]
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(events))) and len(events) > 2, numbers
    assert not re.search(r"sk-sdk", json.dumps(journal))


def responses_event(kind, number, more):
    """A Responses stream event, without the blank line that ends it."""
    data = {"type": kind, "sequence_number": number, **more}
    return f"event: {kind}\ndata: {json.dumps(data)}".encode()


# Numbers with a gap and one going back.
BROKEN_RESPONSE = [
    responses_event("response.created", 0, {"response": {"id": "resp_raw", "object": "response", "status": "in_progress"}}),
    *(responses_event("response.output_text.delta", n, {"item_id": "m", "output_index": 0, "content_index": 0, "delta": d})
      for n, d in [(1, "Hel"), (9, "lo"), (4, " the"), (5, "re")]),
]


def stream_from_raw_provider(body: bytes, reset: bool = False):
    """The SDK's events of a Responses stream through the gateway from a
    provider answering `body` (close-delimited, or broken off with a reset),
    and what it raised."""

    def post(request, _body):
        request.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + body)
        if reset:
            # Once the gateway has it all (a reset throws away what is
            # still to send), closed with a reset rather than a FIN.
            conn = request.connection
            deadline = time.monotonic() + 10
            while fcntl.ioctl(conn, termios.TIOCOUTQ, b"\0\0\0\0") != b"\0\0\0\0" and time.monotonic() < deadline:
                time.sleep(0.01)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
        return None

    provider = LocalServer(post)
    gateway = Runestone(one_provider_config("raw", provider.base_url))
    got = []
    try:
        for event in gateway.client().responses.create(model="raw", input="hi", stream=True):
            got.append(event)
    except Exception as e:  # what the SDK raised, after the events it gave
        return got, e
    finally:
        gateway.stop()
        provider.stop()
    return got, None


@pytest.mark.parametrize("ending", ["no blank line", "an id line"])
def test_a_break_after_the_last_event_is_numbered_past_every_event_and_read_apart(ending):
    # The last event without its blank line (the gateway's event would be
    # glued to it), or the body ending in an `id` line with no line end
    # (ended, it would be an event with no data): the SDK reads every
    # event, and the gateway's error numbered past the highest.
    body = b"\n\n".join(BROKEN_RESPONSE) + (b"\n" if ending == "no blank line" else b"\n\nid: 7")
    got, raised = stream_from_raw_provider(body)
    assert raised is None, raised
    assert [e.sequence_number for e in got] == [0, 1, 9, 4, 5, 12], [(e.type, e.sequence_number) for e in got]
    assert "".join(e.delta for e in got[1:5]) == "Hello there"
    assert got[-1].type == "error" and "ended the stream before it finished" in got[-1].message, got[-1]


def test_a_break_inside_a_line_too_long_to_hold_closes_the_connection():
    # The event went on as it came and broke off inside its JSON: nothing
    # after it could be read, so the client's connection is closed (the
    # SDK raises a connection error, not a JSON one).
    cut = b'event: response.output_text.delta\ndata: {"type": "response.output_text.delta", "sequence_number": 6, "delta": "'
    body = b"\n\n".join(BROKEN_RESPONSE) + b"\n\n" + cut + b"y" * (1024 * 1024 + 4096)
    got, raised = stream_from_raw_provider(body, reset=True)
    assert [e.sequence_number for e in got] == [0, 1, 9, 4, 5]
    assert raised is not None and not isinstance(raised, json.JSONDecodeError), repr(raised)


def test_a_body_that_ends_inside_a_line_too_long_to_hold_ends_the_line():
    # The same event whole, the body ending without its line end: the
    # client gets it, then the gateway's error numbered past it.
    whole = responses_event("response.output_text.delta", 6, {"item_id": "m", "output_index": 0, "content_index": 0, "delta": "y" * (1024 * 1024 + 4096)})
    got, raised = stream_from_raw_provider(b"\n\n".join([*BROKEN_RESPONSE, whole]))
    assert raised is None, raised
    assert [e.sequence_number for e in got] == [0, 1, 9, 4, 5, 6, 13], [(e.type, e.sequence_number) for e in got]
    assert len(got[5].delta) == 1024 * 1024 + 4096
    assert got[-1].type == "error"
