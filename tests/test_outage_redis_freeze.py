"""redis-server frozen (SIGSTOP) for 30 s while a job runs, then thawed (SIGCONT): every
connection hangs, nothing answers, heartbeats expire. The real stack (gunicorn API, a Celery
worker with the consumer watchdog, the webhook sender, local-disk storage). The job ends in
exactly one terminal state, and the worker consumes again within 30 s of the thaw (itself, or
restarted by its supervisor after the watchdog's exit 75)."""

from __future__ import annotations

import time

import pytest
from outages import assert_ended_once, outage_stack, poll_until_terminal
from sam3d_client.http import Http
from service import SQUARE_FLAT, submit_json, wait_until

FREEZE_S = 30


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = outage_stack(tmp_path_factory.mktemp("redis-freeze"))
    yield s
    s.stop()


@pytest.mark.slow
def test_redis_frozen_30s_mid_job_ends_once_and_the_worker_consumes_again(stack, events):
    http = Http(stack.url)
    job = submit_json(http, [SQUARE_FLAT] * 3, webhook_url=events.url)
    wait_until(http, job["id"], lambda j: j["progress"]["objects_done"] >= 1, timeout=60)
    stack.redis.freeze()
    try:
        time.sleep(FREEZE_S)
    finally:
        stack.redis.thaw()
    thawed = time.monotonic()
    later = submit_json(http, SQUARE_FLAT, webhook_url=events.url)
    finals = poll_until_terminal(stack, http, [job["id"], later["id"]], timeout=120)
    first, second = finals[job["id"]], finals[later["id"]]
    print(f"\nRedis frozen {FREEZE_S} s mid-job: terminal ({first['status']}, attempt "
          f"{first['attempts']}) {first['seen_at'] - thawed:.1f} s after the thaw; a job "
          f"submitted then ended {second['seen_at'] - thawed:.1f} s after; worker restarts: "
          f"{stack.restarts}")  # fmt: skip
    assert first["status"] == "succeeded", first["error"]
    assert second["status"] == "succeeded", second["error"]
    assert second["seen_at"] - thawed < 30  # the worker consumes again
    assert_ended_once(stack, http, events, finals, settle_s=5)
