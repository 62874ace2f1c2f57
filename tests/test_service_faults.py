"""Outages and hostile inputs against the real stack (gunicorn API, Celery worker, a private
redis-server, local-disk storage): 503 ``unavailable`` with Retry-After and nothing left
behind, the SDK waiting an outage out, storage writes retried inside a job, every bad input
answered 4xx with a stable code."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from sam3d_client import Client
from sam3d_client.transport import RetryPolicy
from service import FAST, SQUARE_FLAT, b64, make_stack, scene_image, submit_json


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = make_stack(
        tmp_path_factory.mktemp("faults"),
        consumer_stall_s=120.0,  # short Redis outages here: the worker rides them out
        heartbeat_interval_s=0.5,
        heartbeat_ttl_s=3.0,
    )
    s.start(wait=False)
    s.start_worker(backend="fixture_backends:SlowInflate")
    s.wait_ready(60)
    yield s
    s.stop()


def raw(stack, method: str, path: str, body: bytes | None = None, headers=None):
    """(status, headers, parsed JSON body) of one request, errors included."""
    req = urllib.request.Request(stack.url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def job_body(**extra) -> bytes:
    body = {
        "image": {"type": "base64", "value": b64(scene_image())},
        "mask_input": SQUARE_FLAT,
        "options": dict(FAST),
        **extra,
    }
    return json.dumps(body).encode()


JSON = {"Content-Type": "application/json"}


def stored_jobs(stack) -> list[str]:
    root = stack.data_dir / "storage" / "jobs"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_redis_down_submits_answer_503_leave_nothing_and_the_sdk_waits_it_out(stack):
    before = stored_jobs(stack)
    stack.redis.stop()
    try:
        status, headers, body = raw(stack, "POST", "/v1/jobs", job_body(), JSON)
        assert status == 503 and body["error"]["code"] == "unavailable"
        assert int(headers["Retry-After"]) > 0
        status, _, body = raw(stack, "GET", "/v1/jobs")
        assert status == 503 and body["error"]["code"] == "unavailable"
        assert raw(stack, "GET", "/readyz")[0] == 503
        assert stored_jobs(stack) == before  # no orphan inputs

        client = Client(stack.url, retry=RetryPolicy(attempts=20, max_retry_after_s=0.5))
        threading.Timer(2.0, stack.redis.start).start()
        started = time.monotonic()
        job = client.submit(scene_image(), [SQUARE_FLAT], **FAST)  # retried through 503s
        assert time.monotonic() - started >= 1.5
    finally:
        if stack.redis.proc is None:
            stack.redis.start()
    assert job.wait(timeout=60).status == "succeeded"


def test_storage_down_submits_answer_503_and_leave_no_record(stack, http):
    jobs_dir = stack.data_dir / "storage" / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    moved = jobs_dir.with_name("jobs.away")
    jobs_dir.rename(moved)
    jobs_dir.write_bytes(b"")  # every write under jobs/ now fails: storage is down
    try:
        listed = http.json("GET", "/v1/jobs?limit=100")["jobs"]
        status, headers, body = raw(stack, "POST", "/v1/jobs", job_body(), JSON)
        assert status == 503 and body["error"]["code"] == "unavailable"
        assert "Retry-After" in headers
        assert http.json("GET", "/v1/jobs?limit=100")["jobs"] == listed  # no record left
    finally:
        jobs_dir.unlink()
        moved.rename(jobs_dir)


def test_a_storage_outage_inside_a_job_is_retried_and_the_job_succeeds(stack, http):
    job = submit_json(http, [SQUARE_FLAT] * 2)  # ~1 s per object
    objects = stack.data_dir / "storage" / "jobs" / job["id"] / "objects"
    objects.write_bytes(b"")  # the object files cannot be written until this goes
    time.sleep(3)
    assert http.json("GET", f"/v1/jobs/{job['id']}")["progress"]["objects_done"] == 0
    objects.unlink()
    final = http.wait(job["id"], timeout=60)
    assert final["status"] == "succeeded", final["error"]
    assert final["attempts"] == 1


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "body",
    [
        nested(100_000),
        '{"image": ' + nested(100_000) + "}",
        '{"image": {"type": "base64", "value": "x"}, "mask_input": ' + nested(200) + "}",
        '{"image": {"type": "base64", "value": "x"}, "mask_input": [1], "options": {"seed": NaN}}',
        '{"image": {"type": "base64", "value": "x"}, "mask_input": [1], "image_id": Infinity}',
    ],
    ids=["nested body", "nested field", "nested 200", "NaN", "Infinity"],
)
def test_hostile_json_bodies_answer_400_invalid_request(stack, body):
    status, _, answer = raw(stack, "POST", "/v1/jobs", body.encode(), JSON)
    assert (status, answer["error"]["code"]) == (400, "invalid_request"), answer


@pytest.mark.parametrize("field", ["seed", "resolution", "splats"])
@pytest.mark.parametrize("value", ["1e400", "-1e400", "1" + "0" * 400, '"1e400"', '"Infinity"'])
def test_out_of_range_numbers_in_options_answer_4xx_with_a_stable_code(stack, field, value):
    body = json.dumps(
        {
            "image": {"type": "base64", "value": b64(scene_image())},
            "mask_input": SQUARE_FLAT,
            "options": {**FAST, field: "VALUE"},
        }
    ).replace('"VALUE"', value)
    status, _, answer = raw(stack, "POST", "/v1/jobs", body.encode(), JSON)
    assert status == 400 and answer["error"]["code"] in ("invalid_request", "invalid_option")


@pytest.mark.parametrize("value", ["1e400", "Infinity", "9" * 5000, "[" * 5000])
def test_hostile_multipart_fields_answer_400(stack, value):
    from sam3d_client.http import multipart

    for field in ("image_id", "options", "mask_input"):
        form = {"mask_input": json.dumps(SQUARE_FLAT), field: value}
        body, content_type = multipart(form, [("image", "scene.png", scene_image())])
        status, _, answer = raw(stack, "POST", "/v1/jobs", body, {"Content-Type": content_type})
        assert status == 400, (field, answer)
        assert answer["error"]["code"] in ("invalid_request", "invalid_option"), answer


def test_batches_of_nested_json_answer_400(stack):
    body = ('{"jobs": [' + nested(50_000) + "]}").encode()
    status, _, answer = raw(stack, "POST", "/v1/batches", body, JSON)
    assert (status, answer["error"]["code"]) == (400, "invalid_request")


def test_a_multipart_text_field_of_megabytes_is_accepted(stack, http):
    """Werkzeug refuses form fields over 500 KB by default; the body limit is 64 MB."""
    from sam3d_client.http import multipart

    t = [i / 20_000 for i in range(20_000)]  # a square traced by 80,000 points: ~1.3 MB
    square = (
        [[100 + 40 * u, 30] for u in t]
        + [[140, 30 + 40 * u] for u in t]
        + [[140 - 40 * u, 70] for u in t]
        + [[100, 70 - 40 * u] for u in t]
    )
    form = {"mask_input": json.dumps([square]), "options": json.dumps(FAST)}
    body, content_type = multipart(form, [("image", "scene.png", scene_image())])
    assert len(body) > 1_000_000
    status, _, answer = raw(stack, "POST", "/v1/jobs", body, {"Content-Type": content_type})
    assert status == 202, answer
    assert http.wait(answer["id"], timeout=60)["status"] == "succeeded"


def test_405_names_the_allowed_methods_in_json(stack):
    status, headers, answer = raw(stack, "PUT", "/v1/jobs")
    assert status == 405 and answer["error"]["code"] == "method_not_allowed"
    assert set(headers["Allow"].replace(" ", "").split(",")) >= {"GET", "POST"}


def test_an_idempotency_key_is_bound_to_its_request_and_freed_by_delete(stack, http):
    key = {"Idempotency-Key": f"fault-{time.time()}"}
    first = submit_json(http, SQUARE_FLAT, headers=key)
    assert submit_json(http, SQUARE_FLAT, headers=key)["id"] == first["id"]  # a retry
    status, _, answer = raw(stack, "POST", "/v1/jobs", job_body(mask_input=[SQUARE_FLAT] * 2),
                            {**JSON, **key})  # fmt: skip
    assert (status, answer["error"]["code"]) == (422, "idempotency_mismatch")
    # Multipart: the same fields under a new boundary are the same request.
    from sam3d_client.http import multipart

    form = {"mask_input": json.dumps(SQUARE_FLAT), "options": json.dumps(FAST)}
    mkey = {"Idempotency-Key": f"fault-mp-{time.time()}"}
    ids = set()
    for _ in range(2):
        body, content_type = multipart(form, [("image", "scene.png", scene_image())])
        status, _, answer = raw(stack, "POST", "/v1/jobs", body,
                                {"Content-Type": content_type, **mkey})  # fmt: skip
        assert status == 202
        ids.add(answer["id"])
    assert len(ids) == 1
    http.wait(first["id"], timeout=60)
    raw(stack, "DELETE", f"/v1/jobs/{first['id']}")
    again = submit_json(http, SQUARE_FLAT, options={"seed": 3}, headers=key)  # freed
    assert again["id"] != first["id"]


def test_a_batch_takes_an_idempotency_key_and_an_upload_can_be_deleted(stack, http):
    up = http.post_multipart("/v1/uploads", {}, [("file", "scene.png", scene_image())])
    spec = {"image": {"type": "key", "value": up["key"]}, "mask_input": SQUARE_FLAT,
            "options": dict(FAST)}  # fmt: skip
    key = {"Idempotency-Key": f"batch-{time.time()}"}
    first = http.json("POST", "/v1/batches", {"jobs": [spec, spec]}, headers=key)
    again = http.json("POST", "/v1/batches", {"jobs": [spec, spec]}, headers=key)
    assert again["id"] == first["id"] and again["jobs"] == first["jobs"]
    body = json.dumps({"jobs": [spec]}).encode()
    status, _, answer = raw(stack, "POST", "/v1/batches", body, {**JSON, **key})
    assert (status, answer["error"]["code"]) == (422, "idempotency_mismatch")
    for job in first["jobs"]:
        assert http.wait(job["id"], timeout=60)["status"] == "succeeded"
    name = up["key"].rsplit("/", 1)[1]
    assert raw(stack, "DELETE", f"/v1/uploads/{name}")[0] == 204
    status, _, answer = raw(stack, "DELETE", f"/v1/uploads/{name}")
    assert (status, answer["error"]["code"]) == (404, "not_found")
    status, _, answer = raw(stack, "POST", "/v1/jobs", json.dumps(spec).encode(), JSON)
    assert (status, answer["error"]["code"]) == (400, "invalid_image")  # it is gone
