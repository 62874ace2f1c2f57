"""How a job record is shown over HTTP (field names mirror the original SDK's response)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import current_app, request

from jobs.artifacts import ARTIFACT_KEYS, download_name, job_key
from jobs.records import JobRecord, JobStatus, JobStore


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def links(job_id: str) -> dict[str, str]:
    return {"self": f"/v1/jobs/{job_id}", "cancel": f"/v1/jobs/{job_id}/cancel"}


def _base_url() -> str:
    settings = current_app.config["SETTINGS"]
    return (settings.public_url or request.host_url).rstrip("/")


def artifact(job_id: str, entry: dict[str, Any]) -> dict[str, Any]:
    """ART: a freshly minted signed URL with its expiry, size and type."""
    settings = current_app.config["SETTINGS"]
    signed = current_app.extensions["sam3d_storage"].signed_url(
        job_key(job_id, entry["path"]),
        expires_in=settings.url_ttl_s,
        base_url=_base_url(),
        filename=download_name(job_id, entry["path"]),
    )
    return {
        "url": signed.url,
        "expires_at": signed.expires_at.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "bytes": entry["bytes"],
        "content_type": entry["content_type"],
    }


def job_view(record: JobRecord, store: JobStore, *, with_result: bool = True) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": record.id,
        "status": record.status.value,
        "stage": record.stage,
        "progress": {"objects_done": record.objects_done, "objects_total": record.objects_total},
        "queue": record.queue,
        "queue_position": store.queue_position(record),
        "attempts": record.attempts,
        "cancel_requested": record.cancel_requested,
        "created_at": iso(record.created_at),
        "started_at": iso(record.started_at),
        "finished_at": iso(record.finished_at),
        "options": record.options,
        "batch_id": record.batch_id or None,
        "webhook": record.webhook,
        "error": record.error,
        "result": None,
        "links": links(record.id),
    }
    if with_result:
        view["objects"] = objects_view(record, store.objects(record.id))
        if record.status is JobStatus.SUCCEEDED and record.result:
            view["result"] = result_view(record.id, record.result)
    return view


def objects_view(record: JobRecord, done: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every object with its state: ``done`` ones (stored as each finished, kept when the
    job later fails, times out or is canceled) carry their files and metadata."""
    out = []
    for index in range(max(record.objects_total, max(done, default=-1) + 1)):
        entry = done.get(index)
        if entry is None:
            out.append({"index": index, "state": "pending"})
            continue
        out.append(
            {
                "index": index,
                "state": "done",
                **artifacts(record.id, entry),
                "metadata": entry["metadata"],
                "time_s": entry.get("time_s"),
                # area, bbox, COCO RLE; for prompted jobs its prompt index and score too
                "mask": entry.get("mask"),
            }
        )
    return out


def artifacts(job_id: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Every file of ``entry`` (an object or the scene) by its key, with a fresh signed URL."""
    return {key: artifact(job_id, entry[key]) for key in ARTIFACT_KEYS if key in entry}


def result_view(job_id: str, result: dict[str, Any]) -> dict[str, Any]:
    return {
        "time": result.get("time"),
        "scene": artifacts(job_id, result["scene"]),
        "objects": [
            {"index": obj["index"], **artifacts(job_id, obj), "metadata": obj["metadata"]}
            for obj in result["objects"]
        ],
        "manifest": artifact(job_id, result["manifest"]),
        "camera": result.get("camera"),
        "units": result.get("units") or "relative",
        "timings": result.get("timings"),
    }
