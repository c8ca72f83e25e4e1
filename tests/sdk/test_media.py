"""Moderations, images and audio through the gateway with the official
OpenAI Python SDK, against runestone-mock (and llmock for images, a server
we did not write): routing by `model` (a JSON field, or a multipart form
field the gateway rewrites to the provider's name), authentication, limits,
prices per request, image, character and second of audio, failover before
the first byte, and every error class.
"""

import io
import json
import urllib.error
import urllib.request

import openai
import pytest

from conftest import PROVIDER_KEY, TENANT_KEY, Llmock, Mock, Runestone, free_port, server_yaml

LIMITED_KEY = "sk-sdk-media-limited-0007"
NARROW_KEY = "sk-sdk-media-narrow-0008"
SECOND = 16_000  # the mock's bytes of audio per second


class Gateway(Runestone):
    def __init__(self, mock: Mock, llmock: Llmock):
        def config(port, metrics_port, directory):
            return server_yaml(port, metrics_port, directory) + f"""
providers:
  - {{ name: mock, base_url: "{mock.base_url}", api_key: "{PROVIDER_KEY}" }}
  - {{ name: azure, kind: azure, base_url: "http://127.0.0.1:{mock.port}", api_key: "{PROVIDER_KEY}", api_version: "2025-04-01-preview" }}
  - {{ name: dead, base_url: "http://127.0.0.1:{free_port()}/v1" }}
  - {{ name: claude, kind: anthropic, base_url: "http://127.0.0.1:{mock.port}", api_key: "{PROVIDER_KEY}" }}
  - {{ name: llmock, base_url: "{llmock.base_url}", api_key: "sk-llmock-key" }}
models:
  - name: omni-moderation-latest
    targets: [{{ provider: mock }}]
  - name: dall-e-3
    targets: [{{ provider: mock }}]
  - name: gpt-image-1
    targets: [{{ provider: mock }}]
  - name: azure-image
    targets: [{{ provider: azure, model: my-images }}]
  - name: tts-1
    strategy: round_robin
    targets: [{{ provider: dead, model: tts-1 }}, {{ provider: mock, model: tts-1 }}]
  - name: gpt-4o-mini-tts
    targets: [{{ provider: mock }}]
  - name: whisper-1
    targets: [{{ provider: mock, model: whisper-prod }}]
  - name: gpt-4o-transcribe
    targets: [{{ provider: mock }}]
  - name: claude-image
    targets: [{{ provider: claude, model: c }}]
  - name: ext-dalle
    targets: [{{ provider: llmock, model: dall-e-3 }}]
tenants:
  - id: acme
    keys: ["{TENANT_KEY}"]
  - id: limited
    keys: ["{LIMITED_KEY}"]
    limits: {{ requests_per_minute: 1 }}
  - id: narrow
    keys: ["{NARROW_KEY}"]
    models: [dall-e-3]
pricing:
  dall-e-3: {{ per_image: 0.04 }}
  gpt-image-1: {{ input: 5.0, output: 40.0, per_request: 0.001 }}
  tts-1: {{ per_1m_characters: 15.0 }}
  whisper-1: {{ per_audio_second: 0.0001 }}
  gpt-4o-transcribe: {{ input: 2.5, output: 10.0 }}
"""

        super().__init__(config)

    def usage(self, key=TENANT_KEY) -> dict:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/usage", headers={"authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(req) as resp:
            return json.load(resp)


@pytest.fixture(scope="module")
def mock():
    m = Mock("--api-key", PROVIDER_KEY)
    yield m
    m.stop()


@pytest.fixture(scope="module")
def llmock():
    server = Llmock()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(mock, llmock):
    g = Gateway(mock, llmock)
    yield g
    g.stop()


@pytest.fixture()
def client(gateway):
    return gateway.client()


def spent(gateway, action) -> float:
    before = gateway.usage()["cost_usd"]
    action()
    return gateway.usage()["cost_usd"] - before


def last(mock: Mock, fragment: str) -> dict:
    return [r for r in mock.requests() if fragment in r["path"]][-1]


def audio(seconds: int) -> tuple:
    return ("clip.wav", io.BytesIO(b"RIFF" + bytes(seconds * SECOND - 4)), "audio/wav")


def test_moderations_with_and_without_a_model(client, mock):
    result = client.moderations.create(input="hello")
    assert len(result.results) == 1 and result.results[0].flagged is False
    # No model: OpenAI's default, named explicitly upstream.
    assert last(mock, "moderations")["model"] == "omni-moderation-latest"
    result = client.moderations.create(model="omni-moderation-latest", input=["fine", "flagme"])
    assert [r.flagged for r in result.results] == [False, True]
    # `"model": null` is no model either: the default, in its place.
    result = client.moderations.create(input="hello", extra_body={"model": None})
    assert len(result.results) == 1
    assert last(mock, "moderations")["model"] == "omni-moderation-latest"


def test_images_are_billed_per_image(gateway, client):
    images = []
    cost = spent(gateway, lambda: images.append(client.images.generate(model="dall-e-3", prompt="a cat", n=2)))
    assert len(images[0].data) == 2 and images[0].data[0].b64_json
    assert cost == pytest.approx(2 * 0.04, rel=1e-9)
    urls = client.images.generate(model="dall-e-3", prompt="a cat", response_format="url")
    assert urls.data[0].url.startswith("https://")


def test_image_tokens_and_the_request_price_when_the_provider_reports_tokens(gateway, client):
    answer = []
    cost = spent(gateway, lambda: answer.append(client.images.generate(model="gpt-image-1", prompt="a dog")))
    usage = answer[0].usage
    assert usage.output_tokens == 272
    expected = (usage.input_tokens * 5.0 + usage.output_tokens * 40.0) / 1e6 + 0.001
    assert cost == pytest.approx(expected, rel=1e-9)


def test_an_image_edit_is_a_multipart_upload_routed_by_its_model_field(gateway, client, mock):
    edited = client.images.edit(
        model="gpt-image-1", image=("in.png", io.BytesIO(b"\x89PNG" + bytes(5000)), "image/png"), prompt="hat", n=3
    )
    assert len(edited.data) == 3
    sent = last(mock, "images/edits")
    assert sent["model"] == "gpt-image-1"
    assert sent["headers"]["content-type"].startswith("multipart/form-data; boundary=")
    # Images edits on Azure: its deployment path, the form's model rewritten.
    client.images.generate(model="azure-image", prompt="x")
    sent = last(mock, "images/generations")
    assert sent["path"] == "/openai/deployments/my-images/images/generations"
    assert sent["query"] == "api-version=2025-04-01-preview"


def test_speech_is_binary_streamed_through_and_billed_per_character(gateway, client, mock):
    text = "Hello there, world"
    chunks = []

    def speak():
        with client.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input=text) as resp:
            assert resp.headers["content-type"] == "audio/mpeg"
            chunks.extend(resp.iter_bytes(1024))

    cost = spent(gateway, speak)
    audio_bytes = b"".join(chunks)
    assert len(audio_bytes) == len(text) * 64 and audio_bytes.startswith(b"ID3")
    assert cost == pytest.approx(len(text) * 15.0 / 1e6, rel=1e-9)
    # SSE speech passes through with its usage.
    events = []
    with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="alloy", input="hi", stream_format="sse"
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line.startswith("data:")]
    assert json.loads(events[-1][5:])["type"] == "speech.audio.done"


def test_transcriptions_send_the_providers_model_and_bill_seconds(gateway, client, mock):
    result = []
    cost = spent(gateway, lambda: result.append(client.audio.transcriptions.create(model="whisper-1", file=audio(3))))
    assert result[0].text == f"mock transcript of {3 * SECOND} bytes"
    assert cost == pytest.approx(3 * 0.0001, rel=1e-9)
    # The form went upstream with the provider's model name.
    assert last(mock, "audio/transcriptions")["model"] == "whisper-prod"
    text = client.audio.transcriptions.create(model="whisper-1", file=audio(1), response_format="text")
    assert text.startswith("mock transcript")
    verbose = client.audio.transcriptions.create(model="whisper-1", file=audio(2), response_format="verbose_json")
    assert verbose.duration == 2.0
    translated = client.audio.translations.create(model="whisper-1", file=audio(1))
    assert translated.text.startswith("mock transcript")


def test_a_streamed_transcription_is_billed_from_its_usage(gateway, client):
    before = gateway.usage()
    stream = client.audio.transcriptions.create(model="gpt-4o-transcribe", file=audio(2), stream=True)
    events = list(stream)
    assert events[-1].type == "transcript.text.done"
    after = gateway.usage()
    assert after["prompt_tokens"] - before["prompt_tokens"] == 20
    assert after["estimated_requests"] == before["estimated_requests"]


def test_errors_keep_their_classes(gateway, client):
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="no-such-model", prompt="x")
    with pytest.raises(openai.PermissionDeniedError):
        gateway.client(NARROW_KEY).audio.transcriptions.create(model="whisper-1", file=audio(1))
    with pytest.raises(openai.AuthenticationError):
        gateway.client("sk-wrong-key-000000").moderations.create(input="x")
    # The provider's own 400 (no voice) passes through.
    with pytest.raises(openai.BadRequestError):
        client.audio.speech.create(model="tts-1", voice=None, input="x")
    # An upload over the body limit.
    with pytest.raises(openai.APIStatusError) as e:
        client.audio.transcriptions.create(model="whisper-1", file=audio(80))
    assert e.value.status_code == 413
    # A form without its model field, and JSON where a form belongs.
    req = urllib.request.Request(
        f"http://127.0.0.1:{gateway.port}/v1/audio/transcriptions",
        data=b'{"model": "whisper-1"}',
        headers={"authorization": f"Bearer {TENANT_KEY}", "content-type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and "multipart" in json.load(e.value)["error"]["message"]
    # Anthropic serves none of these.
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="claude-image", prompt="x")
    # Uploads cannot be async jobs.
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(
            model="whisper-1", file=audio(1), extra_headers={"prefer": "respond-async"}
        )
    assert e.value.body["param"] == "prefer"


def raw_post(gateway, path: str, body: bytes) -> tuple:
    req = urllib.request.Request(
        f"http://127.0.0.1:{gateway.port}{path}",
        data=body,
        headers={"authorization": f"Bearer {TENANT_KEY}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_what_media_is_billed_by_is_read_strictly_so_it_cannot_be_billed_for_less(gateway, mock):
    before = len(mock.requests())
    cases = [
        # A second `input` (a provider may read the first), or none.
        ("/v1/audio/speech", b'{"model":"tts-1","voice":"alloy","input":"a long text to speak","input":""}', "input"),
        ("/v1/audio/speech", b'{"model":"tts-1","voice":"alloy","input":42}', "input"),
        ("/v1/audio/speech", b'{"model":"tts-1","voice":"alloy"}', "input"),
        # A sibling of the wrong type no longer makes the request free.
        ("/v1/images/generations", b'{"model":"dall-e-3","prompt":"x","n":"3"}', "n"),
        ("/v1/images/generations", b'{"model":"dall-e-3","prompt":"x","n":2,"n":1}', "n"),
    ]
    for path, body, param in cases:
        status, answer = raw_post(gateway, path, body)
        assert status == 400, answer
        assert json.loads(answer)["error"]["param"] == param
    assert len(mock.requests()) == before
    # Speech with a sibling the gateway does not read is billed for its characters.
    cost = spent(
        gateway,
        lambda: raw_post(gateway, "/v1/audio/speech", b'{"model":"tts-1","voice":"alloy","input":"twelve chars","speed":"x"}'),
    )
    assert cost == pytest.approx(12 * 15.0 / 1e6, rel=1e-9)


def test_limits_count_media_requests(gateway):
    limited = gateway.client(LIMITED_KEY)
    limited.moderations.create(input="one")
    with pytest.raises(openai.RateLimitError):
        limited.audio.transcriptions.create(model="whisper-1", file=audio(1))


def test_failover_before_the_first_byte_resends_the_upload(gateway, client, mock):
    mock.fault({"status": 500, "count": 1, "path": "/v1/audio/transcriptions"})
    before = len([r for r in mock.requests() if "transcriptions" in r["path"]])
    result = client.audio.transcriptions.create(model="whisper-1", file=audio(1))
    assert result.text.startswith("mock transcript")
    sent = [r for r in mock.requests() if "transcriptions" in r["path"]][before:]
    assert len(sent) == 2 and sent[0]["body_sha256"] == sent[1]["body_sha256"]
    # tts-1's first target is down: its speech comes from the second.
    for _ in range(3):
        assert client.audio.speech.create(model="tts-1", voice="alloy", input="ok").content.startswith(b"ID3")


def test_llmock_images_through_the_gateway(gateway, client, llmock):
    direct = openai.OpenAI(base_url=llmock.base_url, api_key="sk-llmock-key", max_retries=0)
    want = direct.images.generate(model="dall-e-3", prompt="a boat")
    got = client.images.generate(model="ext-dalle", prompt="a boat")
    assert len(got.data) == len(want.data)
    assert (got.data[0].url is None) == (want.data[0].url is None)
