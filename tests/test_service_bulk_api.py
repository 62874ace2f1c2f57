"""Batches, uploads, webhooks and per-key limits, against the real dev stack (Redis, Celery
workers, the webhook sender, the API over HTTP) and a loopback webhook receiver."""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler

import pytest
from sam3d_client.http import ApiError, Http
from service import (
    SQUARE_FLAT,
    TRIANGLE_FLAT,
    b64,
    make_stack,
    scene_image,
    serve_on_loopback,
    submit_json,
    wait_until,
)

from jobs.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify

SECRET = "test-webhook-secret"
RETRY_BASE_S = 0.4


class Receiver:
    """A webhook endpoint on loopback: scripted answers per path, every delivery recorded."""

    def __init__(self) -> None:
        self.deliveries: list[dict] = []
        self.script: dict[str, list[int]] = {}  # path -> statuses to answer, then 200
        self.delay: dict[str, float] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                answers = receiver.script.get(self.path, [])
                status = answers.pop(0) if answers else 200
                time.sleep(receiver.delay.get(self.path, 0))
                receiver.deliveries.append(
                    {"path": self.path, "at": time.monotonic(), "status": status,
                     "body": body, "headers": {k.lower(): v for k, v in self.headers.items()}}
                )  # fmt: skip
                self.send_response(status)
                self.end_headers()

            def do_GET(self):  # noqa: N802
                data = scene_image()
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server, self.url = serve_on_loopback(Handler)

    def wait_for(self, path: str, status: int = 200, timeout: float = 30) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            got = [d for d in self.deliveries if d["path"] == path]
            if any(d["status"] == status for d in got):
                return got
            assert time.monotonic() < deadline, f"no {status} delivery to {path}: {got}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = make_stack(
        tmp_path_factory.mktemp("bulkapi"),
        workers=1,
        allow_private_urls=True,  # the receiver and the image server are on loopback
        webhook_secret=SECRET,
        webhook_retry_base_s=RETRY_BASE_S,
        webhook_max_attempts=4,
    )
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(stack) -> Http:
    return Http(stack.url)


def test_webhook_fails_twice_then_succeeds_signed_and_visible_on_the_job(http, receiver):
    receiver.script["/hook-a"] = [500, 503]
    job = submit_json(http, SQUARE_FLAT, webhook_url=receiver.url + "/hook-a")
    assert http.wait(job["id"])["status"] == "succeeded"
    deliveries = receiver.wait_for("/hook-a")
    assert [d["status"] for d in deliveries] == [500, 503, 200]
    # Exponential backoff: the second wait is about twice the first.
    gaps = [b["at"] - a["at"] for a, b in zip(deliveries, deliveries[1:], strict=False)]
    assert gaps[0] >= RETRY_BASE_S * 0.9 and gaps[1] >= 2 * RETRY_BASE_S * 0.9, gaps
    for delivery in deliveries:
        headers = delivery["headers"]
        ts, sig = headers[TIMESTAMP_HEADER.lower()], headers[SIGNATURE_HEADER.lower()]
        verify(SECRET, delivery["body"], ts, sig)
        with pytest.raises(ValueError):
            verify("wrong", delivery["body"], ts, sig)
        with pytest.raises(ValueError):
            verify(SECRET, delivery["body"] + b" ", ts, sig)
        with pytest.raises(ValueError):  # a replay long after
            verify(SECRET, delivery["body"], ts, sig, now=int(ts) + 3600)
    event = json.loads(deliveries[-1]["body"])
    assert event["type"] == "job.succeeded" and event["data"]["job"]["id"] == job["id"]
    assert headers["x-sam3d-event"] == "job.succeeded"
    final = wait_until(http, job["id"], lambda j: j["webhook"]["state"] == "delivered")
    attempts = final["webhook"]["attempts"]
    assert [a["status"] for a in attempts] == [500, 503, 200]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]


def test_webhook_gives_up_after_max_attempts(http, receiver):
    receiver.script["/hook-dead"] = [500] * 10
    job = submit_json(http, SQUARE_FLAT, webhook_url=receiver.url + "/hook-dead")
    final = wait_until(http, job["id"], lambda j: (j["webhook"] or {}).get("state") == "failed", 30)
    assert len(final["webhook"]["attempts"]) == 4
    assert len([d for d in receiver.deliveries if d["path"] == "/hook-dead"]) == 4


def test_failed_and_canceled_jobs_notify_too(http, receiver):
    blocker = submit_json(http, [SQUARE_FLAT] * 3)
    queued = submit_json(http, SQUARE_FLAT, webhook_url=receiver.url + "/hook-cancel")
    http.json("POST", f"/v1/jobs/{queued['id']}/cancel")
    (delivery,) = receiver.wait_for("/hook-cancel")
    assert json.loads(delivery["body"])["type"] == "job.canceled"
    http.wait(blocker["id"])


def test_a_slow_receiver_never_holds_up_the_worker(http, receiver):
    receiver.delay["/hook-slow"] = 4.0
    first = submit_json(http, SQUARE_FLAT, webhook_url=receiver.url + "/hook-slow")
    http.wait(first["id"])
    t0 = time.monotonic()
    second = submit_json(http, SQUARE_FLAT)
    assert http.wait(second["id"])["status"] == "succeeded"
    assert time.monotonic() - t0 < 3.0  # the worker did not wait for the 4 s receiver
    receiver.wait_for("/hook-slow", timeout=15)


def test_private_webhook_urls_are_refused_unless_allowed(tmp_path_factory):
    strict = make_stack(tmp_path_factory.mktemp("strict"), workers=0, webhook_secret=SECRET)
    strict.start(wait=False)
    try:
        http = Http(strict.url)
        for url in ("http://127.0.0.1:9/x", "http://10.0.0.8/x", "ftp://example.com/x"):
            with pytest.raises(ApiError) as info:
                submit_json(http, SQUARE_FLAT, webhook_url=url)
            assert (info.value.status, info.value.code) == (400, "invalid_request")
            assert "webhook_url" in info.value.message
    finally:
        strict.stop()


def test_uploads_then_a_batch_by_key_url_and_base64_with_a_batch_webhook(http, receiver):
    up = http.post_multipart("/v1/uploads", {}, [("file", "scene.png", scene_image())])
    assert up["key"].startswith("uploads/") and up["bytes"] == len(scene_image())
    body = {
        "options": {"splats": 800, "resolution": 24},
        "webhook_url": receiver.url + "/hook-batch",
        "jobs": [
            {"image": {"type": "key", "value": up["key"]}, "mask_input": SQUARE_FLAT},
            {"image": {"type": "url", "value": receiver.url + "/scene.png"},
             "mask_input": [SQUARE_FLAT, TRIANGLE_FLAT]},
            {"image": {"type": "base64", "value": b64(scene_image())}, "mask_input": TRIANGLE_FLAT,
             "options": {"seed": 4}},
        ],
    }  # fmt: skip
    batch = http.json("POST", "/v1/batches", body)
    assert len(batch["jobs"]) == 3
    for job in batch["jobs"]:
        view = http.json("GET", f"/v1/jobs/{job['id']}")
        assert view["queue"] == "bulk" and view["batch_id"] == batch["id"]
        assert view["options"]["splats"] == 800
    assert http.json("GET", f"/v1/jobs/{batch['jobs'][2]['id']}")["options"]["seed"] == 4
    (delivery,) = receiver.wait_for("/hook-batch", timeout=60)
    event = json.loads(delivery["body"])
    assert event["type"] == "batch.completed"
    assert event["data"]["batch"]["counts"]["succeeded"] == 3
    state = http.json("GET", f"/v1/batches/{batch['id']}")
    assert state["total"] == 3 and state["finished"] is True
    assert state["counts"]["succeeded"] == 3
    assert [j["status"] for j in state["jobs"]] == ["succeeded"] * 3
    time.sleep(0.5)
    assert len([d for d in receiver.deliveries if d["path"] == "/hook-batch"]) == 1


def test_a_bad_spec_rejects_the_whole_batch(http):
    before = len(http.json("GET", "/v1/jobs?limit=100")["jobs"])
    good = {"image": {"type": "base64", "value": b64(scene_image())}, "mask_input": SQUARE_FLAT}
    bad = {**good, "mask_input": [[0, 1, 0], [1, 1, 1], [0, 1, 0]]}
    with pytest.raises(ApiError) as info:
        http.json("POST", "/v1/batches", {"jobs": [good, bad, good]})
    assert info.value.code == "mask_size_mismatch" and info.value.message.startswith("jobs[1]")
    for body in ({}, {"jobs": []}, {"jobs": [good], "extra": 1}):
        with pytest.raises(ApiError) as info:
            http.json("POST", "/v1/batches", body)
        assert info.value.status == 400
    # A job's options that are not an object (schemathesis found a 500 here: the batch's
    # defaults were merged into a list).
    for options in ([None, None], "fast", 3):
        with pytest.raises(ApiError) as info:
            http.json("POST", "/v1/batches", {"jobs": [good, {**good, "options": options}]})
        assert info.value.status == 400 and info.value.message.startswith("jobs[1]")
    foreign = {**good, "image": {"type": "key", "value": "uploads/someone-else/abc"}}
    with pytest.raises(ApiError) as info:
        http.json("POST", "/v1/batches", {"jobs": [foreign]})
    assert info.value.code == "invalid_image"
    assert len(http.json("GET", "/v1/jobs?limit=100")["jobs"]) == before
    with pytest.raises(ApiError) as info:
        http.json("GET", "/v1/batches/batch_nope")
    assert info.value.status == 404


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """No worker, so jobs stay in flight; two keys with their own buckets."""
    s = make_stack(
        tmp_path_factory.mktemp("limits"),
        workers=0,
        api_keys=("k1", "k2"),
        # Slow enough that a loaded machine (make test runs suites in parallel) still sends
        # the burst within one token's time.
        submit_rate_per_s=0.5,
        submit_burst=3,
        max_in_flight=5,
    )
    s.start(wait=False)
    yield s
    s.stop()


def test_token_bucket_per_key_answers_429_with_retry_after(limited):
    k1, k2 = Http(limited.url, "k1"), Http(limited.url, "k2")
    for _ in range(3):
        submit_json(k1, SQUARE_FLAT)
    with pytest.raises(ApiError) as info:
        submit_json(k1, SQUARE_FLAT)
    assert (info.value.status, info.value.code) == (429, "rate_limited")
    submit_json(k2, SQUARE_FLAT)  # another key, another bucket
    time.sleep(2.1)  # a token back at 0.5/s
    submit_json(k1, SQUARE_FLAT)


def test_in_flight_cap_answers_429_until_jobs_finish(limited):
    k1 = Http(limited.url, "k1")
    while True:  # k1 has 4 in flight from the test above; one more reaches the cap of 5
        try:
            submit_json(k1, SQUARE_FLAT)
            break
        except ApiError as exc:
            assert exc.code == "rate_limited"
            time.sleep(0.6)
    time.sleep(2.2)  # a token is back: only the in-flight cap can refuse now
    with pytest.raises(ApiError) as info:
        submit_json(k1, SQUARE_FLAT)
    assert (info.value.status, info.value.code) == (429, "too_many_in_flight")
    # Once a worker drains the queue, the key may submit again.
    limited.start_worker()
    limited.wait_ready(60)
    deadline = time.monotonic() + 60
    while k1.json("GET", "/v1/jobs?status=queued")["jobs"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    submit_json(k1, SQUARE_FLAT)


def test_retry_after_header_is_sent(limited):
    import urllib.error
    import urllib.request

    body = json.dumps({"image": {"type": "base64", "value": b64(scene_image())},
                       "mask_input": SQUARE_FLAT}).encode()  # fmt: skip
    req = urllib.request.Request(
        limited.url + "/v1/jobs",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": "Bearer k2"},
    )
    statuses = []
    for _ in range(6):
        try:
            urllib.request.urlopen(req).read()
            statuses.append(202)
        except urllib.error.HTTPError as exc:
            statuses.append(exc.code)
            if exc.code == 429:
                assert int(exc.headers["Retry-After"]) >= 1
                break
    assert 429 in statuses


def test_uploads_are_rate_limited_per_key_in_a_bucket_of_their_own(limited):
    k3 = Http(limited.url, "k2")
    codes = []
    for _ in range(5):  # burst 3 at 0.5/s
        try:
            k3.post_multipart("/v1/uploads", {}, [("file", "scene.png", scene_image())])
            codes.append(201)
        except ApiError as exc:
            codes.append((exc.status, exc.code))
    assert codes[:3] == [201] * 3 and (429, "rate_limited") in codes[3:]
