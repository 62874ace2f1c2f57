"""The job record in Redis: the source of truth for a job's state.

One hash per job plus sorted-set indexes. ``JobStore.transition`` is the only writer of
``status``: it checks the move is legal and writes status, timestamps and every index in one
MULTI/EXEC, retried under WATCH if another writer raced it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import redis

from jobs.errors import ErrorCode, job_error
from jobs.keys import PREFIX, Keys

ANONYMOUS = "-"
IDEMPOTENCY_TTL_S = 24 * 3600
CAMERA_FIELD = "camera"  # in a job's objects hash, beside the numbered objects


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})
# running -> running: a redelivered job claimed again after its worker died.
# running -> queued: the reaper sent again a job whose worker is gone (jobs/reaper.py).
LEGAL = {
    JobStatus.QUEUED: {JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.FAILED},
    JobStatus.RUNNING: {
        JobStatus.QUEUED,
        JobStatus.RUNNING,
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.CANCELED,
    },
}


class IllegalTransition(Exception):
    """A status change the state machine does not allow (e.g. out of a terminal state)."""


class JobNotFound(KeyError):
    """No record with that id."""


@dataclass
class JobRecord:
    """Everything known about one job. Times are unix seconds (float) or None."""

    id: str
    owner: str = ANONYMOUS
    status: JobStatus = JobStatus.QUEUED
    stage: str = "queued"
    queue: str = "interactive"
    backend: str = "inflate"
    options: dict[str, Any] = field(default_factory=dict)
    objects_total: int = 0
    objects_done: int = 0
    attempts: int = 0
    seq: int = 0
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested: bool = False
    error: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    batch_id: str = ""
    # The heartbeat name of the worker process running it (set by ``claim``).
    worker: str = ""
    # {"url", "state": pending|retrying|delivered|failed, "attempts": [...]} or None
    webhook: dict[str, Any] | None = None

    _JSON = ("options", "error", "result", "extra", "webhook")
    _INT = ("objects_total", "objects_done", "attempts", "seq")
    _FLOAT = ("created_at", "started_at", "finished_at")

    def to_hash(self) -> dict[str, str]:
        out = {}
        for key, value in asdict(self).items():
            if key in self._JSON:
                out[key] = json.dumps(value)
            elif value is None:
                out[key] = ""
            elif isinstance(value, bool):
                out[key] = "1" if value else "0"
            else:
                out[key] = str(value)
        return out

    @classmethod
    def from_hash(cls, raw: dict[bytes | str, bytes | str]) -> JobRecord:
        data = {_s(k): _s(v) for k, v in raw.items()}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in cls._JSON:
                kwargs[key] = json.loads(value)
            elif key in cls._INT:
                kwargs[key] = int(value)
            elif key in cls._FLOAT:
                kwargs[key] = float(value) if value else None
            elif key == "cancel_requested":
                kwargs[key] = value == "1"
            elif key == "status":
                kwargs[key] = JobStatus(value)
            elif key in cls.__dataclass_fields__:
                kwargs[key] = value
        return cls(**kwargs)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def new_job_id() -> str:
    """Random, URL-safe, sortable enough to eyeball: 'job_' + 26 hex chars."""
    return "job_" + uuid.uuid4().hex[:26]


def too_many_attempts(attempts: int) -> dict[str, Any]:
    """The error of a job whose workers kept dying (a poison job), or kept being lost."""
    return job_error(
        ErrorCode.TOO_MANY_ATTEMPTS,
        f"the job was started {attempts} times and never finished; "
        "its workers died (out of memory or a crash) or were lost",
    )


def owner_of(api_key: str | None) -> str:
    """A stable, non-secret owner id for an API key (the key itself is never stored)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16] if api_key else ANONYMOUS


class JobStore:
    """Job records, their indexes and the queue-position bookkeeping, in one Redis."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = PREFIX,
        on_terminal: Callable[[JobRecord], None] | None = None,
    ) -> None:
        self.r = client
        self.p = prefix
        self.keys = Keys(prefix)
        # Called once per job, after the move into a terminal state is committed.
        self.on_terminal = on_terminal

    # keys (the layout is jobs/keys.py)
    def _job(self, job_id: str) -> str:
        return self.keys.job(job_id)

    def _by_owner(self, owner: str, status: JobStatus | None = None) -> str:
        return self.keys.by_owner(owner, status.value if status else None)

    def _by_status(self, status: JobStatus) -> str:
        return self.keys.by_status(status.value)

    def _finished(self) -> str:
        return self.keys.finished()

    def _finishing(self) -> str:
        return self.keys.finishing()

    def _objects(self, job_id: str) -> str:
        return self.keys.objects(job_id)

    def _queued(self, queue: str) -> str:
        return self.keys.queued(queue)

    def _idempotency(self, owner: str, key: str) -> str:
        return self.keys.idempotency(owner, key)

    # creation
    def reserve_idempotency_key(
        self, owner: str, key: str, job_id: str, fingerprint: str = ""
    ) -> str | None:
        """Claim ``key`` for ``job_id`` (and the request ``fingerprint``); returns the job id
        that already holds it, if any."""
        name = self._idempotency(owner, key)
        value = f"{job_id}|{fingerprint}" if fingerprint else job_id
        if self.r.set(name, value, nx=True, ex=IDEMPOTENCY_TTL_S):
            return None
        existing = self.idempotency_entry(owner, key)
        return existing[0] if existing else None

    def idempotency_entry(self, owner: str, key: str) -> tuple[str, str] | None:
        """(job id, request fingerprint or "") an idempotency key stands for, if any."""
        value = self.r.get(self._idempotency(owner, key))
        if value is None:
            return None
        job_id, _, fingerprint = _s(value).partition("|")
        return job_id, fingerprint

    def idempotent_job(self, owner: str, key: str) -> str | None:
        """The job id an idempotency key already stands for, if any."""
        entry = self.idempotency_entry(owner, key)
        return entry[0] if entry else None

    def release_idempotency_key(self, owner: str, key: str, job_id: str) -> None:
        """Free a key whose job could not be created (only if it still points at that job)."""
        name = self._idempotency(owner, key)
        with self.r.pipeline() as pipe:
            try:
                pipe.watch(name)
                if _s(pipe.get(name) or b"").partition("|")[0] == job_id:
                    pipe.multi()
                    pipe.delete(name)
                    pipe.execute()
            except redis.WatchError:
                pass

    def create(self, record: JobRecord) -> JobRecord:
        """Store a new queued record and index it."""
        record.seq = int(self.r.incr(self.keys.seq()))
        record.created_at = record.created_at or time.time()
        record.status = JobStatus.QUEUED
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(self._job(record.id), mapping=record.to_hash())
            pipe.zadd(self._by_owner(record.owner), {record.id: record.seq})
            pipe.zadd(self._by_owner(record.owner, JobStatus.QUEUED), {record.id: record.seq})
            pipe.zadd(self._by_status(JobStatus.QUEUED), {record.id: record.seq})
            pipe.zadd(self._queued(record.queue), {record.id: record.seq})
            pipe.execute()
        return record

    # reads
    def get(self, job_id: str) -> JobRecord | None:
        raw = self.r.hgetall(self._job(job_id))
        return JobRecord.from_hash(raw) if raw else None

    def require(self, job_id: str) -> JobRecord:
        record = self.get(job_id)
        if record is None:
            raise JobNotFound(job_id)
        return record

    def queue_position(self, record: JobRecord) -> int | None:
        """0 = next to run; None unless queued."""
        if record.status is not JobStatus.QUEUED:
            return None
        rank = self.r.zrank(self._queued(record.queue), record.id)
        return None if rank is None else int(rank)

    def next_queued(self, queues: Iterable[str]) -> str | None:
        """The job a worker taking ``queues`` in this order would most likely run next: the
        oldest queued one of the first queue that has any (a hint; Celery delivers)."""
        for queue in queues:
            first = self.r.zrange(self._queued(queue), 0, 0)
            if first:
                return _s(first[0])
        return None

    def queued_ids(self, queue: str, limit: int) -> list[str]:
        """The oldest ``limit`` queued jobs of ``queue``, oldest first."""
        return [_s(v) for v in self.r.zrange(self._queued(queue), 0, max(0, limit - 1))]

    def list(
        self,
        owner: str,
        *,
        status: JobStatus | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """Newest first; ``cursor`` is the opaque ``next`` of the previous page."""
        top = "+inf" if cursor is None else f"({decode_cursor(cursor)}"
        index = self._by_owner(owner, status)
        ids = self.r.zrevrangebyscore(index, top, "-inf", start=0, num=limit + 1, withscores=True)
        records = []
        with self.r.pipeline(transaction=False) as pipe:
            for job_id, _ in ids[:limit]:
                pipe.hgetall(self._job(_s(job_id)))
            for raw in pipe.execute():
                if raw:
                    records.append(JobRecord.from_hash(raw))
        more = len(ids) > limit
        return records, encode_cursor(int(ids[limit - 1][1])) if more and limit else None

    def statuses(self, job_ids: Iterable[str]) -> list[JobStatus | None]:
        """Each job's status (None for a deleted one), in order."""
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self._job(job_id), "status")
            return [JobStatus(_s(v)) if v is not None else None for v in pipe.execute()]

    def count(self, owner: str, *statuses: JobStatus) -> int:
        """How many of ``owner``'s jobs are in any of ``statuses``."""
        with self.r.pipeline(transaction=False) as pipe:
            for status in statuses:
                pipe.zcard(self._by_owner(owner, status))
            return sum(int(n) for n in pipe.execute())

    def counts_by_status(self) -> dict[str, int]:
        with self.r.pipeline(transaction=False) as pipe:
            for status in JobStatus:
                pipe.zcard(self._by_status(status))
            return dict(zip([s.value for s in JobStatus], map(int, pipe.execute()), strict=True))

    def queued_counts(self, queues: Iterable[str]) -> dict[str, int]:
        queues = list(queues)
        with self.r.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.zcard(self._queued(queue))
            return dict(zip(queues, map(int, pipe.execute()), strict=True))

    def cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(self._job(job_id), "cancel_requested") in (b"1", "1")

    def cancels_requested(self, job_ids: Iterable[str]) -> list[bool]:
        """``cancel_requested`` of each job, in order, in one round trip."""
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self._job(job_id), "cancel_requested")
            return [v in (b"1", "1") for v in pipe.execute()]

    # writes
    def transition(
        self,
        job_id: str,
        to: JobStatus,
        *,
        expect: Iterable[JobStatus] | None = None,
        expect_run: tuple[str, int] | None = None,
        **fields,
    ) -> JobRecord:
        """Move a job to ``to`` (the one place status changes), writing ``fields`` with it.

        Raises ``JobNotFound``, or ``IllegalTransition`` when the state machine (or ``expect``,
        the statuses the caller believes the job is in, or ``expect_run``, the (worker,
        attempts) of the run the caller believes holds it) forbids the move.
        """
        key = self._job(job_id)
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hgetall(key)
                    if not raw:
                        raise JobNotFound(job_id)
                    record = JobRecord.from_hash(raw)
                    current = record.status
                    if to not in LEGAL.get(current, set()) or (
                        expect is not None and current not in set(expect)
                    ):
                        raise IllegalTransition(f"{job_id}: {current.value} -> {to.value}")
                    if expect_run is not None and (record.worker, record.attempts) != expect_run:
                        raise IllegalTransition(
                            f"{job_id}: run {record.worker}#{record.attempts} holds it, "
                            f"not {expect_run[0]}#{expect_run[1]}"
                        )
                    now = time.time()
                    for name, value in fields.items():
                        setattr(record, name, value)
                    record.status = to
                    if to is JobStatus.RUNNING and record.started_at is None:
                        record.started_at = now
                    if to.is_terminal:
                        record.finished_at = now
                        record.stage = to.value
                    pipe.multi()
                    pipe.hset(key, mapping=record.to_hash())
                    if current is not to:
                        pipe.zrem(self._by_owner(record.owner, current), job_id)
                        pipe.zrem(self._by_status(current), job_id)
                        pipe.zadd(self._by_owner(record.owner, to), {job_id: record.seq})
                        pipe.zadd(self._by_status(to), {job_id: record.seq})
                    if to is JobStatus.QUEUED:  # back in line (a reaped job)
                        pipe.zadd(self._queued(record.queue), {job_id: record.seq})
                    else:
                        pipe.zrem(self._queued(record.queue), job_id)
                    if to.is_terminal:  # retention counts from here
                        pipe.zadd(self._finished(), {job_id: now})
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        if to.is_terminal and self.on_terminal is not None:
            self.on_terminal(record)
        return record

    def claim(
        self,
        job_id: str,
        max_attempts: int,
        *,
        worker: str = "",
        held_elsewhere: Callable[[JobRecord], bool] | None = None,
    ) -> tuple[JobRecord | None, bool]:
        """A worker takes the job: (record, run_it). Terminal jobs are not run again, nor a
        running one that a live worker still holds (``held_elsewhere``: a stale message); a
        job whose attempts are used up (a poison job that keeps killing workers) ends failed.

        The record can change between reading it and taking it: the reaper sends a dead
        run's job again *before* putting it back in line, so its message can find the job
        still running under the dead run and see it queued a moment later. Then the claim
        looks again instead of dropping the message, which may be the job's only one."""
        for _ in range(CLAIM_TRIES - 1):
            try:
                return self._claim_once(job_id, max_attempts, worker, held_elsewhere)
            except IllegalTransition:
                continue  # changed under us (another run, the reaper): look again
        return self._claim_once(job_id, max_attempts, worker, held_elsewhere)

    def _claim_once(
        self,
        job_id: str,
        max_attempts: int,
        worker: str,
        held_elsewhere: Callable[[JobRecord], bool] | None,
    ) -> tuple[JobRecord | None, bool]:
        record = self.get(job_id)
        if record is None or record.status.is_terminal:
            return record, False
        if record.status is JobStatus.RUNNING and held_elsewhere and held_elsewhere(record):
            return record, False
        if record.attempts >= max_attempts:
            error = too_many_attempts(record.attempts)
            return self.transition(job_id, JobStatus.FAILED, error=error), False
        if record.cancel_requested:
            return self.transition(job_id, JobStatus.CANCELED), False
        record = self.transition(
            job_id,
            JobStatus.RUNNING,
            expect_run=(record.worker, record.attempts),
            attempts=record.attempts + 1,
            stage="starting",
            worker=worker,
        )
        return record, True

    def claim_queued(self, job_id: str, max_attempts: int, *, worker: str) -> JobRecord | None:
        """A worker takes a job *still queued* into a batch it runs (``worker/batching.py``):
        the record, or None where the job is not queued, is canceled, has used its attempts,
        or another run took it first. Only queued jobs: a running one is never taken from
        another run; the job's own message, delivered later, finds it taken and is dropped."""
        record = self.get(job_id)
        if (
            record is None
            or record.status is not JobStatus.QUEUED
            or record.cancel_requested
            or record.attempts >= max_attempts
        ):
            return None
        try:
            return self.transition(
                job_id,
                JobStatus.RUNNING,
                expect=[JobStatus.QUEUED],
                expect_run=(record.worker, record.attempts),
                attempts=record.attempts + 1,
                stage="starting",
                worker=worker,
            )
        except (IllegalTransition, JobNotFound):
            return None

    def update(self, job_id: str, **fields) -> None:
        """Write progress fields (never ``status``) of a job that still exists."""
        if "status" in fields:
            raise ValueError("status changes go through transition()")
        record = JobRecord(id=job_id, **fields)
        mapping = {k: v for k, v in record.to_hash().items() if k in fields}
        key = self._job(job_id)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.exists(key)
            pipe.hset(key, mapping=mapping)
            exists, _ = pipe.execute()
        if not exists:  # deleted meanwhile: do not resurrect a partial hash
            self.r.delete(key)

    # objects, stored one by one as each finishes
    def object_done(self, job_id: str, entry: dict[str, Any]) -> int:
        """Record one finished object (its files are stored); returns how many are done.
        A deleted job stays deleted: nothing is written for it."""
        key, objects = self._job(job_id), self._objects(job_id)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.exists(key)
            pipe.hset(objects, str(int(entry["index"])), json.dumps(entry))
            pipe.hlen(objects)
            exists, _, count = pipe.execute()
        if not exists:
            self.r.delete(objects)
            return 0
        done = int(count) - int(self.r.hexists(objects, CAMERA_FIELD))
        self.update(job_id, objects_done=done)
        return done

    def objects(self, job_id: str) -> dict[int, dict[str, Any]]:
        """Every finished object's entry (files, metadata, timings) by index."""
        raw = self.r.hgetall(self._objects(job_id))
        return {int(_s(k)): json.loads(v) for k, v in raw.items() if _s(k).isdigit()}

    def set_camera(self, job_id: str, camera: dict[str, Any] | None) -> None:
        """The camera a job's objects are posed against, kept beside them for a resumed run."""
        if camera is not None:
            self.r.hset(self._objects(job_id), CAMERA_FIELD, json.dumps(camera))

    def camera(self, job_id: str) -> dict[str, Any] | None:
        value = self.r.hget(self._objects(job_id), CAMERA_FIELD)
        return None if value is None else json.loads(value)

    def request_cancel(self, job_id: str) -> JobRecord:
        """Queued: canceled now. Running: flagged; the worker stops between objects."""
        while True:
            record = self.require(job_id)
            if record.status is JobStatus.QUEUED:
                try:
                    return self.transition(job_id, JobStatus.CANCELED, expect=[JobStatus.QUEUED])
                except IllegalTransition:
                    continue  # a worker claimed it meanwhile; flag it instead
            if record.status is JobStatus.RUNNING:
                self.r.hset(self._job(job_id), "cancel_requested", "1")
                record.cancel_requested = True
            return record

    def delete(self, job_id: str) -> None:
        record = self.get(job_id)
        if record is None:
            return
        with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(self._job(job_id), self._objects(job_id))
            pipe.zrem(self._by_owner(record.owner), job_id)
            for status in JobStatus:
                pipe.zrem(self._by_owner(record.owner, status), job_id)
                pipe.zrem(self._by_status(status), job_id)
            pipe.zrem(self._queued(record.queue), job_id)
            pipe.zrem(self._finished(), job_id)
            pipe.hdel(self._finishing(), job_id)
            pipe.execute()

    # jobs whose model work is done and whose files are being written (after their task ended)
    def mark_finishing(self, job_id: str, worker: str) -> None:
        self.r.hset(self._finishing(), job_id, worker)

    def unmark_finishing(self, job_id: str) -> None:
        self.r.hdel(self._finishing(), job_id)

    def running_ids(self, limit: int = 1000) -> list[str]:
        """Ids of running jobs (the reaper checks each one's worker)."""
        return [_s(i) for i in self.r.zrange(self._by_status(JobStatus.RUNNING), 0, limit - 1)]

    def orphaned_finishing(self, live_workers: set[str]) -> list[str]:
        """Jobs being finished by a worker that is gone, each claimed by exactly one caller
        (the one whose HDEL removed it)."""
        claimed = []
        for job_id, worker in self.r.hgetall(self._finishing()).items():
            if _s(worker) not in live_workers and self.r.hdel(self._finishing(), job_id):
                claimed.append(_s(job_id))
        return claimed

    def finished_before(self, cutoff: float, limit: int = 100) -> list[str]:
        """Ids of jobs that ended before ``cutoff`` (unix seconds), oldest first."""
        ids = self.r.zrangebyscore(self._finished(), "-inf", cutoff, start=0, num=limit)
        return [_s(i) for i in ids]

    def claim_expired(self, job_id: str) -> bool:
        """True for exactly one caller: that one deletes the job."""
        return bool(self.r.zrem(self._finished(), job_id))

    # metrics
    def observe_stage(self, stage: str, seconds: float) -> None:
        """Add one duration to the stage's histogram (Prometheus buckets, cumulative)."""
        key = self.keys.metrics_stage(stage)
        with self.r.pipeline(transaction=False) as pipe:
            pipe.sadd(self.keys.metrics_stages(), stage)
            pipe.hincrby(key, "count", 1)
            pipe.hincrbyfloat(key, "sum", seconds)
            for bound in STAGE_BUCKETS:
                if seconds <= bound:
                    pipe.hincrby(key, f"le:{bound}", 1)
            pipe.execute()

    def stage_histograms(self) -> dict[str, dict[str, float]]:
        """{stage: {"count", "sum", "le:<bound>"...}} as observed by every worker."""
        stages = sorted(_s(s) for s in self.r.smembers(self.keys.metrics_stages()))
        with self.r.pipeline(transaction=False) as pipe:
            for stage in stages:
                pipe.hgetall(self.keys.metrics_stage(stage))
            rows = pipe.execute()
        return {
            stage: {_s(k): float(v) for k, v in row.items()}
            for stage, row in zip(stages, rows, strict=True)
        }


CLAIM_TRIES = 3  # JobStore.claim: reads of a record that changed between read and take


STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(str(seq).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The sequence number in a cursor; ValueError when it is not one of ours."""
    padded = cursor + "=" * (-len(cursor) % 4)
    try:
        return int(base64.urlsafe_b64decode(padded.encode()).decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"bad cursor {cursor!r}") from exc
