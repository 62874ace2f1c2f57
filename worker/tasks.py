"""Running one job: the Celery task body, with every outcome written to the job record.

The task's thread does model work only. Each object is exported, stored and recorded (visible
in ``GET /v1/jobs/{id}``) by the export thread while the next one generates. Once the last
object is generated the task hands the rest (the last exports, the scene files, the
manifest, the final status) to the *finisher* thread and returns, so the next job starts on
the GPU at once. A job being finished is listed in ``sam3d:finishing`` with its worker's
name; if that worker dies before the end, any live worker's sweep sends the job again and the
new run resumes from the stored objects (nothing finished is generated twice).

Every job a process holds (the task's and the finisher's) is listed in its heartbeat; a
running job that no live heartbeat lists is the reaper's (``jobs/reaper.py``): sent again, or
failed once its attempts are used up. The outcome is written only while this run still holds
the job (``expect_run``), so a run that lost it to the reaper (Redis away too long) writes
nothing, and a job ends in a terminal state exactly once.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
from celery.exceptions import SoftTimeLimitExceeded

from jobs.artifacts import (
    ARTIFACT_KEYS,
    INPUT_DEPTH,
    INPUT_IMAGE,
    download_name,
    job_key,
)
from jobs.budgets import time_limits
from jobs.depth import DepthInput
from jobs.errors import ErrorCode, Sam3dError, job_error
from jobs.frames import Camera
from jobs.heartbeat import Heartbeat, live_workers, read_heartbeat
from jobs.images import decode_image
from jobs.logs import job_logs
from jobs.queue import QUEUES
from jobs.reaper import Reaper, holds
from jobs.records import IllegalTransition, JobNotFound, JobRecord, JobStatus, JobStore
from jobs.retention import Retention
from jobs.retry import retry_call
from jobs.settings import Settings
from jobs.storage import Storage, StorageError
from worker.backends.base import Backend
from worker.batching import can_batch, gather, run_batch
from worker.gpu import call_guarding_oom
from worker.pipeline import (
    JSON_TYPE,
    Canceled,
    ObjectStream,
    build_manifest,
    restore_paths,
    stream_objects,
)
from worker.prefetch import CachedFiles, InputPrefetcher
from worker.segmenters import Segmenter, get_segmenter
from worker.segmenters.masks import job_masks

log = logging.getLogger("sam3d.worker")


def with_retries(storage_call: Callable[[], Any], what: str, retry_s: float) -> Any:
    """A storage call retried with backoff through an outage of about ``retry_s``."""
    return retry_call(storage_call, budget_s=retry_s, retry_on=(StorageError,), what=what)


class StorageSink:
    """A job's files into storage under ``jobs/{id}/``; each object recorded once stored.
    Every write is retried through a storage outage of about ``retry_s``."""

    def __init__(
        self,
        storage: Storage,
        store: JobStore,
        job_id: str,
        on_object: Callable[[dict[str, Any]], None] | None = None,
        retry_s: float = 0.0,
    ) -> None:
        self.storage, self.store, self.job_id = storage, store, job_id
        self.on_object = on_object
        self.retry_s = retry_s

    def put(self, path: str, data: bytes, content_type: str) -> None:
        key = job_key(self.job_id, path)
        with_retries(
            lambda: self.storage.put(
                key, data, content_type=content_type, filename=download_name(self.job_id, path)
            ),
            f"storing {key}",
            self.retry_s,
        )

    def put_file(self, path: str, file: Path, content_type: str) -> None:
        key = job_key(self.job_id, path)
        with_retries(
            lambda: self.storage.put_file(
                key, file, content_type=content_type, filename=download_name(self.job_id, path)
            ),
            f"storing {key}",
            self.retry_s,
        )

    def get(self, path: str) -> bytes:
        key = job_key(self.job_id, path)
        return with_retries(lambda: self.storage.get(key), f"reading {key}", self.retry_s)

    def object_done(self, entry: dict[str, Any]) -> None:
        self.store.object_done(self.job_id, entry)
        if self.on_object is not None:
            self.on_object(entry)


def release_memory() -> None:
    """Give freed memory back to the system after a job (glibc keeps it otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class PreparedJob:
    """A claimed job with its inputs read, ready for its objects to be generated."""

    record: JobRecord
    spool: Path  # local files for its scene, removed when it ends
    image: np.ndarray | None
    masks: Sequence[np.ndarray]
    depth: DepthInput | None
    camera: Camera | None
    todo: list[int]  # mask indices still to generate (a resumed job has some stored)
    stream: ObjectStream
    t0: float
    loaded: float
    prefetched_s: float | None


class JobRunner:
    """Holds what a worker process keeps resident (backend, clients) and runs jobs."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        store: JobStore,
        storage: Storage,
        heartbeat: Heartbeat | None = None,
        *,
        requeue: Callable[[JobRecord], None] | None = None,
        defer_finish: bool = True,
        sweep_store: JobStore | None = None,
        segmenter: Segmenter | None = None,
        queues: tuple[str, ...] = QUEUES,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self._segmenter = segmenter  # set up by the worker at start; else on first use
        self.store = store
        self.storage = storage
        self.heartbeat = heartbeat
        self.requeue = requeue  # sends a job's task again (orphaned finishes)
        self.defer_finish = defer_finish
        # Sweeps run on the heartbeat thread: through a client that does not wait out an
        # outage, so the beats keep their pace.
        self.sweep_store = sweep_store or store
        self.retention = Retention(self.sweep_store, storage, settings.retention_s)
        self.reaper = Reaper(
            self.sweep_store,
            max_attempts=settings.max_attempts,
            grace_s=settings.heartbeat_interval_s,
            requeue=requeue,
        )
        # job id -> its attempt number, for every job this process holds (listed in the
        # heartbeat); the outcome is written only while the record still names this run.
        self.held: dict[str, int] = {}
        self._finishing: queue.Queue = queue.Queue()
        self._finisher: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        self.queues = queues
        self.prefetcher = (
            InputPrefetcher(
                lambda job_id: StorageSink(storage, store, job_id),  # no retries: a hint
                self._decode_image,
            )
            if settings.prefetch_inputs
            else None
        )

    def segmenter(self) -> Segmenter:
        """The resident segmenter (prompted jobs), set up on first use if not at start."""
        if self._segmenter is None:
            segmenter = get_segmenter(self.settings.segmenter, self.settings)
            segmenter.setup()
            self._segmenter = segmenter
        return self._segmenter

    @property
    def name(self) -> str:
        return self.heartbeat.name if self.heartbeat else "local"

    def run(self, job_id: str) -> str:
        """Run ``job_id`` until its model work is done (or it ends); returns its state,
        'finishing' when the finisher thread completes it, or 'skipped'."""
        with job_logs(job_id):  # every log line of this job carries its id
            return self._claim_and_run(job_id)

    def _claim_and_run(self, job_id: str) -> str:
        try:
            record, run = self.store.claim(
                job_id,
                self.settings.max_attempts,
                worker=self.name,
                held_elsewhere=self._held_elsewhere,
            )
        except (JobNotFound, IllegalTransition) as exc:
            log.warning("job %s not claimed: %s", job_id, exc)
            return "skipped"
        if not run:
            log.info("job %s not run: %s", job_id, record.status.value if record else "deleted")
            return "skipped"
        self.held[job_id] = record.attempts
        log.info("job %s started (attempt %d)", job_id, record.attempts)
        outcome = "failed"
        if self.heartbeat:
            self.heartbeat.set(state="busy", current_job=job_id)
        try:
            if can_batch(self):  # with the queued jobs it can share passes with, if any
                outcome = run_batch(self, [record, *gather(self, record)])
            else:
                outcome = self._run(record)
            return outcome
        finally:
            if outcome != "finishing":  # the finisher holds it until its outcome is written
                self.held.pop(job_id, None)
            if self.heartbeat:
                self.heartbeat.set(state="ready", current_job=None)

    def _held_elsewhere(self, record: JobRecord) -> bool:
        """A stale message for a job that a live worker still runs."""
        if record.worker == self.name:
            return record.id in self.held
        return holds(read_heartbeat(self.store.r, record.worker), record.id)

    def _fail_or_stop(self, job_id: str, exc: BaseException) -> str:
        """The outcome of a job stopped by ``exc``; its stored objects are kept."""
        try:
            done = len(self.store.objects(job_id))
        except redis.RedisError:
            done = 0
        if isinstance(exc, Canceled):
            return self._finish(job_id, JobStatus.CANCELED)
        if isinstance(exc, Sam3dError):
            error: dict[str, Any] = exc.to_dict()
        elif isinstance(exc, SoftTimeLimitExceeded):
            soft, hard = self._limits(job_id)
            error = job_error(
                ErrorCode.TIMEOUT,
                f"the job ran past its time limit ({soft} s); the {done} objects "
                "finished before it are kept",
            )
        else:  # a backend or infrastructure failure, not the input's fault
            log.error("job %s failed", job_id, exc_info=exc)
            error = job_error(ErrorCode.BACKEND_FAILED, f"{type(exc).__name__}: {exc}")
        error["objects_done"] = done
        return self._finish(job_id, JobStatus.FAILED, error=error)

    def _decode_image(self, data: bytes) -> np.ndarray:
        """A job's image pixels, under the service's byte and pixel limits."""
        s = self.settings
        return decode_image(data, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels)

    def prefetch_next(self) -> None:
        """Start reading the inputs of the job likely to run next (the oldest queued one:
        the jobs this process runs are no longer queued)."""
        if self.prefetcher is None:
            return
        try:
            upcoming = self.store.next_queued(self.queues)
        except redis.RedisError:
            return
        self.prefetcher.request(upcoming)

    def _limits(self, job_id: str) -> tuple[int, int]:
        record = self.store.get(job_id)
        count = record.objects_total if record else 0
        return time_limits(self.settings, record.backend if record else "", count)

    def _run(self, record: JobRecord) -> str:
        """One job alone: its inputs, its objects, then the finisher."""
        try:
            job = self.prepare(record)
        except BaseException as exc:
            return self.stop_job(None, record.id, exc)
        self.prefetch_next()
        return self.generate_alone(job)

    def generate_alone(self, job: PreparedJob) -> str:
        """A prepared job's objects generated by themselves, then the finisher."""
        record = job.record
        try:
            job.camera = call_guarding_oom(
                stream_objects,
                job.image,
                job.masks,
                self.backend,
                job.stream,
                options=record.options,
                camera=job.camera,
                todo=job.todo,
                should_stop=lambda: self.raise_if_canceled(record.id),
                on_camera=lambda c: self.store.set_camera(record.id, c.to_dict()),
                depth=job.depth,
            )
            return self.hand_over(job)
        except BaseException as exc:
            return self.stop_job(job, record.id, exc)

    def restart_alone(self, job: PreparedJob) -> str:
        """A job of a failed batch run again by itself, resuming from what it stored."""
        self.discard(job)
        return self._run(job.record)

    def discard(self, job: PreparedJob) -> None:
        """A prepared job's local files, removed (its stream already closed)."""
        job.image = None
        shutil.rmtree(job.spool, ignore_errors=True)

    def raise_if_canceled(self, job_id: str) -> None:
        if self.store.cancel_requested(job_id):
            raise Canceled("canceled between objects")

    def prepare(self, record: JobRecord) -> PreparedJob:
        """A claimed job's inputs read and decoded, its stored objects found, its stream of
        exports open: everything before its objects are generated."""
        job_id = record.id
        t0 = time.perf_counter()
        spool = Path(tempfile.mkdtemp(prefix=f"sam3d-{job_id}-"))
        try:
            self._stage(job_id, "loading")
            inputs = StorageSink(
                self.storage, self.store, job_id, retry_s=self.settings.storage_retry_s
            )
            ahead = self.prefetcher.take(job_id) if self.prefetcher is not None else None
            files = CachedFiles(inputs, ahead.files) if ahead is not None else inputs
            prefetched_s = ahead.seconds if ahead is not None else None
            if ahead is not None:
                image = ahead.image
                log.info("job %s inputs were prefetched (%.3f s)", job_id, ahead.seconds)
            else:
                image = self._decode_image(inputs.get(INPUT_IMAGE))
            masks, segment_s = job_masks(
                files,
                record.extra,
                image,
                self.segmenter,
                max_objects=self.settings.max_masks,
                on_segmenting=lambda: self._stage(job_id, "segmenting"),
            )
            if ahead is not None:
                ahead.prime(masks)
                del ahead
            if segment_s is not None:
                self._observe("segmenting", segment_s)
            depth = None
            if (record.extra or {}).get("depth"):
                depth = DepthInput.from_bytes(files.get(INPUT_DEPTH))
            stored = self._stored_objects(job_id, len(masks), record.options)
            camera = (
                depth.camera if depth is not None else self.backend.camera(image, record.options)
            )
            if camera is None and stored and (saved := self.store.camera(job_id)):
                camera = Camera.from_dict(saved)
            todo = [i for i in range(len(masks)) if i not in stored]
            loaded = time.perf_counter()
            self._observe("loading", loaded - t0)
            if stored:
                log.info("job %s resumes: %d of %d objects already stored",
                         job_id, len(stored), len(masks))  # fmt: skip
            self._stage(job_id, "generating", objects_done=len(stored), objects_total=len(masks))
            stream = ObjectStream(
                inputs, spool=spool, threads=self.settings.export_threads, options=record.options
            )
            for index in sorted(stored):
                stream.add_stored(stored[index])
        except BaseException:
            shutil.rmtree(spool, ignore_errors=True)
            raise
        return PreparedJob(
            record, spool, image, masks, depth, camera, todo, stream, t0, loaded, prefetched_s
        )

    def hand_over(self, job: PreparedJob) -> str:
        """A job whose objects are all generated: the rest to the finisher thread (or done
        here without one); 'finishing', or the outcome."""
        job_id = job.record.id
        generated = time.perf_counter()
        self._observe("generating", generated - job.loaded)
        job.image = None
        finish = _Finish(
            self, job.record, job.stream, job.spool, job.camera, len(job.masks), job.t0,
            job.loaded, generated, len(job.todo),
        )  # fmt: skip
        finish.prefetched_s = job.prefetched_s
        if not self.defer_finish:
            return finish()
        try:
            self._stage(job_id, "finishing")
            self.store.mark_finishing(job_id, self.name)
        except BaseException:
            finish.cleanup()
            raise
        self.submit_finish(finish)
        return "finishing"

    def stop_job(self, job: PreparedJob | None, job_id: str, exc: BaseException) -> str:
        """A job stopped by ``exc`` before its hand-over: what was generated is kept, its
        spool removed, its outcome written (a BaseException other than a soft time limit,
        the process going, is raised again)."""
        try:
            if job is not None:
                job.stream.close_quietly()
            if isinstance(exc, Exception | SoftTimeLimitExceeded):
                return self._fail_or_stop(job_id, exc)
            raise exc
        finally:
            if job is not None:
                shutil.rmtree(job.spool, ignore_errors=True)
            release_memory()

    def _stored_objects(
        self, job_id: str, count: int, options: dict[str, Any]
    ) -> dict[int, dict[str, Any]]:
        """Objects an earlier run of this job stored that it can reuse (files still there)."""
        retry_s = self.settings.storage_retry_s

        def there(key: str) -> bool:  # a storage outage while resuming is waited out too
            return with_retries(lambda: self.storage.exists(key), f"checking {key}", retry_s)

        stored = {}
        for index, entry in self.store.objects(job_id).items():
            paths = restore_paths(entry, options)
            if paths is None:
                continue
            if index < count and all(there(job_key(job_id, p)) for p in paths):
                stored[index] = entry
        return stored

    # -- the finisher thread
    def submit_finish(self, finish: Callable[[], str]) -> None:
        """``finish`` (a job's end, with a ``job_id``) run on the finisher thread."""
        if self._finisher is None or not self._finisher.is_alive():
            self._finisher = threading.Thread(
                target=self._finish_loop, name="sam3d-finisher", daemon=True
            )
            self._finisher.start()
        self._idle.clear()
        self._finishing.put(finish)

    def _finish_loop(self) -> None:
        while True:
            finish = self._finishing.get()
            try:
                with job_logs(finish.job_id):
                    finish()
            except Exception:
                log.exception("finishing job %s failed", finish.job_id)
            finally:
                if self._finishing.empty():
                    self._idle.set()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every handed-over job is finished (before the process exits)."""
        return self._idle.wait(timeout)

    # -- periodic work (on the heartbeat thread)
    def sweep(self) -> None:
        """Reap the running jobs no live worker holds; delete what outlived retention."""
        with contextlib.suppress(redis.RedisError):
            live = {w["name"]: w for w in live_workers(self.sweep_store.r)}
            live[self.name] = {"jobs": list(self.held)}  # this process, even between beats
            self.reaper.sweep(live)
            self.retention.sweep()

    def _stage(self, job_id: str, stage: str, **fields: Any) -> None:
        self.store.update(job_id, stage=stage, **fields)

    def _observe(self, stage: str, seconds: float) -> None:
        self.store.observe_stage(stage, seconds)

    def _finish(self, job_id: str, status: JobStatus, **fields: Any) -> str:
        try:
            self.store.transition(
                job_id,
                status,
                expect=[JobStatus.RUNNING],
                expect_run=(self.name, self.held.get(job_id, -1)),
                **fields,
            )
            self.store.unmark_finishing(job_id)
        except (IllegalTransition, JobNotFound) as exc:
            log.warning("job %s: could not record %s: %s", job_id, status.value, exc)
            return "skipped"
        except redis.RedisError as exc:  # away past the client's retries: the reaper's now
            log.error("job %s: could not record %s: %s", job_id, status.value, exc)
            return "skipped"
        finally:
            self.held.pop(job_id, None)
        log.info("job %s %s", job_id, status.value)
        return status.value


class _Finish:
    """The end of one job: its last exports, the scene files, the manifest, its status."""

    def __init__(
        self,
        runner: JobRunner,
        record: JobRecord,
        stream: ObjectStream,
        spool: Path,
        camera: Camera | None,
        count: int,
        t0: float,
        loaded: float,
        generated: float,
        generated_count: int,
    ) -> None:
        self.runner, self.record, self.stream, self.spool = runner, record, stream, spool
        self.camera, self.count = camera, count
        self.t0, self.loaded, self.generated = t0, loaded, generated
        self.generated_count = generated_count
        self.job_id = record.id
        self.prefetched_s: float | None = None  # its inputs' read and decode, done ahead

    def __call__(self) -> str:
        runner, job_id = self.runner, self.job_id
        try:
            scene = self.stream.finish(self.count)
            finished = time.perf_counter()
            runner._observe("uploading", finished - self.generated)
            image_size = tuple(self.record.extra.get("image_size") or (0, 0))
            manifest = build_manifest(
                job_id=job_id,
                backend=runner.backend,
                options=self.record.options,
                camera=self.camera,
                image_size=image_size,  # type: ignore[arg-type]
                timings={
                    "load_s": self.loaded - self.t0,
                    "generate_s": self.generated - self.loaded,
                    "export_s": self.stream.export_s,
                    "finish_s": finished - self.generated,
                    "total_s": finished - self.t0,
                    **(
                        {"inputs_prefetched_s": self.prefetched_s}
                        if self.prefetched_s is not None
                        else {}
                    ),
                },
                scene=scene,
                objects=[self.stream.entries[i] for i in range(self.count)],
                depth_kind=(self.record.extra or {}).get("depth") or None,
            )
            data = json.dumps(manifest, indent=2).encode()
            StorageSink(
                runner.storage, runner.store, job_id, retry_s=runner.settings.storage_retry_s
            ).put("manifest.json", data, JSON_TYPE)
            result = build_result(manifest, len(data))
            result["time"] = round(time.perf_counter() - self.t0, 4)
            return runner._finish(
                job_id, JobStatus.SUCCEEDED, result=result, objects_done=self.count
            )
        except Exception as exc:
            self.stream.close_quietly()
            return runner._fail_or_stop(job_id, exc)
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.spool, ignore_errors=True)
        release_memory()


def build_result(manifest: dict, manifest_bytes: int) -> dict:
    """The record's ``result``: each artifact's path, size and type, and per-object metadata.
    URLs are not stored: the API mints fresh signed ones on every read."""

    def art(entry: dict) -> dict:
        return {k: entry[k] for k in ("path", "bytes", "content_type")}

    def files(entry: dict) -> dict:
        return {key: art(entry[key]) for key in ARTIFACT_KEYS if key in entry}

    return {
        "scene": files(manifest["scene"]),
        "objects": [
            {"index": o["index"], **files(o), "metadata": o["metadata"]}
            for o in manifest["objects"]
        ],
        "manifest": {
            "path": "manifest.json",
            "bytes": manifest_bytes,
            "content_type": "application/json",
        },
        "camera": manifest["camera"],
        "units": manifest.get("units"),
        "timings": manifest["timings"],
    }
