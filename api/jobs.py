"""The /v1/jobs routes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging

import numpy as np
import redis
from flask import Blueprint, current_app, jsonify, request

from api.auth import current_owner
from api.json_input import loads_input
from api.models import Accepted
from api.submit import Submission, parse_submission
from api.views import job_view, links
from jobs.artifacts import (
    INPUT_DEPTH,
    INPUT_IMAGE,
    INPUT_MASKS,
    INPUT_PROMPTS,
    job_key,
    job_prefix,
)
from jobs.errors import ErrorCode, Sam3dError, unavailable
from jobs.masks import encode_masks_rle
from jobs.queue import send_job
from jobs.records import JobRecord, JobStatus, JobStore, new_job_id
from jobs.storage import StorageError

bp = Blueprint("jobs", __name__, url_prefix="/v1")
log = logging.getLogger("sam3d.api")
MAX_PAGE = 100


def _store() -> JobStore:
    return current_app.extensions["sam3d_store"]


def _owned(job_id: str) -> JobRecord:
    """The caller's job, or 404 (also for another key's job: its existence is not revealed)."""
    record = _store().get(job_id)
    if record is None or record.owner != current_owner():
        raise Sam3dError(ErrorCode.NOT_FOUND, f"no job {job_id}")
    return record


@bp.post("/jobs")
def submit():
    owner = current_owner()
    settings = current_app.config["SETTINGS"]
    store = _store()
    idempotency_key = request.headers.get("Idempotency-Key", "").strip() or None
    if idempotency_key and len(idempotency_key) > 255:
        raise Sam3dError(ErrorCode.INVALID_REQUEST, "Idempotency-Key is longer than 255 characters")
    fingerprint = request_fingerprint() if idempotency_key else ""
    if idempotency_key:
        entry = store.idempotency_entry(owner, idempotency_key)
        if entry is not None:
            record = store.get(entry[0])
            if record is not None:
                return _replay(record, entry[1], fingerprint)
            # Its job was deleted (DELETE, or retention): the key is free again.
            store.release_idempotency_key(owner, idempotency_key, entry[0])

    check_limits(owner)
    storage = current_app.extensions["sam3d_storage"]
    submission = parse_submission(request, settings, owner, storage)
    job_id = new_job_id()
    if idempotency_key:
        holder = store.reserve_idempotency_key(owner, idempotency_key, job_id, fingerprint)
        if holder is not None:  # a concurrent request with the same key won the race
            record = store.get(holder)
            entry = store.idempotency_entry(owner, idempotency_key)
            if record is not None:
                return _replay(record, entry[1] if entry else "", fingerprint)
            raise Sam3dError(
                ErrorCode.CONFLICT, "a request with this Idempotency-Key is in progress"
            )
    try:
        record = store_job(job_id, submission, owner)
        enqueue(record)
    except Exception:
        # The failure was ours (Redis, storage or the broker away: nothing of the job is
        # left): the same key must be able to try again.
        if idempotency_key:
            with contextlib.suppress(redis.RedisError):
                store.release_idempotency_key(owner, idempotency_key, job_id)
        raise
    return _accepted(record)


def request_fingerprint() -> str:
    """A digest of what a submit asks for: its path and body (JSON canonicalised; form
    fields and files by name, so a new multipart boundary is the same request)."""
    digest = hashlib.sha256(request.path.encode() + b"\0")
    if request.mimetype == "multipart/form-data":
        # A part whose name does not parse is listed under None: sort it as "".
        for name, value in sorted(request.form.items(multi=True), key=lambda i: (i[0] or "", i[1])):
            digest.update(f"field:{name}={len(value)}:".encode() + value.encode() + b"\0")
        for name, file in sorted(request.files.items(multi=True), key=lambda i: i[0] or ""):
            data = file.read()
            file.seek(0)
            digest.update(f"file:{name}:".encode() + hashlib.sha256(data).digest())
        return digest.hexdigest()
    body = request.get_data(cache=True)
    # Not JSON: the bytes themselves (the submit answers 400 anyway).
    with contextlib.suppress(ValueError, Sam3dError):
        body = json.dumps(loads_input(body), sort_keys=True, separators=(",", ":")).encode()
    digest.update(request.mimetype.encode() + b"\0" + body)
    return digest.hexdigest()


def check_fingerprint(held: str, fingerprint: str, what: str) -> None:
    """422 ``idempotency_mismatch`` unless the request is the one the key was first used for."""
    if held and fingerprint and held != fingerprint:
        raise Sam3dError(
            ErrorCode.IDEMPOTENCY_MISMATCH,
            f"this Idempotency-Key was used for a different request ({what}); "
            "use a new key for a new request",
        )


def _replay(record: JobRecord, held: str, fingerprint: str):
    """The job a key stands for, if the request is the one that made it."""
    check_fingerprint(held, fingerprint, f"job {record.id}")
    return _accepted(record, replayed=True)


def check_limits(owner: str, count: int = 1) -> None:
    """429 with Retry-After (``RateLimited``) when the key is over its submit rate or jobs in
    flight."""
    current_app.extensions["sam3d_limits"].check_submit(owner, count)


def store_job(
    job_id: str, submission: Submission, owner: str, *, batch_id: str = "", queue: str = ""
) -> JobRecord:
    """Put the inputs in storage and create the queued record (not yet enqueued); on a
    failure nothing of the job is left behind."""
    try:
        return _store_job(job_id, submission, owner, batch_id, queue)
    except Exception:
        discard_jobs([job_id])
        raise


def discard_jobs(job_ids: list[str]) -> None:
    """Remove jobs that were never accepted (their record and inputs), as far as the stores
    that failed allow; a worker that gets their message finds no record and skips it."""
    storage = current_app.extensions["sam3d_storage"]
    for job_id in job_ids:
        with contextlib.suppress(StorageError, OSError):
            storage.delete_prefix(job_prefix(job_id))
        with contextlib.suppress(redis.RedisError):
            _store().delete(job_id)


def _store_job(
    job_id: str, submission: Submission, owner: str, batch_id: str, queue: str
) -> JobRecord:
    settings = current_app.config["SETTINGS"]
    storage = current_app.extensions["sam3d_storage"]
    storage.put(
        job_key(job_id, INPUT_IMAGE),
        submission.image_bytes,
        content_type="application/octet-stream",
    )
    if submission.prompts is not None:  # the worker segments them (worker/segmenters/)
        storage.put(
            job_key(job_id, INPUT_PROMPTS),
            json.dumps({"prompts": submission.prompts, "segmenter": settings.segmenter}).encode(),
            content_type="application/json",
        )
    else:
        storage.put(
            job_key(job_id, INPUT_MASKS),
            json.dumps(
                encode_masks_rle(submission.masks)
                if isinstance(submission.masks, np.ndarray)
                else submission.masks
            ).encode(),
            content_type="application/json",
        )
    extra: dict = {"image_size": list(submission.image_size)}
    if submission.prompts is not None:
        extra["prompts"] = len(submission.prompts)
    if submission.depth is not None:
        storage.put(
            job_key(job_id, INPUT_DEPTH),
            submission.depth.to_bytes(),
            content_type="application/octet-stream",
        )
        extra["depth"] = submission.depth.kind
    webhook = None
    if submission.webhook_url:
        webhook = {"url": submission.webhook_url, "state": "pending", "attempts": []}
    return _store().create(
        JobRecord(
            id=job_id,
            owner=owner,
            queue=queue or submission.queue,
            backend=settings.backend,
            options=submission.options,
            objects_total=submission.objects_total,
            extra=extra,
            batch_id=batch_id,
            webhook=webhook,
        )
    )


def enqueue(record: JobRecord) -> None:
    """Send the job id to its queue; on a broker failure the job is discarded (it must not
    sit queued) and the caller gets 503 to retry."""
    try:
        send_job(
            current_app.extensions["sam3d_celery"],
            current_app.config["SETTINGS"],
            record.id,
            record.queue,
            record.backend,
            record.objects_total,
        )
    except Exception as exc:
        log.warning("enqueue failed: %s", exc, extra={"job_id": record.id})
        discard_jobs([record.id])
        raise unavailable("the queue") from None
    log.info(
        "queued on %s with %d objects",
        record.queue,
        record.objects_total,
        extra={"job_id": record.id},
    )


def accepted_response(body, location: str, replayed: bool = False):
    """202 with ``body`` (a model), its ``Location``, and ``Idempotent-Replayed`` on a replay."""
    response = jsonify(body.model_dump(mode="json"))
    response.status_code = 202
    response.headers["Location"] = location
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _accepted(record: JobRecord, replayed: bool = False):
    body = Accepted(id=record.id, status=record.status.value, links=links(record.id))
    return accepted_response(body, f"/v1/jobs/{record.id}", replayed)


@bp.get("/jobs/<job_id>")
def get_job(job_id: str):
    return jsonify(job_view(_owned(job_id), _store()))


@bp.post("/jobs/<job_id>/cancel")
def cancel(job_id: str):
    record = _owned(job_id)
    if record.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise Sam3dError(ErrorCode.ALREADY_FINISHED, f"job {job_id} already {record.status.value}")
    record = _store().request_cancel(job_id)
    response = jsonify(job_view(record, _store(), with_result=False))
    response.status_code = 202 if record.status is JobStatus.RUNNING else 200
    return response


@bp.get("/jobs")
def list_jobs():
    owner = current_owner()
    status = request.args.get("status")
    if status is not None and status not in {s.value for s in JobStatus}:
        raise Sam3dError(
            ErrorCode.INVALID_REQUEST,
            f"status must be one of {', '.join(s.value for s in JobStatus)}",
        )
    try:
        limit = int(request.args.get("limit", 20))
    except ValueError:
        raise Sam3dError(ErrorCode.INVALID_REQUEST, "limit must be an integer") from None
    if not 1 <= limit <= MAX_PAGE:
        raise Sam3dError(ErrorCode.INVALID_REQUEST, f"limit must be within 1..{MAX_PAGE}")
    try:
        records, cursor = _store().list(
            owner,
            status=JobStatus(status) if status else None,
            limit=limit,
            cursor=request.args.get("cursor") or None,
        )
    except ValueError:
        raise Sam3dError(ErrorCode.INVALID_REQUEST, "bad cursor") from None
    store = _store()
    return jsonify(
        {"jobs": [job_view(r, store, with_result=False) for r in records], "next": cursor}
    )


@bp.delete("/jobs/<job_id>")
def delete(job_id: str):
    record = _owned(job_id)
    store = _store()
    if record.status is JobStatus.RUNNING:
        raise Sam3dError(ErrorCode.JOB_RUNNING, f"job {job_id} is running; cancel it first")
    if record.status is JobStatus.QUEUED:
        store.request_cancel(job_id)
    current_app.extensions["sam3d_storage"].delete_prefix(job_prefix(job_id))
    store.delete(job_id)
    return "", 204
