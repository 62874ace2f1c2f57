"""``POST /sam3_3d/infer``: Roboflow's SAM3-3D route, so its clients work unchanged.

The request is what Roboflow's inference server takes and ``inference-sdk``'s
``InferenceHTTPClient.sam3_3d_infer`` sends: JSON with ``image`` ({"type", "value"}),
``mask_input``, ``model_id``, ``output_meshes``, ``output_scene``, ``with_mesh_postprocess``,
``with_texture_baking``, ``use_distillations`` and ``api_key`` (also accepted as the query
parameter or a Bearer header). Fields of ours may be added: ``mask_format``, ``image_id``,
``file_name``, ``options``, ``depth``/``pointmap`` + ``intrinsics``. Unknown fields are ignored,
as Roboflow's server ignores them.

It is synchronous over the queue: a job is submitted, waited for (``SAM3D_SYNC_TIMEOUT_S``) and
answered with every artifact inline as base64, streamed artifact by artifact so a response of
tens of MB never sits in memory whole. The same body (per key, 24 h) stands for the same job, so
a client that retries after a 504 waits for the job already running instead of starting another;
a job that failed is not reused.

Errors carry Roboflow's ``message`` beside ours (``error {code, message}``), with HTTP statuses
its client turns into exceptions: bad input 4xx, never 5xx.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from api.auth import bearer_token, current_owner
from api.errors import http_error
from api.jobs import check_limits, enqueue, store_job
from api.submit import parse_json_spec
from api.views import links
from jobs.artifacts import job_key
from jobs.errors import ErrorCode, Sam3dError
from jobs.records import JobRecord, JobStatus, JobStore, new_job_id

bp = Blueprint("roboflow", __name__)
log = logging.getLogger("sam3d.api")

MODEL_ID = "sam3-3d-objects"
# Roboflow's flags and their defaults (the client sends all of them).
FLAGS = {
    "output_meshes": True,
    "output_scene": True,
    "with_mesh_postprocess": True,
    "with_texture_baking": True,
    "use_distillations": False,
}
# Fields handed to the job submission as they are.
SPEC_FIELDS = (
    "image",
    "mask_input",
    "mask_format",
    "image_id",
    "file_name",
    "depth",
    "pointmap",
    "intrinsics",
)
_B64_CHUNK = 3 * 2**16  # bytes encoded per piece: a multiple of 3, so the pieces concatenate


def _store() -> JobStore:
    return current_app.extensions["sam3d_store"]


# -- errors: Roboflow's client reads "message" ------------------------------------------------


def _error(exc: Sam3dError, **extra: Any):
    code, message = exc.code.value, exc.message
    body = {"message": message, "error_type": code, "error": {"code": code, "message": message}}
    body.update(extra)
    response = jsonify(body)
    response.status_code = exc.status
    response.headers.update(exc.response_headers())
    return response


@bp.errorhandler(Sam3dError)
def _sam3d_error(exc: Sam3dError):
    return _error(exc, **getattr(exc, "extra", {}))


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException):
    return _error(http_error(exc))


class _JobError(Sam3dError):
    """A job that ended without assets, answered with its id."""

    def __init__(self, code: ErrorCode, message: str, job_id: str) -> None:
        super().__init__(code, message)
        self.extra = {"job_id": job_id, "links": links(job_id)}


# -- the route ---------------------------------------------------------------------------------


@bp.post("/sam3_3d/infer")
def infer():
    settings = current_app.config["SETTINGS"]
    if not request.is_json:
        raise Sam3dError(ErrorCode.INVALID_REQUEST, "send the request as application/json")
    raw = request.get_data(cache=True)
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise Sam3dError(ErrorCode.INVALID_REQUEST, "the body is not a JSON object")
    key_in_body = body.get("api_key") if isinstance(body.get("api_key"), str) else None
    owner = current_owner(request.args.get("api_key") or bearer_token() or key_in_body)

    flags = {}
    for name, default in FLAGS.items():
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise Sam3dError(ErrorCode.INVALID_REQUEST, f"{name} must be true or false")
        flags[name] = default if value is None else value
    model_id = body.get("model_id") or MODEL_ID
    if model_id != MODEL_ID:
        raise Sam3dError(
            ErrorCode.INVALID_REQUEST,
            f"unknown model_id {model_id!r}; this server runs {MODEL_ID!r}",
        )
    options, notes = _options(body.get("options"), flags, settings)

    key = request.headers.get("Idempotency-Key", "").strip()
    if len(key) > 255:
        raise Sam3dError(ErrorCode.INVALID_REQUEST, "Idempotency-Key is longer than 255 characters")
    key = key or "sam3_3d:" + hashlib.sha256(raw).hexdigest()
    record = _reusable_job(owner, key)
    if record is None:
        spec = {k: body[k] for k in SPEC_FIELDS if body.get(k) is not None}
        spec["options"] = options
        record = _submit(owner, key, spec)
    record = _wait(record.id, settings.sync_timeout_s)
    return _answer(record, flags, notes)


ROBOFLOW_TEXTURE = 1024  # with_texture_baking's texture edge (the option "texture")


def _options(given: Any, flags: dict[str, bool], settings) -> tuple[dict[str, Any], list[str]]:
    """Roboflow's flags as our options, and a note for every flag this server cannot honour."""
    if given is not None and not isinstance(given, dict):
        raise Sam3dError(ErrorCode.INVALID_OPTION, '"options" must be a JSON object')
    options = dict(given or {})
    notes: list[str] = []
    backend = settings.backend
    if backend == "sam3d":
        if flags["use_distillations"]:
            options.setdefault("fast", True)
        if flags["with_mesh_postprocess"]:
            if settings.baking_available:
                options.setdefault("mesh_postprocess", True)
            else:
                notes.append(
                    "with_mesh_postprocess ignored: its dependencies (requirements/gpu-baking.txt,"
                    " non-commercial licences) are not installed on this server"
                )
        if flags["with_texture_baking"] and settings.baking_available:
            options.setdefault("texture_baking", True)  # upstream's own baking (nvdiffrast)
    else:
        for flag in ("with_mesh_postprocess", "use_distillations"):
            if flags[flag]:
                notes.append(f"{flag} ignored: the {backend!r} backend has no such stage")
    if flags["with_texture_baking"] and not options.get("texture_baking"):
        # Ours (xatlas, MIT): every mesh UV-unwrapped, its base colour baked from the photo or
        # the object's Gaussians; an explicit "texture" option (0: vertex colours) wins.
        options.setdefault("texture", ROBOFLOW_TEXTURE)
        if options["texture"]:
            notes.append(
                f"with_texture_baking: meshes UV-unwrapped with a {options['texture']} px "
                "base-colour texture baked by this server (no nvdiffrast)"
            )
    return options, notes


def _reusable_job(owner: str, key: str) -> JobRecord | None:
    """The job this key already stands for, unless it failed or was canceled."""
    store = _store()
    existing = store.idempotent_job(owner, key)
    if existing is None:
        return None
    record = store.get(existing)
    if record is not None and record.status not in (JobStatus.FAILED, JobStatus.CANCELED):
        return record
    store.release_idempotency_key(owner, key, existing)
    return None


def _submit(owner: str, key: str, spec: dict[str, Any]) -> JobRecord:
    settings = current_app.config["SETTINGS"]
    store = _store()
    check_limits(owner)
    submission = parse_json_spec(
        spec, settings, owner=owner, storage=current_app.extensions["sam3d_storage"]
    )
    job_id = new_job_id()
    holder = store.reserve_idempotency_key(owner, key, job_id)
    if holder is not None:  # the same body, concurrently: wait for that job instead
        record = store.get(holder)
        if record is None:
            raise Sam3dError(ErrorCode.CONFLICT, "the same request is in progress; retry")
        return record
    try:
        record = store_job(job_id, submission, owner)
        enqueue(record)
    except Exception:
        store.release_idempotency_key(owner, key, job_id)
        raise
    return record


def _wait(job_id: str, timeout_s: float) -> JobRecord:
    """Poll the record until the job ends; 504 (the job goes on) past the deadline."""
    store = _store()
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        record = store.get(job_id)
        if record is None:
            raise Sam3dError(ErrorCode.NOT_FOUND, f"job {job_id} was deleted while waiting")
        if record.status.is_terminal:
            return record
        left = deadline - time.monotonic()
        if left <= 0:
            raise _JobError(
                ErrorCode.STILL_RUNNING,
                f"job {job_id} is still {record.status.value} after {timeout_s:g} s; "
                "send the same request again to keep waiting for it",
                job_id,
            )
        time.sleep(min(delay, left))
        delay = min(delay * 1.5, 0.25)


def _failure(record: JobRecord) -> _JobError:
    if record.status is JobStatus.CANCELED:
        return _JobError(ErrorCode.CANCELED, f"job {record.id} was canceled", record.id)
    error = record.error or {}
    message = str(error.get("message") or "the job failed")
    try:  # the registry's status: 4xx for the input's fault, 503 out_of_memory (retry), 500
        code = ErrorCode(str(error.get("code") or ErrorCode.BACKEND_FAILED.value))
    except ValueError:  # a record written by another version
        code = ErrorCode.BACKEND_FAILED
    return _JobError(code, message, record.id)


def _answer(record: JobRecord, flags: dict[str, bool], notes: list[str]) -> Response:
    if record.status is not JobStatus.SUCCEEDED or not record.result:
        raise _failure(record)
    storage = current_app.extensions["sam3d_storage"]
    result = record.result
    job_id = record.id
    meshes, scene = flags["output_meshes"], flags["output_scene"]

    def inline(entry: dict[str, Any] | None) -> Iterator[bytes]:
        if entry is None:
            yield b"null"
            return
        data = memoryview(storage.get(job_key(job_id, entry["path"])))
        yield b'"'
        for start in range(0, len(data), _B64_CHUNK):
            yield base64.b64encode(data[start : start + _B64_CHUNK])
        yield b'"'

    def dump(value: Any) -> bytes:
        return json.dumps(value).encode()

    # Every file the answer inlines, found before the 200 starts: options may have left some
    # out (formats without glb or ply, "scene": false), and those are answered as null.
    scene_files = result.get("scene") or {}
    objects = [
        (obj.get("mesh_glb") if meshes else None, obj.get("gaussian_ply"), obj)
        for obj in result.get("objects") or []
    ]
    missing = [
        name
        for name, wanted, entry in (
            ("scene mesh_glb", scene and meshes, scene_files.get("mesh_glb")),
            ("scene gaussian_ply", scene, scene_files.get("gaussian_ply")),
            ("object mesh_glb", meshes, objects[0][0] if objects else True),
            ("object gaussian_ply", True, objects[0][1] if objects else True),
        )
        if wanted and not entry
    ]
    if missing:
        notes = [*notes, f"null where the job's options made no such file: {', '.join(missing)}"]

    def body() -> Iterator[bytes]:
        yield b'{"mesh_glb": '
        yield from inline(scene_files.get("mesh_glb") if scene and meshes else None)
        yield b', "gaussian_ply": '
        yield from inline(scene_files.get("gaussian_ply") if scene else None)
        yield b', "objects": ['
        for i, (mesh_glb, gaussian_ply, obj) in enumerate(objects):
            yield b'{"mesh_glb": ' if i == 0 else b', {"mesh_glb": '
            yield from inline(mesh_glb)
            yield b', "gaussian_ply": '
            yield from inline(gaussian_ply)
            yield b', "metadata": ' + dump(obj.get("metadata"))
            yield b', "index": ' + dump(obj.get("index")) + b"}"
        extra = {
            "time": result.get("time"),
            "job_id": job_id,
            "camera": result.get("camera"),
            "units": result.get("units") or "relative",
            "notes": notes,
            "links": links(job_id),
        }
        yield b"], " + dump(extra)[1:]

    log.info("sam3_3d/infer answered from %s", job_id, extra={"job_id": job_id})
    return Response(body(), status=200, mimetype="application/json")
