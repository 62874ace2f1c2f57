"""The reaper: a running job whose worker is gone is sent again (its attempt counted when it
is claimed) or, with its attempts used up, failed.

A worker is gone when its heartbeat expired, or when its heartbeat no longer lists the job
(the job's final write was lost while Redis was away, and the worker went on). Every live
worker's heartbeat thread sweeps; a job must look orphaned for ``grace_s`` to the same
sweeper before it is reaped (a worker's beat may lag its claim by up to one interval), and
each reap is one transition that checks the run it replaces still holds the job, so of many
sweepers exactly one reaps it. A job is reaped within the heartbeat TTL plus two intervals.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from jobs.records import (
    IllegalTransition,
    JobNotFound,
    JobRecord,
    JobStatus,
    JobStore,
    too_many_attempts,
)

log = logging.getLogger("sam3d.worker")


def holds(heartbeat: Mapping[str, Any] | None, job_id: str) -> bool:
    """Whether a live worker's heartbeat says it holds ``job_id``."""
    if heartbeat is None:
        return False
    if "jobs" not in heartbeat:  # a worker of an older release: trust it while it lives
        return True
    return job_id in (heartbeat.get("jobs") or ())


def send_back(
    store: JobStore, record: JobRecord, requeue: Callable[[JobRecord], None] | None, **fields
) -> JobRecord:
    """A running job back in line, while the run ``record`` names still holds it (``fields``
    written with it). The message first: one that finds the job still running under that
    run claims it as a redelivery; a record queued without a message would wait forever."""
    if requeue is not None:
        requeue(record)
    return store.transition(
        record.id,
        JobStatus.QUEUED,
        expect=[JobStatus.RUNNING],
        expect_run=(record.worker, record.attempts),
        stage="queued",
        worker="",
        **fields,
    )


class Reaper:
    """Finds running jobs no live worker holds and requeues or fails each one once."""

    def __init__(
        self,
        store: JobStore,
        *,
        max_attempts: int,
        grace_s: float,
        requeue: Callable[[JobRecord], None] | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.max_attempts = max_attempts
        self.grace_s = grace_s
        self.requeue = requeue
        self.clock = clock
        # job id -> ((worker, attempts), first seen orphaned)
        self._suspects: dict[str, tuple[tuple[str, int], float]] = {}

    def sweep(self, live: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """One pass over the running jobs; ``live`` maps worker names to their heartbeats.
        Returns the ids of the jobs this pass reaped."""
        now = self.clock()
        suspects: dict[str, tuple[tuple[str, int], float]] = {}
        reaped = []
        for job_id in self.store.running_ids():
            record = self.store.get(job_id)
            if record is None or record.status is not JobStatus.RUNNING:
                continue
            if holds(live.get(record.worker), job_id):
                continue
            run = (record.worker, record.attempts)
            seen = self._suspects.get(job_id)
            if seen is None or seen[0] != run:
                seen = (run, now)
            if now - seen[1] < self.grace_s:
                suspects[job_id] = seen
            elif self._reap(record):
                reaped.append(job_id)
        self._suspects = suspects
        return reaped

    def _reap(self, record: JobRecord) -> bool:
        run = (record.worker, record.attempts)
        who = record.worker or "no worker"
        try:
            if record.attempts >= self.max_attempts:
                log.warning("job %s: its worker (%s) is gone; attempts used up", record.id, who)
                self.store.transition(
                    record.id,
                    JobStatus.FAILED,
                    expect=[JobStatus.RUNNING],
                    expect_run=run,
                    error=too_many_attempts(record.attempts),
                )
            else:
                log.warning("job %s: its worker (%s) is gone; sending it again", record.id, who)
                send_back(self.store, record, self.requeue)
        except (IllegalTransition, JobNotFound):
            return False  # another sweeper, a claim or the worker itself got there first
        self.store.unmark_finishing(record.id)
        return True
