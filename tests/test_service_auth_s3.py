"""API keys isolating jobs, and the s3:// storage driver end to end against a real
S3-compatible server (moto's server mode)."""

from __future__ import annotations

import urllib.request

import boto3
import pytest
from sam3d_client.http import ApiError, Http, artifact_urls
from service import SQUARE_FLAT, make_stack, submit_json

from jobs.redis_server import free_port


@pytest.fixture(scope="module")
def keyed_stack(tmp_path_factory):
    s = make_stack(
        tmp_path_factory.mktemp("keys"),
        workers=1,
        api_keys=("key-alpha", "key-beta"),
        log_format="json",
    )
    s.start()
    yield s
    s.stop()


def test_api_keys_isolate_jobs(keyed_stack):
    alpha, beta = Http(keyed_stack.url, "key-alpha"), Http(keyed_stack.url, "key-beta")
    job = submit_json(alpha, SQUARE_FLAT)
    assert alpha.wait(job["id"])["status"] == "succeeded"
    for method, path in [
        ("GET", f"/v1/jobs/{job['id']}"),
        ("POST", f"/v1/jobs/{job['id']}/cancel"),
        ("DELETE", f"/v1/jobs/{job['id']}"),
    ]:
        with pytest.raises(ApiError) as info:
            beta.json(method, path)
        assert info.value.status == 404, (method, path)
    assert beta.json("GET", "/v1/jobs")["jobs"] == []
    assert [j["id"] for j in alpha.json("GET", "/v1/jobs")["jobs"]] == [job["id"]]
    # The same idempotency key under another API key is another job.
    key = {"Idempotency-Key": "shared"}
    assert (
        submit_json(alpha, SQUARE_FLAT, headers=key)["id"]
        != submit_json(beta, SQUARE_FLAT, headers=key)["id"]
    )


def test_logs_are_json_with_the_job_id_on_every_job_line(keyed_stack):
    http = Http(keyed_stack.url, "key-alpha")
    job = submit_json(http, SQUARE_FLAT)
    http.wait(job["id"])
    http.json("GET", f"/v1/jobs/{job['id']}")
    import json

    seen = {"api": 0, "worker": 0}
    for name in ("api", "worker-0"):
        lines = (keyed_stack.log_dir / f"{name}.log").read_text().splitlines()
        assert lines
        for line in lines:
            entry = json.loads(line)  # every line is one JSON object
            assert {"ts", "level", "logger", "msg", "service", "pid", "job_id"} <= set(entry)
            if job["id"] in entry["msg"] or entry["job_id"] == job["id"]:
                assert entry["job_id"] == job["id"], entry
                seen[entry["service"]] += 1
    assert seen["api"] >= 1 and seen["worker"] >= 2, seen


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_missing_or_wrong_key_is_401(keyed_stack, key):
    http = Http(keyed_stack.url, key)
    with pytest.raises(ApiError) as info:
        submit_json(http, SQUARE_FLAT)
    assert (info.value.status, info.value.code) == (401, "unauthorized")
    with pytest.raises(ApiError) as info:
        http.json("GET", "/v1/jobs")
    assert info.value.status == 401
    assert http.json("GET", "/healthz") == {"status": "ok"}  # probes need no key


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="module")
def s3_stack(tmp_path_factory, s3_server):
    creds = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", **{
        "aws_access_key_id": "testing", "aws_secret_access_key": "testing"
    }).create_bucket(Bucket="assets")  # fmt: skip
    s = make_stack(
        tmp_path_factory.mktemp("s3"),
        workers=1,
        storage_url="s3://assets/prod",
        s3_endpoint_url=s3_server,
        s3_public_endpoint_url=s3_server.replace("127.0.0.1", "localhost"),
    )
    s.extra_env.update(creds)
    s.start()
    yield s
    s.stop()


def test_s3_storage_end_to_end(s3_stack, s3_server, tmp_path):
    http = Http(s3_stack.url)
    ready = http.json("GET", "/readyz")
    assert ready["checks"]["storage"]["ok"] is True
    job = http.wait(submit_json(http, SQUARE_FLAT)["id"])
    assert job["status"] == "succeeded", job["error"]
    urls = artifact_urls(job["result"])
    for path, url in urls.items():
        assert url.startswith("http://localhost:"), url  # signed for the public endpoint
        assert "X-Amz-Signature=" in url
        with urllib.request.urlopen(url) as resp:
            data = resp.read()
            assert resp.headers["Content-Disposition"].startswith("attachment;")
        assert len(data) > 0, path
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    head = s3.head_object(Bucket="assets", Key=f"prod/jobs/{job['id']}/scene.glb")
    assert head["ContentType"] == "model/gltf-binary"
    keys = s3.list_objects_v2(Bucket="assets", Prefix=f"prod/jobs/{job['id']}/")["Contents"]
    assert len(keys) == 2 + 3 + 2  # 2 inputs; scene.glb, scene.ply, manifest; one object
    http.json("DELETE", f"/v1/jobs/{job['id']}")
    assert s3.list_objects_v2(Bucket="assets", Prefix=f"prod/jobs/{job['id']}/")["KeyCount"] == 0
