"""The job record and its state machine, against a real redis-server."""

from __future__ import annotations

import threading

import pytest

from jobs.records import (
    IllegalTransition,
    JobNotFound,
    JobRecord,
    JobStatus,
    JobStore,
    decode_cursor,
    new_job_id,
    owner_of,
)


@pytest.fixture
def store(redis_client) -> JobStore:
    return JobStore(redis_client)


def make(store: JobStore, owner: str = "-", queue: str = "interactive") -> JobRecord:
    return store.create(JobRecord(id=new_job_id(), owner=owner, queue=queue, objects_total=2))


def test_record_round_trips_through_redis(store):
    rec = make(store)
    rec2 = store.transition(rec.id, JobStatus.RUNNING, stage="generating", objects_done=1)
    got = store.get(rec.id)
    assert got == rec2
    assert got.status is JobStatus.RUNNING and got.started_at is not None
    assert got.objects_done == 1 and got.options == {} and got.error is None


def test_legal_path_and_terminal_states_are_final(store):
    rec = make(store)
    store.transition(rec.id, JobStatus.RUNNING)
    done = store.transition(rec.id, JobStatus.SUCCEEDED, result={"time": 1.0})
    assert done.finished_at >= done.started_at >= done.created_at
    for to in JobStatus:
        with pytest.raises(IllegalTransition):
            store.transition(rec.id, to)
    assert store.get(rec.id).status is JobStatus.SUCCEEDED


def test_queued_cannot_jump_to_succeeded(store):
    rec = make(store)
    with pytest.raises(IllegalTransition):
        store.transition(rec.id, JobStatus.SUCCEEDED)


def test_missing_job(store):
    with pytest.raises(JobNotFound):
        store.transition("job_nope", JobStatus.RUNNING)
    assert store.get("job_nope") is None


def test_indexes_follow_status(store):
    a, b = make(store), make(store)
    assert store.counts_by_status()["queued"] == 2
    assert store.queue_position(store.get(a.id)) == 0
    assert store.queue_position(store.get(b.id)) == 1
    store.transition(a.id, JobStatus.RUNNING)
    assert store.queue_position(store.get(b.id)) == 0
    assert store.queue_position(store.get(a.id)) is None
    counts = store.counts_by_status()
    assert (counts["queued"], counts["running"]) == (1, 1)
    assert [r.id for r in store.list("-", status=JobStatus.RUNNING)[0]] == [a.id]
    store.delete(a.id)
    assert store.counts_by_status()["running"] == 0
    assert [r.id for r in store.list("-")[0]] == [b.id]


def test_list_is_newest_first_with_cursor_pages(store):
    ids = [make(store).id for _ in range(7)]
    seen, cursor = [], None
    while True:
        page, cursor = store.list("-", limit=3, cursor=cursor)
        seen += [r.id for r in page]
        if cursor is None:
            break
    assert seen == ids[::-1]
    with pytest.raises(ValueError):
        decode_cursor("!!not-a-cursor")


def test_owners_are_isolated(store):
    mine = make(store, owner=owner_of("key-a"))
    make(store, owner=owner_of("key-b"))
    assert [r.id for r in store.list(owner_of("key-a"))[0]] == [mine.id]
    assert owner_of("key-a") != owner_of("key-b") != "-"


def test_cancel_queued_is_immediate_running_is_flagged(store):
    queued, running = make(store), make(store)
    store.transition(running.id, JobStatus.RUNNING)
    assert store.request_cancel(queued.id).status is JobStatus.CANCELED
    flagged = store.request_cancel(running.id)
    assert flagged.status is JobStatus.RUNNING and store.cancel_requested(running.id)
    # A flagged job that a worker claims again (redelivery) ends canceled instead of running.
    record, run = store.claim(running.id, max_attempts=3)
    assert not run and record.status is JobStatus.CANCELED


def test_claim_counts_attempts_and_fails_poison_jobs(store):
    rec = make(store)
    for attempt in (1, 2, 3):
        record, run = store.claim(rec.id, max_attempts=3)
        assert run and record.attempts == attempt and record.status is JobStatus.RUNNING
    record, run = store.claim(rec.id, max_attempts=3)
    assert not run and record.status is JobStatus.FAILED
    assert record.error["code"] == "too_many_attempts" and record.error["retryable"] is False
    record, run = store.claim(rec.id, max_attempts=3)  # redelivered after failing: skipped
    assert not run and record.status is JobStatus.FAILED


def test_a_redelivery_racing_the_reaper_still_claims_the_job(store):
    """The reaper sends a dead run's job again, then puts it back in line. A worker that reads
    the record between the two (still running under the dead run) must not drop the message:
    it is the job's only one, and a queued job without a message waits forever."""
    rec = make(store)
    dead, _ = store.claim(rec.id, max_attempts=3, worker="dead")
    seen = []

    def reaper_lands_now(record):  # runs between the claim's read and its take
        seen.append((record.status, record.worker))
        if len(seen) == 1:
            store.transition(
                rec.id,
                JobStatus.QUEUED,
                expect=[JobStatus.RUNNING],
                expect_run=("dead", dead.attempts),
                stage="queued",
                worker="",
            )
        return False  # the dead worker holds nothing

    record, run = store.claim(rec.id, 3, worker="alive", held_elsewhere=reaper_lands_now)
    assert seen == [(JobStatus.RUNNING, "dead")]  # the second read found it queued
    assert run and record.status is JobStatus.RUNNING
    assert (record.worker, record.attempts) == ("alive", 2)


def test_idempotency_key_maps_to_one_job(store):
    assert store.reserve_idempotency_key("-", "k1", "job_a") is None
    assert store.reserve_idempotency_key("-", "k1", "job_b") == "job_a"
    assert store.reserve_idempotency_key("other", "k1", "job_c") is None  # per owner
    store.release_idempotency_key("-", "k1", "job_a")
    assert store.reserve_idempotency_key("-", "k1", "job_d") is None


def test_concurrent_transitions_have_one_winner(store):
    rec = make(store)
    store.transition(rec.id, JobStatus.RUNNING)
    outcomes = []

    def finish(to):
        try:
            store.transition(rec.id, to)
            outcomes.append(to)
        except IllegalTransition:
            outcomes.append(None)

    threads = [
        threading.Thread(target=finish, args=(s,))
        for s in [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED] * 4
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o is not None]
    assert len(winners) == 1
    assert store.get(rec.id).status is winners[0]
    assert sum(store.counts_by_status().values()) == 1


def test_update_never_resurrects_a_deleted_job(store):
    rec = make(store)
    store.delete(rec.id)
    store.update(rec.id, objects_done=1)
    assert store.get(rec.id) is None
    with pytest.raises(ValueError):
        store.update(rec.id, status="running")
