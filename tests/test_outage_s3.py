"""S3 down for a whole minute while a job stores its objects: the real stack (gunicorn API, a
Celery worker, a private redis-server) on s3:// storage served by moto's S3 server, which is
stopped mid-job and started again on the same port with its data. The job's storage writes
retry with backoff inside the job (``SAM3D_STORAGE_RETRY_S``, 120 s by default), so it ends
succeeded on its first attempt; submits meanwhile answer 503 ``unavailable``."""

from __future__ import annotations

import time

import boto3
import pytest
from outages import assert_ended_once, outage_stack, poll_until_terminal
from sam3d_client.http import ApiError, Http
from service import SQUARE_FLAT, submit_json, wait_until

from jobs.redis_server import free_port
from jobs.retry import backoff_delays
from jobs.settings import Settings

OUTAGE_S = 60
CREDS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class Moto:
    """moto's S3 server in this process; stopped and started again on the same port, it keeps
    its buckets and objects (they live in moto's process-wide backend)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture(scope="module")
def moto():
    m = Moto()
    m.start()
    boto3.client(
        "s3", endpoint_url=m.url, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    ).create_bucket(Bucket="outage")  # fmt: skip
    yield m
    m.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, moto):
    s = outage_stack(
        tmp_path_factory.mktemp("s3-outage"),
        extra_env=CREDS,
        storage_url="s3://outage/jobs",
        s3_endpoint_url=moto.url,
    )
    yield s
    s.stop()


def test_the_default_storage_retry_budget_outlasts_a_minute():
    budget = Settings().storage_retry_s
    assert budget >= 2 * OUTAGE_S
    # worker/tasks.py retries storage calls with these delays (0.5 s doubling, capped at 10 s)
    assert sum(backoff_delays(budget, base_s=0.5, cap_s=10.0)) >= budget


@pytest.mark.slow
def test_s3_stopped_a_minute_mid_job_the_job_succeeds_on_its_first_attempt(stack, moto, events):
    http = Http(stack.url)
    job = submit_json(http, [SQUARE_FLAT] * 3, webhook_url=events.url)
    wait_until(http, job["id"], lambda j: j["progress"]["objects_done"] >= 1, timeout=60)
    moto.stop()
    down = time.monotonic()
    try:
        # A submit now cannot store its inputs: 503 with Retry-After, no record kept.
        listed = [j["id"] for j in http.json("GET", "/v1/jobs?limit=100")["jobs"]]
        with pytest.raises(ApiError) as info:
            submit_json(http, SQUARE_FLAT)
        assert (info.value.status, info.value.code) == (503, "unavailable")
        assert [j["id"] for j in http.json("GET", "/v1/jobs?limit=100")["jobs"]] == listed
        while time.monotonic() - down < OUTAGE_S:
            during = http.json("GET", f"/v1/jobs/{job['id']}")
            assert during["status"] == "running", during  # waiting on storage, not failed
            time.sleep(1)
        assert during["progress"]["objects_done"] < 3  # it really was held up by the outage
    finally:
        moto.start()
    back = time.monotonic()
    later = submit_json(http, SQUARE_FLAT, webhook_url=events.url)  # the worker takes more
    finals = poll_until_terminal(stack, http, [job["id"], later["id"]], timeout=90)
    first, second = finals[job["id"]], finals[later["id"]]
    print(f"\nS3 down {back - down:.0f} s mid-job: terminal {first['seen_at'] - back:.1f} s "
          f"after it came back; a job submitted then ended {second['seen_at'] - back:.1f} s "
          f"after")  # fmt: skip
    assert first["status"] == "succeeded", first["error"]
    assert first["attempts"] == 1  # retried inside the job, not redelivered
    assert second["status"] == "succeeded", second["error"]
    assert second["seen_at"] - back < 30
    assert_ended_once(stack, http, events, finals, settle_s=5)
    s3 = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
    listed = s3.list_objects_v2(Bucket="outage", Prefix=f"jobs/jobs/{job['id']}/")
    assert listed["KeyCount"] == 2 + 3 + 3 * 2  # inputs; scene.glb, scene.ply, manifest; objects
    stored = {k["Key"].split("/")[2] for k in s3.list_objects_v2(Bucket="outage")["Contents"]}
    assert stored == {job["id"], later["id"]}  # nothing of the refused submit
