"""The reaper and the consumer watchdog against a real redis-server (their clocks stepped by
hand), and the retry helpers."""

from __future__ import annotations

import json

import pytest

from jobs.heartbeat import Heartbeat, consumer_key, live_workers
from jobs.reaper import Reaper
from jobs.records import IllegalTransition, JobRecord, JobStatus, JobStore, new_job_id
from jobs.retry import backoff_delays, redis_client, retry_call
from worker.watchdog import ConsumerWatchdog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(redis_client) -> JobStore:
    return JobStore(redis_client)


def running(store: JobStore, worker: str, attempts: int = 0) -> JobRecord:
    record = store.create(JobRecord(id=new_job_id(), objects_total=1, attempts=attempts))
    claimed, run = store.claim(record.id, 3, worker=worker)
    assert run
    return claimed


def reaper(store, clock, sent) -> Reaper:
    return Reaper(store, max_attempts=3, grace_s=1.0, requeue=sent.append, clock=clock)


def test_a_job_whose_worker_is_gone_is_requeued_once_after_the_grace(store):
    clock, sent = Clock(), []
    job = running(store, "dead:1")
    a, b = reaper(store, clock, sent), reaper(store, clock, sent)
    assert a.sweep({}) == [] and b.sweep({}) == []  # suspected, not yet reaped
    clock.now += 1.0
    assert a.sweep({}) == [job.id]
    assert b.sweep({}) == []  # the other sweeper finds it queued: exactly one reap
    assert [r.id for r in sent] == [job.id]
    record = store.get(job.id)
    assert record.status is JobStatus.QUEUED and record.worker == "" and record.attempts == 1
    assert store.queue_position(record) == 0
    again, run = store.claim(job.id, 3, worker="alive:2")
    assert run and again.attempts == 2 and again.worker == "alive:2"


def test_a_job_its_live_worker_holds_is_left_alone_and_one_it_dropped_is_not(store):
    clock, sent = Clock(), []
    held, dropped = running(store, "alive:1"), running(store, "alive:1")
    live = {"alive:1": {"name": "alive:1", "jobs": [held.id]}}
    r = reaper(store, clock, sent)
    r.sweep(live)
    clock.now += 5
    assert r.sweep(live) == [dropped.id]  # its final write was lost; the worker went on
    assert store.get(held.id).status is JobStatus.RUNNING


def test_a_job_whose_attempts_are_used_up_fails_too_many_attempts(store):
    clock, sent = Clock(), []
    job = running(store, "dead:1", attempts=2)
    r = reaper(store, clock, sent)
    r.sweep({})
    clock.now += 1
    assert r.sweep({}) == [job.id] and sent == []
    record = store.get(job.id)
    assert record.status is JobStatus.FAILED
    assert record.error["code"] == "too_many_attempts" and record.error["retryable"] is False


def test_the_run_that_lost_its_job_writes_no_outcome(store):
    clock, sent = Clock(), []
    job = running(store, "slow:1")
    r = reaper(store, clock, sent)
    r.sweep({})
    clock.now += 1
    r.sweep({})
    store.claim(job.id, 3, worker="other:2")
    with pytest.raises(IllegalTransition):
        store.transition(job.id, JobStatus.SUCCEEDED, expect_run=("slow:1", 1))
    store.transition(job.id, JobStatus.SUCCEEDED, expect_run=("other:2", 2))


def test_a_stale_message_for_a_job_a_live_worker_runs_is_not_run_twice(store):
    job = running(store, "alive:1")
    record, run = store.claim(job.id, 3, worker="late:2", held_elsewhere=lambda r: True)
    assert not run and record.attempts == 1 and record.worker == "alive:1"


def pool_heartbeat(client, consumer: str, state: str = "ready") -> Heartbeat:
    beat = Heartbeat(client, interval_s=1, ttl_s=30, info=lambda: {"consumer": consumer})
    beat.set(state=state)
    return beat


def watchdog(client, clock, busy=lambda: False) -> ConsumerWatchdog:
    return ConsumerWatchdog(
        client,
        queues=("interactive", "bulk"),
        stall_s=5,
        interval_s=1,
        ttl_s=30,
        is_busy=busy,
        on_stall=lambda reason: None,
        name="host:1",
        clock=clock,
    )


def test_watchdog_trips_when_messages_wait_and_none_is_taken(redis_client):
    clock = Clock()
    dog = watchdog(redis_client, clock)
    pool_heartbeat(redis_client, "host:1")
    assert dog.check() is None  # nothing waits
    redis_client.lpush("bulk", "a message")
    assert dog.check() is None
    clock.now += 4
    assert dog.check() is None
    dog.received()  # a message taken restarts the count
    clock.now += 4
    assert dog.check() is None
    clock.now += 5
    assert "1 messages wait" in dog.check()
    state = json.loads(redis_client.get(consumer_key("host:1")))
    assert state["state"] == "stalled"
    [worker] = live_workers(redis_client)
    assert worker["consuming"] is False  # /readyz and the healthcheck say so


def test_watchdog_waits_while_busy_or_while_the_model_loads(redis_client):
    clock, busy = Clock(), [True]
    dog = watchdog(redis_client, clock, busy=lambda: busy[0])
    beat = pool_heartbeat(redis_client, "host:1", state="loading")
    redis_client.lpush("interactive", "a message")
    for _ in range(3):
        clock.now += 10
        assert dog.check() is None
    busy[0] = False
    clock.now += 10
    assert dog.check() is None  # loading: the consumer waits for the pool, not a stall
    beat.set(state="ready")
    assert dog.check() is None
    [worker] = live_workers(redis_client)
    assert worker["consuming"] is True
    clock.now += 5
    assert dog.check() is not None


def test_watchdog_trips_when_the_broker_stays_unreachable(redis_server):
    from jobs.redis_server import free_port

    clock = Clock()
    dog = watchdog(redis_client(f"redis://127.0.0.1:{free_port()}/0"), clock)
    assert dog.check() is None
    clock.now += 5
    assert "unreachable" in dog.check()


def test_retry_call_retries_then_gives_up_and_redis_client_rides_a_restart(redis_server):
    calls, slept = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("storage away")
        return "ok"

    assert retry_call(flaky, budget_s=10, retry_on=(OSError,), sleep=slept.append) == "ok"
    assert len(calls) == 3 and len(slept) == 2
    with pytest.raises(OSError):
        retry_call(lambda: (_ for _ in ()).throw(OSError("down")), budget_s=1,
                   retry_on=(OSError,), sleep=lambda s: None)  # fmt: skip
    assert sum(backoff_delays(60, base_s=0.5, cap_s=10)) >= 60
    client = redis_client(redis_server.url, retry_s=20)
    client.set("k", "v")
    redis_server.restart()  # the client's connection is dead; the next command reconnects
    assert client.get("k") == b"v"
