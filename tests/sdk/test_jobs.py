"""Issue #19 through the official OpenAI Python SDK, with llmock (PyPI, an
upstream we did not write) as the provider: a submission retried with the
same Idempotency-Key is one job and one provider call, a reused key with
another body is a 409 the SDK raises as a ConflictError, a provider that
fails twice is outlived by the job's attempts, an attempt past the job's
time limit is cut and tried again, a running job is cancelled, and the
tenant's jobs are listed with a cursor.
"""

import time

import httpx
import openai
import pytest

from conftest import TENANT_KEY, Llmock, Runestone, server_yaml

OTHER_KEY = "sk-sdk-jobs-other-0042"
ASYNC = {"prefer": "respond-async"}

# A job attempt's time limit: every attempt must answer within it, on a
# loaded machine too (an attempt cut short is one more attempt and one more
# provider call than the tests count), and llmock's delayed answers (5 s)
# must not.
JOB_TIMEOUT_S = 3


class Gateway(Runestone):
    """runestone in front of llmock, two tenants with async jobs."""

    def __init__(self, base_url: str):
        def config(port, metrics_port, directory):
            return server_yaml(port, metrics_port, directory) + f"""
providers:
  - {{ name: upstream, base_url: "{base_url}", api_key: "sk-llmock-jobs-key" }}
models:
  - name: gpt-4o-mini
    targets: [{{ provider: upstream }}]
tenants:
  - id: acme
    keys: ["{TENANT_KEY}"]
    overflow: {{ enabled: true }}
  - id: other
    keys: ["{OTHER_KEY}"]
    overflow: {{ enabled: true }}
jobs: {{ timeout_seconds: {JOB_TIMEOUT_S}, max_attempts: 3, retry_backoff_ms: 100, retry_backoff_max_ms: 300 }}
"""

        super().__init__(config)

    def api(self, method: str, path: str, key: str = TENANT_KEY) -> httpx.Response:
        return httpx.request(method, f"http://127.0.0.1:{self.port}{path}",
                             headers={"authorization": f"Bearer {key}"}, timeout=15)


@pytest.fixture(scope="module")
def llmock():
    server = Llmock()
    yield server
    server.stop()


@pytest.fixture()
def gateway(llmock):
    llmock.reset()
    gateway = Gateway(llmock.base_url)
    yield gateway
    gateway.stop()


def submit(client: openai.OpenAI, content: str, **headers) -> openai.APIResponse:
    return client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}],
        extra_headers={**ASYNC, **headers})


def result(gateway: Gateway, job_id: str, key: str = TENANT_KEY) -> httpx.Response:
    deadline = time.monotonic() + 30
    while True:
        resp = gateway.api("GET", f"/v1/jobs/{job_id}", key)
        if resp.status_code != 202:
            return resp
        assert time.monotonic() < deadline, f"job {job_id} not done: {resp.text}"
        time.sleep(0.05)


def chats(llmock: Llmock, content: str) -> int:
    return sum(1 for r in llmock.journal()
               if r["path"] == "/v1/chat/completions"
               and r["body"]["messages"][0]["content"] == content)


def test_a_retried_submission_is_one_job(gateway, llmock):
    client = gateway.client()
    first = submit(client, "idempotent", **{"Idempotency-Key": "sdk-order-1"})
    again = submit(client, "idempotent", **{"Idempotency-Key": "sdk-order-1"})
    assert first.status_code == 202
    job_id = first.http_response.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == f"/v1/jobs/{job_id}"
    done = result(gateway, job_id)
    assert done.status_code == 200 and done.json()["object"] == "chat.completion"
    assert chats(llmock, "idempotent") == 1
    # The same key with another body: the SDK raises the 409.
    with pytest.raises(openai.ConflictError) as err:
        submit(client, "another body", **{"Idempotency-Key": "sdk-order-1"})
    assert err.value.code == "idempotency_key_reused"


def test_a_failing_provider_is_outlived_by_the_jobs_attempts(gateway, llmock):
    # Two answers of 503 (each attempt fails over once within itself).
    llmock.scenario({"type": "fail", "status": 503, "times": 2})
    raw = submit(gateway.client(), "flaky provider")
    done = result(gateway, raw.http_response.json()["id"])
    assert done.status_code == 200, done.text
    assert int(done.headers["x-runestone-job-attempts"]) >= 2
    assert chats(llmock, "flaky provider") == 3


def test_an_attempt_past_the_time_limit_is_cut_and_tried_again(gateway, llmock):
    llmock.scenario({"type": "delay", "seconds": 5, "times": 1})
    raw = submit(gateway.client(), "slow once")
    done = result(gateway, raw.http_response.json()["id"])
    assert done.status_code == 200, done.text
    assert done.headers["x-runestone-job-attempts"] == "2"


def test_cancel_and_list(gateway, llmock):
    # Every attempt is slow: the job is running or waiting for its next
    # attempt when cancelled.
    llmock.scenario({"type": "delay", "seconds": 5, "times": 3})
    client = gateway.client()
    running = submit(client, "to cancel").http_response.json()["id"]
    deadline = time.monotonic() + 10
    while gateway.api("GET", f"/v1/jobs/{running}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert gateway.api("DELETE", f"/v1/jobs/{running}", OTHER_KEY).status_code == 404
    cancelled = gateway.api("DELETE", f"/v1/jobs/{running}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    llmock.reset()
    kept = submit(client, "to keep").http_response.json()["id"]
    assert result(gateway, kept).status_code == 200
    listed = gateway.api("GET", "/v1/jobs?limit=1").json()
    assert [j["id"] for j in listed["data"]] == [kept] and listed["has_more"]
    rest = gateway.api("GET", f"/v1/jobs?limit=1&after={listed['last_id']}").json()
    assert [(j["id"], j["status"]) for j in rest["data"]] == [(running, "cancelled")]
    assert gateway.api("GET", "/v1/jobs", OTHER_KEY).json()["data"] == []
