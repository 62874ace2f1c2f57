"""Which queued jobs a worker takes into its batch (worker/batching.py ``gather``), against a
real redis-server: priorities, the options key, the bounds, and jobs another run holds."""

from __future__ import annotations

import json
import types

import pytest

from jobs.records import JobRecord, JobStatus, JobStore, new_job_id
from jobs.settings import Settings
from worker.batching import gather


class KeyedBackend:
    """Only what gather reads of a backend: its options key and its capacity."""

    def batch_key(self, options):
        return json.dumps({"fast": bool(options.get("fast"))})

    def batch_capacity(self):
        return 6


@pytest.fixture
def store(redis_client) -> JobStore:
    return JobStore(redis_client)


def runner(store, **settings):
    base = {"batch_jobs": 4, "batch_wait_s": 0.0, "job_time_limit_s": 900}
    return types.SimpleNamespace(
        settings=Settings(**{**base, **settings}),
        store=store,
        backend=KeyedBackend(),
        queues=("interactive", "bulk"),
        held={},
        heartbeat=None,
        name="worker-a",
    )


def job(store, queue="interactive", objects=1, **options) -> JobRecord:
    record = JobRecord(
        id=new_job_id(), queue=queue, backend="sam3d", options=options, objects_total=objects
    )
    return store.create(record)


def lead_of(store, record) -> JobRecord:
    return store.transition(record.id, JobStatus.RUNNING, attempts=1, worker="worker-a")


def test_an_interactive_job_takes_interactive_companions_only(store):
    lead = lead_of(store, job(store))
    bulk = [job(store, "bulk") for _ in range(2)]
    urgent = job(store)
    r = runner(store)
    taken = gather(r, lead)
    assert [t.id for t in taken] == [urgent.id]
    assert all(store.get(b.id).status is JobStatus.QUEUED for b in bulk)
    got = store.get(urgent.id)
    assert got.status is JobStatus.RUNNING and got.worker == "worker-a" and got.attempts == 1
    assert r.held == {urgent.id: 1}  # listed in the heartbeat's jobs


def test_a_bulk_job_takes_waiting_interactive_jobs_first_up_to_the_bound(store):
    lead = lead_of(store, job(store, "bulk"))
    bulk = [job(store, "bulk") for _ in range(3)]
    urgent = job(store)
    taken = gather(runner(store, batch_jobs=3), lead)
    assert [t.id for t in taken] == [urgent.id, bulk[0].id]  # 3 jobs in all, oldest first
    assert store.queue_position(store.get(bulk[1].id)) == 0


def test_other_options_and_the_object_bounds_keep_jobs_out(store):
    lead = lead_of(store, job(store, objects=2, fast=True))
    default = job(store)  # another mode: another key
    big = job(store, objects=5, fast=True)  # 2 + 5 > the backend's capacity of 6
    small = job(store, objects=3, fast=True)
    taken = gather(runner(store), lead)
    assert [t.id for t in taken] == [small.id]
    assert store.get(default.id).status is store.get(big.id).status is JobStatus.QUEUED
    # The lead's soft time limit bounds the objects too: 60 s each within about 150 s.
    lead2 = lead_of(store, job(store, fast=True))
    others = [job(store, fast=True) for _ in range(3)]
    taken = gather(runner(store, job_time_limit_s=100), lead2)  # hard 160, soft 150: 2 objects
    assert [t.id for t in taken] == [others[0].id]


def test_a_job_another_run_took_or_a_canceled_one_is_not_taken(store):
    lead = lead_of(store, job(store))
    elsewhere = job(store)
    store.transition(elsewhere.id, JobStatus.RUNNING, attempts=1, worker="worker-b")
    canceled = job(store)
    store.request_cancel(canceled.id)
    free = job(store)
    r = runner(store)
    taken = gather(r, lead)
    assert [t.id for t in taken] == [free.id]
    assert store.get(elsewhere.id).worker == "worker-b"
    assert set(r.held) == {free.id}
