"""/v1/batches (many jobs at once, on the bulk queue) and /v1/uploads (images stored once,
then named by key in job specs)."""

from __future__ import annotations

import contextlib
import uuid

import redis
from flask import Blueprint, current_app, jsonify, request

from api import models
from api.auth import current_owner
from api.jobs import (
    accepted_response,
    check_fingerprint,
    check_limits,
    discard_jobs,
    enqueue,
    request_fingerprint,
    store_job,
)
from api.submit import parse_json_spec, upload_prefix
from api.views import iso, links
from jobs.batches import Batch, new_batch_id
from jobs.errors import ErrorCode, Sam3dError
from jobs.images import decode_image
from jobs.queue import QUEUES
from jobs.records import new_job_id
from jobs.retention import track_upload, untrack_upload
from jobs.storage import validate_key
from jobs.webhooks import check_webhook_url

bp = Blueprint("batches", __name__, url_prefix="/v1")
BULK = QUEUES[1]


@bp.post("/uploads")
def upload():
    """Store one image (multipart ``file``, or the raw body) for later jobs: {"key", "bytes"}."""
    owner = current_owner()
    settings = current_app.config["SETTINGS"]
    current_app.extensions["sam3d_limits"].check_upload(owner)  # 429 RateLimited
    if request.mimetype == "multipart/form-data":
        file = request.files.get("file")
        if file is None:
            raise Sam3dError(ErrorCode.INVALID_REQUEST, 'multipart uploads need a "file" field')
        data = file.read(settings.max_image_bytes + 1)
    else:
        data = request.get_data(cache=False)
    image = decode_image(
        data, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels
    )
    key = f"{upload_prefix(owner)}{uuid.uuid4().hex}"
    current_app.extensions["sam3d_storage"].put(key, data, content_type="application/octet-stream")
    track_upload(current_app.extensions["sam3d_store"], key)  # expires with retention
    stored = models.Upload(key=key, bytes=len(data), width=image.shape[1], height=image.shape[0])
    response = jsonify(stored.model_dump(mode="json"))
    response.status_code = 201
    return response


@bp.delete("/uploads/<name>")
def delete_upload(name: str):
    """Delete one of the caller's uploaded images (``name``: the last part of its key)."""
    owner = current_owner()
    key = f"{upload_prefix(owner)}{name}"
    storage = current_app.extensions["sam3d_storage"]
    try:
        validate_key(key)
    except ValueError:
        raise Sam3dError(ErrorCode.NOT_FOUND, f"no upload {name}") from None
    if not storage.exists(key):
        raise Sam3dError(ErrorCode.NOT_FOUND, f"no upload {name}")
    storage.delete_prefix(key)
    untrack_upload(current_app.extensions["sam3d_store"], key)
    return "", 204


BATCH_KEY = "batch:"  # batches' Idempotency-Keys live beside the jobs', apart


def _batch_accepted(batch: Batch, replayed: bool = False):
    accepted = models.BatchAccepted(
        id=batch.id,
        status="queued",
        jobs=[models.BatchJobLink(id=job_id, links=links(job_id)) for job_id in batch.job_ids],
        links=models.BatchLinks(self=f"/v1/batches/{batch.id}"),
    )
    return accepted_response(accepted, f"/v1/batches/{batch.id}", replayed)


@bp.post("/batches")
def create_batch():
    """Validate every job spec first (all or nothing), then create and enqueue them all.
    An ``Idempotency-Key`` stands for one batch, as for one job."""
    owner = current_owner()
    settings = current_app.config["SETTINGS"]
    store = current_app.extensions["sam3d_store"]
    batches = current_app.extensions["sam3d_batches"]
    idempotency_key = request.headers.get("Idempotency-Key", "").strip() or None
    if idempotency_key and len(idempotency_key) > 255:
        raise Sam3dError(ErrorCode.INVALID_REQUEST, "Idempotency-Key is longer than 255 characters")
    key = BATCH_KEY + idempotency_key if idempotency_key else None
    fingerprint = request_fingerprint() if key else ""
    if key:
        entry = store.idempotency_entry(owner, key)
        if entry is not None:
            batch = batches.get(entry[0])
            if batch is not None:
                check_fingerprint(entry[1], fingerprint, f"batch {batch.id}")
                return _batch_accepted(batch, replayed=True)
            store.release_idempotency_key(owner, key, entry[0])  # its batch is gone
    body = request.get_json(silent=True)
    models.parse_batch_body(body, settings.backend)  # the envelope; each job below
    specs = body["jobs"]
    if len(specs) > settings.max_batch_jobs:
        raise Sam3dError(
            ErrorCode.INVALID_REQUEST,
            f"{len(specs)} jobs; a batch holds at most {settings.max_batch_jobs}",
        )
    defaults = body.get("options") or {}
    if not isinstance(defaults, dict):
        raise Sam3dError(ErrorCode.INVALID_REQUEST, '"options" must be a JSON object')
    webhook = None
    if body.get("webhook_url") is not None:
        if not settings.webhook_secret:
            raise Sam3dError(
                ErrorCode.INVALID_REQUEST, "webhooks are not configured on this server"
            )
        url = check_webhook_url(body["webhook_url"], allow_private=settings.allow_private_urls)
        webhook = {"url": url, "state": "pending", "attempts": []}
    check_limits(owner, len(specs))

    storage = current_app.extensions["sam3d_storage"]
    submissions = []
    for index, spec in enumerate(specs):
        # A job's own options over the batch's; one that is not an object is left for the
        # job's own validation to reject (400, with its index), never merged.
        if isinstance(spec, dict) and isinstance(spec.get("options") or {}, dict):
            spec = {**spec, "options": {**defaults, **(spec.get("options") or {})}}
        try:
            submissions.append(parse_json_spec(spec, settings, owner=owner, storage=storage))
        except Sam3dError as exc:
            raise Sam3dError(exc.code, f"jobs[{index}]: {exc.message}") from None

    batch_id = new_batch_id()
    if key:
        holder = store.reserve_idempotency_key(owner, key, batch_id, fingerprint)
        if holder is not None:  # a concurrent request with the same key won the race
            batch = batches.get(holder)
            if batch is None:
                raise Sam3dError(
                    ErrorCode.CONFLICT, "a request with this Idempotency-Key is in progress"
                )
            entry = store.idempotency_entry(owner, key)
            check_fingerprint(entry[1] if entry else "", fingerprint, f"batch {batch.id}")
            return _batch_accepted(batch, replayed=True)
    records = []
    try:  # all or nothing: a failure part-way removes every job already made
        for submission in submissions:
            records.append(
                store_job(new_job_id(), submission, owner, batch_id=batch_id, queue=BULK)
            )
        batch = batches.create(Batch(batch_id, owner, [r.id for r in records], webhook=webhook))
        for record in records:
            enqueue(record)
    except Exception:
        discard_jobs([r.id for r in records])
        with contextlib.suppress(redis.RedisError):
            batches.delete(batch_id)
            if key:
                store.release_idempotency_key(owner, key, batch_id)
        raise
    return _batch_accepted(batch)


@bp.get("/batches/<batch_id>")
def get_batch(batch_id: str):
    batches = current_app.extensions["sam3d_batches"]
    batch = batches.get(batch_id)
    if batch is None or batch.owner != current_owner():
        raise Sam3dError(ErrorCode.NOT_FOUND, f"no batch {batch_id}")
    store = current_app.extensions["sam3d_store"]
    statuses = store.statuses(batch.job_ids)
    counts = batches.counts(batch, store)
    return jsonify(
        {
            "id": batch.id,
            "total": len(batch.job_ids),
            "counts": counts,
            "finished": batch.completed_at is not None,
            "created_at": iso(batch.created_at),
            "completed_at": iso(batch.completed_at),
            "webhook": batch.webhook,
            "jobs": [
                {"id": job_id, "status": s.value if s else "deleted", "links": links(job_id)}
                for job_id, s in zip(batch.job_ids, statuses, strict=True)
            ],
            "links": {"self": f"/v1/batches/{batch.id}"},
        }
    )
