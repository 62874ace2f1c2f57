"""Running one job: the Celery task body, with every outcome written to the job record."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from jobs.artifacts import INPUT_DEPTH, INPUT_IMAGE, INPUT_MASKS, download_name, job_key
from jobs.depth import DepthInput
from jobs.errors import ErrorCode, Sam3dError
from jobs.heartbeat import Heartbeat
from jobs.images import decode_image
from jobs.logs import job_id_var
from jobs.masks import decode_masks
from jobs.records import IllegalTransition, JobNotFound, JobStatus, JobStore
from jobs.settings import Settings
from jobs.storage import Storage
from worker.backends.base import Backend
from worker.gpu import call_guarding_oom
from worker.pipeline import Canceled, generate_assets

log = logging.getLogger("sam3d.worker")


class JobRunner:
    """Holds what a worker process keeps resident (backend, clients) and runs jobs."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        store: JobStore,
        storage: Storage,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.store = store
        self.storage = storage
        self.heartbeat = heartbeat

    def run(self, job_id: str) -> str:
        """Run ``job_id`` to a terminal state; returns that state (or 'skipped')."""
        token = job_id_var.set(job_id)  # every log line of this job carries its id
        try:
            return self._claim_and_run(job_id)
        finally:
            job_id_var.reset(token)

    def _claim_and_run(self, job_id: str) -> str:
        try:
            record, run = self.store.claim(job_id, self.settings.max_attempts)
        except (JobNotFound, IllegalTransition):
            return "skipped"
        if not run:
            log.info("job %s not run: %s", job_id, record.status.value if record else "deleted")
            return "skipped"
        log.info("job %s started (attempt %d)", job_id, record.attempts)
        if self.heartbeat:
            self.heartbeat.set(state="busy", current_job=job_id)
        try:
            return self._run(record)
        except Canceled:
            return self._finish(job_id, JobStatus.CANCELED)
        except Sam3dError as exc:
            return self._finish(job_id, JobStatus.FAILED, error=exc.to_dict())
        except SoftTimeLimitExceeded:
            error = {
                "code": "timeout",
                "message": f"the job ran past its time limit ({self.settings.job_time_limit_s} s)",
                "retryable": False,
            }
            return self._finish(job_id, JobStatus.FAILED, error=error)
        except Exception as exc:  # a backend or infrastructure failure, not the input's fault
            log.exception("job %s failed", job_id)
            error = {
                "code": ErrorCode.BACKEND_FAILED.value,
                "message": f"{type(exc).__name__}: {exc}",
                "retryable": True,
            }
            return self._finish(job_id, JobStatus.FAILED, error=error)
        finally:
            if self.heartbeat:
                self.heartbeat.set(state="ready", current_job=None)

    def _run(self, record) -> str:
        job_id = record.id
        t0 = time.perf_counter()
        self._stage(job_id, "loading")
        image = decode_image(
            self.storage.get(job_key(job_id, INPUT_IMAGE)),
            max_bytes=self.settings.max_image_bytes,
            max_pixels=self.settings.max_image_pixels,
        )
        masks = decode_masks(
            json.loads(self.storage.get(job_key(job_id, INPUT_MASKS))),
            image.shape[:2],
            mask_format="rle",
            max_masks=self.settings.max_masks,
        )
        depth = None
        if (record.extra or {}).get("depth"):
            depth = DepthInput.from_bytes(self.storage.get(job_key(job_id, INPUT_DEPTH)))
        self._observe("loading", time.perf_counter() - t0)

        t1 = time.perf_counter()
        self._stage(job_id, "generating", objects_done=0, objects_total=len(masks))

        def progress(done: int, total: int) -> None:
            self.store.update(job_id, objects_done=done, objects_total=total)

        def should_cancel() -> bool:
            return self.store.cancel_requested(job_id)

        artifacts = call_guarding_oom(
            generate_assets,
            image,
            masks,
            self.backend,
            options=record.options,
            job_id=job_id,
            on_object=progress,
            should_cancel=should_cancel,
            depth=depth,
        )
        self._observe("generating", time.perf_counter() - t1)
        if should_cancel():
            raise Canceled("canceled before upload")

        t2 = time.perf_counter()
        self._stage(job_id, "uploading")
        for path, data in artifacts.files.items():
            content_type = "application/json" if path.endswith(".json") else None
            entry = _manifest_entry(artifacts.manifest, path)
            self.storage.put(
                job_key(job_id, path),
                data,
                content_type=content_type or entry["content_type"],
                filename=download_name(job_id, path),
            )
        self._observe("uploading", time.perf_counter() - t2)
        result = build_result(artifacts.manifest, len(artifacts.files["manifest.json"]))
        result["time"] = round(time.perf_counter() - t0, 4)
        return self._finish(job_id, JobStatus.SUCCEEDED, result=result, objects_done=len(masks))

    def _stage(self, job_id: str, stage: str, **fields: Any) -> None:
        self.store.update(job_id, stage=stage, **fields)

    def _observe(self, stage: str, seconds: float) -> None:
        self.store.observe_stage(stage, seconds)

    def _finish(self, job_id: str, status: JobStatus, **fields: Any) -> str:
        try:
            self.store.transition(job_id, status, expect=[JobStatus.RUNNING], **fields)
        except (IllegalTransition, JobNotFound) as exc:
            log.warning("job %s: could not record %s: %s", job_id, status.value, exc)
            return "skipped"
        log.info("job %s %s", job_id, status.value)
        return status.value


def _manifest_entry(manifest: dict, path: str) -> dict:
    if path == "scene.glb":
        return manifest["scene"]["mesh_glb"]
    if path == "scene.ply":
        return manifest["scene"]["gaussian_ply"]
    if path.startswith("objects/"):
        index, ext = path.removeprefix("objects/").split(".")
        return manifest["objects"][int(index)]["mesh_glb" if ext == "glb" else "gaussian_ply"]
    return {"content_type": "application/octet-stream"}


def build_result(manifest: dict, manifest_bytes: int) -> dict:
    """The record's ``result``: each artifact's path, size and type, and per-object metadata.
    URLs are not stored: the API mints fresh signed ones on every read."""

    def art(entry: dict) -> dict:
        return {k: entry[k] for k in ("path", "bytes", "content_type")}

    return {
        "scene": {
            "mesh_glb": art(manifest["scene"]["mesh_glb"]),
            "gaussian_ply": art(manifest["scene"]["gaussian_ply"]),
        },
        "objects": [
            {
                "index": o["index"],
                "mesh_glb": art(o["mesh_glb"]),
                "gaussian_ply": art(o["gaussian_ply"]),
                "metadata": o["metadata"],
            }
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
