"""Batching across jobs: a worker starting a job takes queued jobs with the same generation
options along (*companions*) and runs all their objects through shared batched passes
(``generate_batch`` of the backend: objects of different images in one pass).

Every job keeps its own record and guarantees:

- **Taken only while queued.** A companion is listed in this process's heartbeat *before* it
  is taken (``JobStore.claim_queued``: queued -> running under this worker, an attempt
  counted), so another worker that receives the job's own message finds it running under a
  live worker and drops the message; a job already running elsewhere is never taken. If this
  worker dies mid-batch, every job of the batch is running under a dead worker: the reaper
  sends each again, as for any job (at-least-once delivery, one terminal state each).
- **Priorities.** Companions come from the worker's queues in priority order; a job of a
  higher-priority queue (``interactive``) takes companions only from its own queue, so it is
  never slowed by ``bulk`` rows; a ``bulk`` job takes waiting ``interactive`` jobs first.
- **Bounds.** ``batch_jobs`` jobs, ``batch_max_objects`` objects (0: what the backend's memory
  holds), and no more objects than the lead job's soft time limit covers at the backend's
  per-object budget (the batch runs inside the lead's Celery task). ``batch_wait_s``: how long
  the lead waits for company when the queue holds less.
- **Alone where it matters.** Each job has its own deadline (its soft time limit from its
  start) and cancel: ``leaving()`` tells the backend which jobs' rows must leave at its next
  step, and the job ends at once (on the finisher thread) keeping what it stored. A job whose
  objects are all generated is handed to the finisher at once, not after the batch. A failure
  of the shared passes (an out-of-memory, an input only the model finds bad) cannot be pinned
  on one job: the batch's unfinished jobs then run one by one, each resuming from what it
  stored, so the job at fault fails alone.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import redis
from celery.exceptions import SoftTimeLimitExceeded

from jobs.budgets import object_time_budget_s, time_limits
from jobs.logs import job_logs
from jobs.reaper import send_back
from jobs.records import IllegalTransition, JobNotFound, JobRecord
from worker.backends.base import BatchItem
from worker.gpu import call_guarding_oom
from worker.pipeline import Canceled, MaskSubset, object_stats

if TYPE_CHECKING:
    from worker.tasks import JobRunner, PreparedJob

log = logging.getLogger("sam3d.worker")

POLL_S = 0.01  # how often the gather window looks at the queues again


def can_batch(runner: JobRunner) -> bool:
    backend = runner.backend
    return (
        runner.settings.batch_jobs > 1
        and hasattr(backend, "generate_batch")
        and hasattr(backend, "batch_key")
    )


def gather(runner: JobRunner, lead: JobRecord) -> list[JobRecord]:
    """Queued jobs taken (running under this worker) to share ``lead``'s batch."""
    settings, backend = runner.settings, runner.backend
    key = backend.batch_key(lead.options)
    if key is None:
        return []
    queues = list(runner.queues)
    if lead.queue in queues:  # this priority and above, highest first
        queues = queues[: queues.index(lead.queue) + 1]
    budget = object_time_budget_s(settings, lead.backend)
    soft = time_limits(settings, lead.backend, lead.objects_total)[0]
    capacity = settings.batch_max_objects or _capacity(backend)
    max_objects = max(1, min(capacity, int(soft // budget)))
    taken: list[JobRecord] = []
    try:
        return _gather(runner, lead, key, queues, max_objects, taken)
    except redis.RedisError as exc:  # those taken so far are this batch's; the rest wait
        log.warning("gathering a batch for job %s stopped: %s", lead.id, exc)
        return taken


def _gather(runner, lead, key, queues, max_objects, taken: list[JobRecord]) -> list[JobRecord]:
    settings, store, backend = runner.settings, runner.store, runner.backend
    objects = max(1, lead.objects_total)
    looked: set[str] = {lead.id}
    deadline = time.monotonic() + settings.batch_wait_s
    while True:
        candidates = []
        for queue in queues:
            for job_id in store.queued_ids(queue, 4 * settings.batch_jobs):
                if 1 + len(taken) + len(candidates) >= settings.batch_jobs:
                    break
                if job_id in looked:
                    continue
                looked.add(job_id)
                record = store.get(job_id)
                if record is None or record.backend != lead.backend:
                    continue
                count = max(1, record.objects_total)
                if objects + count > max_objects or backend.batch_key(record.options) != key:
                    continue
                objects += count
                candidates.append(record)
        taken.extend(_take(runner, candidates))
        # counted from what was taken: a candidate another worker took first holds no room
        objects = max(1, lead.objects_total) + sum(max(1, r.objects_total) for r in taken)
        full = 1 + len(taken) >= settings.batch_jobs or objects >= max_objects
        if full or time.monotonic() >= deadline:
            return taken
        time.sleep(POLL_S)


def _capacity(backend: Any) -> int:
    capacity = getattr(backend, "batch_capacity", None)
    return int(capacity()) if capacity is not None else 1 << 30


def _take(runner: JobRunner, candidates: list[JobRecord]) -> list[JobRecord]:
    """Claim ``candidates`` still queued, listed in the heartbeat before they are taken."""
    if not candidates:
        return []
    for record in candidates:
        runner.held[record.id] = record.attempts + 1
    if runner.heartbeat is not None:
        runner.heartbeat.beat()
    taken: list[JobRecord] = []
    try:
        for record in candidates:
            claimed = runner.store.claim_queued(
                record.id, runner.settings.max_attempts, worker=runner.name
            )
            if claimed is None:
                continue
            runner.held[record.id] = claimed.attempts
            with job_logs(claimed.id):
                log.info("job %s started (attempt %d) in a batch", claimed.id, claimed.attempts)
            taken.append(claimed)
    finally:  # listed but not taken (another run had it, or Redis went away): unlisted
        for job_id in {r.id for r in candidates} - {t.id for t in taken}:
            runner.held.pop(job_id, None)
    return taken


class _Ending:
    """A job leaving the batch (canceled, out of time, its export failed), ended on the
    finisher thread so the batch's GPU work goes on meanwhile."""

    def __init__(self, runner: JobRunner, job: PreparedJob, exc: BaseException) -> None:
        self.runner, self.job, self.exc = runner, job, exc
        self.job_id = job.record.id

    def __call__(self) -> str:
        return self.runner.stop_job(self.job, self.job_id, self.exc)


def run_batch(runner: JobRunner, records: list[JobRecord]) -> str:
    """Run ``records`` (the lead first, then its companions) together; the lead's outcome."""
    outcomes: dict[str, str] = {}
    jobs: dict[str, PreparedJob] = {}
    for record in records:
        with job_logs(record.id):
            try:
                jobs[record.id] = runner.prepare(record)
            except BaseException as exc:  # its own input, bad or unreadable: it alone fails
                outcomes[record.id] = runner.stop_job(None, record.id, exc)
    runner.prefetch_next()  # after every job of the batch took its own prefetched inputs
    if len(jobs) > 1:
        log.info("batch of %d jobs (%d objects): %s", len(jobs),
                 sum(len(j.todo) for j in jobs.values()), ", ".join(jobs))  # fmt: skip
    if jobs:  # a lone job too: its cancel and deadline then act at the next flow step
        outcomes.update(_Batch(runner, jobs).run())
    lead = outcomes[records[0].id]
    # A lead that left is ended by the finisher thread: held until that writes its outcome.
    return "finishing" if lead == "left" else lead


class _Batch:
    def __init__(self, runner: JobRunner, jobs: dict[str, PreparedJob]) -> None:
        self.runner, self.jobs = runner, jobs
        settings = runner.settings
        self.deadlines = {
            job_id: job.t0 + time_limits(settings, job.record.backend, job.record.objects_total)[0]
            for job_id, job in jobs.items()
        }
        self.done = {job_id: 0 for job_id in jobs}
        self.outcomes: dict[str, str] = {}  # jobs that ended (handed over, or left)
        self.last = {job_id: time.perf_counter() for job_id in jobs}

    def live(self) -> list[str]:
        return [job_id for job_id in self.jobs if job_id not in self.outcomes]

    def leave(self, job_id: str, exc: BaseException) -> None:
        """``job_id`` leaves the batch; its end is written on the finisher thread."""
        if job_id in self.outcomes:
            return
        log.info("job %s leaves the batch: %s", job_id, type(exc).__name__)
        self.outcomes[job_id] = "left"
        self.runner.submit_finish(_Ending(self.runner, self.jobs[job_id], exc))

    def leaving(self) -> set[str]:
        """Called by the backend at each step it can stop at: the jobs that must leave."""
        live = self.live()
        if live:
            now = time.perf_counter()
            for job_id, canceled in zip(
                live, self.runner.store.cancels_requested(live), strict=True
            ):
                if canceled:
                    self.leave(job_id, Canceled("canceled inside a batch"))
                elif now > self.deadlines[job_id]:
                    self.leave(job_id, SoftTimeLimitExceeded())
        return {job_id for job_id, outcome in self.outcomes.items() if outcome == "left"}

    def run(self) -> dict[str, str]:
        try:
            call_guarding_oom(self._generate)
        except SoftTimeLimitExceeded as exc:  # the lead's own limit: the task must end now
            lead, *others = self.live() or [None]
            if lead is not None:
                self.outcomes[lead] = self.runner.stop_job(self.jobs[lead], lead, exc)
            for job_id in others:
                self._put_back(job_id)
        except Exception as exc:  # the shared passes failed: whose rows, it cannot tell
            live = self.live()
            if len(live) == 1:
                self.outcomes[live[0]] = self.runner.stop_job(self.jobs[live[0]], live[0], exc)
            elif live:
                log.warning("a batch of %d jobs failed (%s: %s); running them one by one",
                            len(live), type(exc).__name__, exc)  # fmt: skip
                for job_id in live:
                    self.outcomes[job_id] = self._alone(job_id)
        for job_id in self.live():  # the backend gave too few results: a backend fault
            missing = len(self.jobs[job_id].todo) - self.done[job_id]
            error = RuntimeError(f"the batch ended {missing} objects short")
            self.outcomes[job_id] = self.runner.stop_job(self.jobs[job_id], job_id, error)
        return self.outcomes

    def _generate(self) -> None:
        items = [
            BatchItem(
                key=job_id,
                image=job.image,
                masks=MaskSubset(job.masks, job.todo),
                seeds=[int(job.record.options["seed"])] * len(job.todo),
                camera=job.camera,
                depth=job.depth,
            )
            for job_id, job in self.jobs.items()
        ]
        options = next(iter(self.jobs.values())).record.options
        for job_id, job in self.jobs.items():
            if not job.todo:  # resumed with every object stored
                self._hand_over(job_id)
        results = self.runner.backend.generate_batch(items, options=options, leaving=self.leaving)
        del items
        for job_id, pos, result in results:
            if job_id in self.outcomes:  # it left; the backend had this result already
                continue
            with job_logs(job_id):
                self._submit(job_id, pos, result)
            del result
            self.leaving()

    def _submit(self, job_id: str, pos: int, result) -> None:
        job, runner = self.jobs[job_id], self.runner
        now = time.perf_counter()
        try:
            if job.camera is None and result.camera is not None:
                job.camera = result.camera
                runner.store.set_camera(job_id, result.camera.to_dict())
            index = job.todo[pos]
            job.stream.submit(
                index, result, stats=object_stats(job.masks, index), time_s=now - self.last[job_id]
            )
        except Exception as exc:  # its export or its record: it alone fails
            self.leave(job_id, exc)
            return
        self.last[job_id] = time.perf_counter()
        self.done[job_id] += 1
        if self.done[job_id] == len(job.todo):
            self._hand_over(job_id)

    def _hand_over(self, job_id: str) -> None:
        job = self.jobs[job_id]
        try:
            self.outcomes[job_id] = self.runner.hand_over(job)
        except Exception as exc:
            self.outcomes[job_id] = self.runner.stop_job(job, job_id, exc)

    def _alone(self, job_id: str) -> str:
        """A job of a failed batch run again by itself, from what it stored."""
        job = self.jobs[job_id]
        job.stream.close_quietly()
        with job_logs(job_id):
            try:
                return self.runner.restart_alone(job)
            except Exception as exc:
                return self.runner.stop_job(None, job_id, exc)

    def _put_back(self, job_id: str) -> None:
        """A companion back in line, unharmed, when the lead's task must end: sent again
        (resuming from what it stored), its attempt not counted against it."""
        job, runner = self.jobs[job_id], self.runner
        job.stream.close_quietly()
        record = job.record
        try:
            send_back(runner.store, record, runner.requeue, attempts=record.attempts - 1)
            self.outcomes[job_id] = "requeued"
        except (IllegalTransition, JobNotFound) as exc:
            log.warning("job %s: could not put it back in line: %s", job_id, exc)
            self.outcomes[job_id] = "skipped"
        finally:
            runner.held.pop(job_id, None)
            runner.discard(job)
