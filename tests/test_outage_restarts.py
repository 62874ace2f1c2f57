"""A redis-server restarted while a job runs, then the whole worker SIGKILLed while the next
one runs, on one real stack at production retry settings (gunicorn API, a Celery worker with
its consumer watchdog, the webhook sender, a private redis-server with AOF). After each fault
every job ends in exactly one terminal state (one webhook event each) and the worker, or its
replacement, consumes again within 30 s. tests/test_service_reliability.py has the same
faults with the worker's Redis retries cut short (its consumer then stalls and exits 75)."""

from __future__ import annotations

import time

import pytest
from outages import HEARTBEAT_TTL_S, assert_ended_once, outage_stack, poll_until_terminal
from sam3d_client.http import Http
from service import SQUARE_FLAT, submit_json, wait_until

REDIS_DOWN_S = 5


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = outage_stack(tmp_path_factory.mktemp("restarts"))
    yield s
    s.stop()


@pytest.mark.slow
def test_redis_restarted_then_worker_sigkilled_mid_job_each_job_ends_once(stack, events):
    http = Http(stack.url)
    finals: dict[str, dict] = {}

    # 1. Redis stopped (SIGTERM: the AOF is flushed) mid-job, down 10 s, started again.
    first = submit_json(http, [SQUARE_FLAT] * 3, webhook_url=events.url)
    wait_until(http, first["id"], lambda j: j["progress"]["objects_done"] >= 1, timeout=60)
    stack.redis.stop()
    time.sleep(REDIS_DOWN_S)
    stack.redis.start()
    back = time.monotonic()
    after_restart = submit_json(http, SQUARE_FLAT, webhook_url=events.url)
    ended = poll_until_terminal(stack, http, [first["id"], after_restart["id"]], timeout=90)
    finals.update(ended)
    for job in ended.values():
        assert job["status"] == "succeeded", job["error"]
    consuming_s = ended[after_restart["id"]]["seen_at"] - back
    print(f"\nRedis down {REDIS_DOWN_S} s mid-job: terminal (attempt "
          f"{ended[first['id']]['attempts']}) {ended[first['id']]['seen_at'] - back:.1f} s "
          f"after its restart; a job submitted then ended {consuming_s:.1f} s after; "
          f"worker restarts {stack.restarts}")  # fmt: skip
    assert consuming_s < 30

    # 2. The whole worker SIGKILLed mid-job (no ack, no goodbye); its replacement starts, as
    # a restart policy would start it, and its reaper sends the job again.
    victim = stack.workers[-1]
    second = submit_json(http, [SQUARE_FLAT] * 3, webhook_url=events.url)
    wait_until(http, second["id"], lambda j: j["progress"]["objects_done"] >= 1, timeout=60)
    stack.kill_worker(victim)
    killed = time.monotonic()
    stack.start_worker(backend="fixture_backends:SlowInflate")
    after_kill = submit_json(http, SQUARE_FLAT, webhook_url=events.url)
    ended = poll_until_terminal(stack, http, [second["id"], after_kill["id"]], timeout=90)
    finals.update(ended)
    for job in ended.values():
        assert job["status"] == "succeeded", job["error"]
    assert ended[second["id"]]["attempts"] == 2  # reaped once, resumed once
    consuming_s = max(j["seen_at"] for j in ended.values()) - killed
    print(f"worker SIGKILLed mid-job: terminal (attempt 2) "
          f"{ended[second['id']]['seen_at'] - killed:.1f} s after the kill (replacement "
          f"started at once); both jobs ended within {consuming_s:.1f} s")  # fmt: skip
    assert consuming_s < 30

    assert_ended_once(stack, http, events, finals, settle_s=HEARTBEAT_TTL_S + 2)
