"""``GET /openapi.json``: the API described in OpenAPI 3.1, every route and schema."""

from __future__ import annotations

from flask import Blueprint, jsonify

from jobs.errors import ErrorCode
from jobs.masks import MASK_FORMATS
from jobs.options import BACKEND_OPTIONS, COMMON_OPTIONS
from jobs.queue import QUEUES
from jobs.records import JobStatus

bp = Blueprint("openapi", __name__)

NULLABLE_STR = {"type": ["string", "null"]}
TIME = {"type": ["string", "null"], "format": "date-time"}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


def _options_schema() -> dict:
    props: dict = {
        "priority": {
            "type": "string",
            "enum": list(QUEUES),
            "default": QUEUES[0],
            "description": "queue: interactive (default) or bulk",
        },
    }
    for option in COMMON_OPTIONS + tuple(o for opts in BACKEND_OPTIONS.values() for o in opts):
        if option.schema is not None:
            props[option.name] = {
                **option.schema,
                "default": option.default,
                "description": option.doc,
            }
            continue
        kind = {int: "integer", float: "number", bool: "boolean"}[option.kind]
        prop = {"type": kind, "default": option.default, "description": option.doc}
        if option.low is not None:
            prop["minimum"] = option.low
        if option.high is not None:
            prop["maximum"] = option.high
        props[option.name] = prop
    return {"type": "object", "properties": props, "additionalProperties": False}


SCHEMAS = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "examples": [c.value for c in ErrorCode]},
                    "message": {"type": "string"},
                },
            }
        },
    },
    "JobError": {
        "type": ["object", "null"],
        "properties": {
            "code": {"type": "string"},
            "message": {"type": "string"},
            "retryable": {"type": "boolean"},
        },
    },
    "Artifact": {
        "type": "object",
        "required": ["url", "expires_at", "bytes", "content_type"],
        "properties": {
            "url": {"type": "string", "description": "signed URL, minted fresh on every GET"},
            "expires_at": {"type": "string", "format": "date-time"},
            "bytes": {"type": "integer"},
            "content_type": {"type": "string"},
        },
    },
    "Metadata": {
        "type": "object",
        "description": "Pose of the object. rotation/translation/scale exactly as SAM 3D "
        "reports them (w,x,y,z; PyTorch3D camera; row vectors; Z-up object); matrix: 4x4 "
        "row-major, column vectors, per-object GLB local frame -> scene (OpenGL camera).",
        "properties": {
            "rotation": {
                "type": "array",
                "items": {"type": "number"},
                "minItems": 4,
                "maxItems": 4,
            },
            "translation": {
                "type": "array",
                "items": {"type": "number"},
                "minItems": 3,
                "maxItems": 3,
            },
            "scale": {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3},
            "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        },
    },
    "Result": {
        "type": ["object", "null"],
        "properties": {
            "time": {"type": "number", "description": "seconds the worker spent on the job"},
            "scene": {
                "type": "object",
                "properties": {"mesh_glb": _ref("Artifact"), "gaussian_ply": _ref("Artifact")},
            },
            "objects": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "index": {"type": "integer"},
                        "mesh_glb": _ref("Artifact"),
                        "gaussian_ply": _ref("Artifact"),
                        "metadata": _ref("Metadata"),
                    },
                },
            },
            "manifest": _ref("Artifact"),
            "camera": {"type": "object"},
            "units": {
                "type": "string",
                "enum": ["metres", "relative"],
                "description": "metres when the job had a depth map or pointmap",
            },
            "timings": {"type": "object"},
        },
    },
    "Links": {
        "type": "object",
        "properties": {"self": {"type": "string"}, "cancel": {"type": "string"}},
    },
    "Job": {
        "type": "object",
        "required": ["id", "status", "stage", "progress", "created_at", "error", "result"],
        "properties": {
            "id": {"type": "string"},
            "status": {"type": "string", "enum": [s.value for s in JobStatus]},
            "stage": {"type": "string"},
            "progress": {
                "type": "object",
                "properties": {
                    "objects_done": {"type": "integer"},
                    "objects_total": {"type": "integer"},
                },
            },
            "queue": {"type": "string", "enum": list(QUEUES)},
            "queue_position": {
                "type": ["integer", "null"],
                "description": "0 = next; null unless queued",
            },
            "attempts": {"type": "integer"},
            "cancel_requested": {"type": "boolean"},
            "created_at": TIME,
            "started_at": TIME,
            "finished_at": TIME,
            "options": {"type": "object"},
            "batch_id": NULLABLE_STR,
            "webhook": {
                "type": ["object", "null"],
                "description": "url, state (pending, retrying, delivered, failed), attempts",
            },
            "error": _ref("JobError"),
            "objects": {
                "type": "array",
                "description": "every object with its state; a done object's files are "
                "stored and listed as soon as it finishes, and kept if the job then fails, "
                "times out or is canceled (absent from listings)",
                "items": {
                    "type": "object",
                    "required": ["index", "state"],
                    "properties": {
                        "index": {"type": "integer"},
                        "state": {"type": "string", "enum": ["pending", "done"]},
                        "mesh_glb": _ref("Artifact"),
                        "gaussian_ply": _ref("Artifact"),
                        "metadata": _ref("Metadata"),
                        "time_s": {"type": ["number", "null"]},
                    },
                },
            },
            "result": _ref("Result"),
            "links": _ref("Links"),
        },
    },
    "Accepted": {
        "type": "object",
        "required": ["id", "status", "links"],
        "properties": {
            "id": {"type": "string"},
            "status": {"type": "string"},
            "links": _ref("Links"),
        },
    },
    "JobList": {
        "type": "object",
        "properties": {"jobs": {"type": "array", "items": _ref("Job")}, "next": NULLABLE_STR},
    },
    "Options": _options_schema(),
    "MaskInput": {
        "description": "Masks in any supported format: binary (H,W)/(N,H,W) nested lists, base64 "
        "PNG(s), COCO flat polygon(s), points polygon(s), RLE dict(s) with string or list counts, "
        "or a whole COCO dataset (choose the image with image_id or file_name).",
    },
    "Prompts": {
        "description": "Instead of mask_input: one entry per object, for the worker's segmenter "
        "(GET /v1/backends). Pixels of the upright image (EXIF applied).",
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "box": {
                    "type": "array",
                    "items": {"type": "number"},
                    "minItems": 4,
                    "maxItems": 4,
                    "description": "x0, y0, x1, y1",
                },
                "points": {
                    "type": "array",
                    "items": {"type": "array", "minItems": 3, "maxItems": 3},
                    "description": "[x, y, 1 (on the object) | 0 (off it)], ...",
                },
                "text": {"type": "string", "description": "every instance found (sam3 only)"},
                "max_objects": {"type": "integer", "minimum": 1},
                "min_score": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5},
            },
        },
    },
    "JsonSubmission": {
        "type": "object",
        "required": ["image"],
        "description": "mask_input or prompts, exactly one",
        "additionalProperties": False,
        "properties": {
            "image": {
                "type": "object",
                "required": ["type", "value"],
                "properties": {
                    "type": {"type": "string", "enum": ["base64", "url", "key"]},
                    "value": {
                        "type": "string",
                        "description": "base64 bytes, an http(s) URL, or a key from /v1/uploads",
                    },
                },
            },
            "webhook_url": {"type": "string", "description": "POSTed, signed, when the job ends"},
            "mask_input": _ref("MaskInput"),
            "prompts": _ref("Prompts"),
            "mask_format": {"type": "string", "enum": list(MASK_FORMATS)},
            "options": _ref("Options"),
            "image_id": {"type": "integer"},
            "file_name": {"type": "string"},
            "depth": _ref("Blob"),
            "pointmap": _ref("Blob"),
            "intrinsics": _ref("Intrinsics"),
        },
    },
    "Blob": {
        "type": "object",
        "required": ["type", "value"],
        "description": "depth: 16-bit PNG (millimetres) or float .npy (H,W) metres; pointmap: "
        "float .npy (H,W,3) metres, OpenCV camera frame. The upright image's size; 0 = no "
        "reading. Needs intrinsics.",
        "properties": {
            "type": {"type": "string", "enum": ["base64", "url"]},
            "value": {"type": "string"},
        },
    },
    "Intrinsics": {
        "description": "pixels, pixel (i, j) covering [i, i+1) x [j, j+1): {fx, fy, cx, cy}, "
        "[fx, fy, cx, cy] or a 3x3 K",
        "oneOf": [
            {
                "type": "object",
                "required": ["fx", "fy", "cx", "cy"],
                "properties": {k: {"type": "number"} for k in ("fx", "fy", "cx", "cy")},
            },
            {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
            {"type": "array", "items": {"type": "array"}, "minItems": 3, "maxItems": 3},
        ],
    },
    "Sam3dInferRequest": {
        "type": "object",
        "required": ["image", "mask_input"],
        "description": "Roboflow's /sam3_3d/infer request (inference-sdk sam3_3d_infer); "
        "unknown fields are ignored",
        "properties": {
            "image": {
                "type": "object",
                "properties": {
                    "type": {"type": "string", "enum": ["base64", "url"]},
                    "value": {"type": "string"},
                },
            },
            "mask_input": _ref("MaskInput"),
            "model_id": {"type": "string", "enum": ["sam3-3d-objects"]},
            "api_key": {"type": ["string", "null"]},
            "output_meshes": {"type": "boolean", "default": True},
            "output_scene": {"type": "boolean", "default": True},
            "with_mesh_postprocess": {"type": "boolean", "default": True},
            "with_texture_baking": {"type": "boolean", "default": True},
            "use_distillations": {"type": "boolean", "default": False},
            "mask_format": {"type": "string", "enum": list(MASK_FORMATS)},
            "options": _ref("Options"),
            "image_id": {"type": "integer"},
            "file_name": {"type": "string"},
            "depth": _ref("Blob"),
            "pointmap": _ref("Blob"),
            "intrinsics": _ref("Intrinsics"),
        },
    },
    "Sam3dInferResponse": {
        "type": "object",
        "description": "Roboflow's response, plus job_id, camera, units, notes, links",
        "properties": {
            "mesh_glb": {"type": ["string", "null"], "description": "base64 scene GLB"},
            "gaussian_ply": {"type": ["string", "null"], "description": "base64 scene PLY"},
            "objects": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "mesh_glb": {"type": ["string", "null"]},
                        "gaussian_ply": {"type": ["string", "null"]},
                        "metadata": _ref("Metadata"),
                        "index": {"type": "integer"},
                    },
                },
            },
            "time": {"type": "number"},
            "job_id": {"type": "string"},
            "camera": {"type": ["object", "null"]},
            "units": {"type": "string", "enum": ["metres", "relative"]},
            "notes": {"type": "array", "items": {"type": "string"}},
            "links": _ref("Links"),
        },
    },
    "MultipartSubmission": {
        "type": "object",
        "required": ["image"],
        "properties": {
            "image": {"type": "string", "format": "binary", "description": "JPEG, PNG or WebP"},
            "mask_input": {"type": "string", "description": "JSON text, any mask format"},
            "prompts": {"type": "string", "description": "JSON text, see Prompts (no masks then)"},
            "mask": {
                "type": "array",
                "items": {"type": "string", "format": "binary"},
                "description": "PNG masks, one object each (after those of mask_input)",
            },
            "mask_format": {"type": "string", "enum": list(MASK_FORMATS)},
            "options": {"type": "string", "description": "JSON text, see Options"},
            "image_id": {"type": "integer"},
            "file_name": {"type": "string"},
            "webhook_url": {"type": "string"},
            "depth": {"type": "string", "format": "binary", "description": "see Blob"},
            "pointmap": {"type": "string", "format": "binary", "description": "see Blob"},
            "intrinsics": {"type": "string", "description": "JSON text, see Intrinsics"},
        },
    },
    "BatchRequest": {
        "type": "object",
        "required": ["jobs"],
        "properties": {
            "jobs": {"type": "array", "items": _ref("JsonSubmission"), "minItems": 1},
            "options": {"description": "defaults merged under each job's options"},
            "webhook_url": {"type": "string", "description": "POSTed once every job has ended"},
        },
    },
    "Batch": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "total": {"type": "integer"},
            "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
            "finished": {"type": "boolean"},
            "created_at": TIME,
            "completed_at": TIME,
            "webhook": {"type": ["object", "null"]},
            "jobs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "status": {"type": "string"},
                        "links": _ref("Links"),
                    },
                },
            },
        },
    },
    "Upload": {
        "type": "object",
        "properties": {
            "key": {"type": "string"},
            "bytes": {"type": "integer"},
            "width": {"type": "integer"},
            "height": {"type": "integer"},
        },
    },
}

JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
AUTH_ERRORS = {"401": _error("missing or invalid API key (only when keys are configured)")}
LIMIT_ERRORS = {
    "429": _error("rate_limited or too_many_in_flight for this key; see the Retry-After header")
}

PATHS = {
    "/v1/jobs": {
        "post": {
            "summary": "Submit a job",
            "operationId": "submitJob",
            "parameters": [
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "schema": {"type": "string", "maxLength": 255},
                    "description": "same key (per API key, 24 h) -> same job",
                }
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {"schema": _ref("MultipartSubmission")},
                    "application/json": {"schema": _ref("JsonSubmission")},
                },
            },
            "responses": {
                "202": {
                    "description": "queued",
                    "content": {"application/json": {"schema": _ref("Accepted")}},
                },
                "400": _error(
                    "invalid_request, invalid_image, invalid_mask, invalid_option, "
                    "unknown_backend, invalid_prompt"
                ),
                "413": _error("image_too_large, request_too_large"),
                "422": _error(
                    "mask_size_mismatch, empty_mask, too_many_masks, invalid_depth, "
                    "invalid_intrinsics, job_too_large, prompt_out_of_bounds, unsupported_prompt"
                ),
                "503": _error("the queue is unavailable"),
                **AUTH_ERRORS,
                **LIMIT_ERRORS,
            },
        },
        "get": {
            "summary": "List jobs, newest first",
            "operationId": "listJobs",
            "parameters": [
                {
                    "name": "status",
                    "in": "query",
                    "schema": {"type": "string", "enum": [s.value for s in JobStatus]},
                },
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                },
                {
                    "name": "cursor",
                    "in": "query",
                    "schema": {"type": "string"},
                    "description": "the previous page's next",
                },
            ],
            "responses": {
                "200": {
                    "description": "a page",
                    "content": {"application/json": {"schema": _ref("JobList")}},
                },
                "400": _error("bad status, limit or cursor"),
                **AUTH_ERRORS,
            },
        },
    },
    "/v1/jobs/{job_id}": {
        "parameters": [JOB_ID],
        "get": {
            "summary": "Status, progress and, when succeeded, every artifact with a signed URL",
            "operationId": "getJob",
            "responses": {
                "200": {
                    "description": "the job",
                    "content": {"application/json": {"schema": _ref("Job")}},
                },
                "404": _error("no such job (or not yours)"),
                **AUTH_ERRORS,
            },
        },
        "delete": {
            "summary": "Delete a job and its artifacts",
            "operationId": "deleteJob",
            "responses": {
                "204": {"description": "deleted"},
                "404": _error("no such job"),
                "409": _error("job_running: cancel it first"),
                **AUTH_ERRORS,
            },
        },
    },
    "/v1/jobs/{job_id}/cancel": {
        "parameters": [JOB_ID],
        "post": {
            "summary": "Cancel: queued jobs at once, running ones between objects",
            "operationId": "cancelJob",
            "responses": {
                "200": {
                    "description": "canceled",
                    "content": {"application/json": {"schema": _ref("Job")}},
                },
                "202": {
                    "description": "cancel requested; the job stops between objects",
                    "content": {"application/json": {"schema": _ref("Job")}},
                },
                "404": _error("no such job"),
                "409": _error("already_finished"),
                **AUTH_ERRORS,
            },
        },
    },
    "/sam3_3d/infer": {
        "post": {
            "summary": "Roboflow's SAM3-3D route: submit, wait, answer with the assets inline",
            "operationId": "sam3dInfer",
            "parameters": [
                {"name": "api_key", "in": "query", "schema": {"type": "string"}},
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "schema": {"type": "string", "maxLength": 255},
                    "description": "default: the body's SHA-256 (same body -> same job)",
                },
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("Sam3dInferRequest")}},
            },
            "responses": {
                "200": {
                    "description": "the job succeeded",
                    "content": {"application/json": {"schema": _ref("Sam3dInferResponse")}},
                },
                "400": _error("invalid_request, invalid_image, invalid_mask, invalid_option"),
                "409": _error("canceled"),
                "413": _error("image_too_large, request_too_large"),
                "422": _error(
                    "mask_size_mismatch, empty_mask, too_many_masks, invalid_depth, "
                    "invalid_intrinsics"
                ),
                "500": _error("backend_failed, timeout, too_many_attempts (the job's own)"),
                "503": _error("out_of_memory (retry), unavailable"),
                "504": _error("still_running: send the same request again to keep waiting"),
                **AUTH_ERRORS,
                **LIMIT_ERRORS,
            },
        }
    },
    "/v1/uploads": {
        "post": {
            "summary": "Store an image once; name it in job specs as {type: key}",
            "operationId": "upload",
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {"file": {"type": "string", "format": "binary"}},
                        }
                    },
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            "responses": {
                "201": {
                    "description": "stored",
                    "content": {"application/json": {"schema": _ref("Upload")}},
                },
                "400": _error("invalid_image, invalid_request"),
                "413": _error("image_too_large"),
                **AUTH_ERRORS,
            },
        }
    },
    "/v1/uploads/{name}": {
        "parameters": [
            {
                "name": "name",
                "in": "path",
                "required": True,
                "description": "the last part of the upload's key",
                "schema": {"type": "string"},
            }
        ],
        "delete": {
            "summary": "Delete one of your uploaded images",
            "operationId": "deleteUpload",
            "responses": {
                "204": {"description": "deleted"},
                "404": _error("no such upload"),
                **AUTH_ERRORS,
            },
        },
    },
    "/v1/batches": {
        "post": {
            "summary": "Submit many jobs at once (bulk queue); all validated before any is made",
            "operationId": "createBatch",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("BatchRequest")}},
            },
            "responses": {
                "202": {"description": "queued"},
                "400": _error("invalid_request and the job codes, prefixed with jobs[i]"),
                "413": _error("image_too_large"),
                "422": _error(
                    "mask_size_mismatch, empty_mask, too_many_masks, invalid_depth, "
                    "invalid_intrinsics, job_too_large"
                ),
                **AUTH_ERRORS,
                **LIMIT_ERRORS,
            },
        }
    },
    "/v1/batches/{batch_id}": {
        "get": {
            "summary": "Counts by status and a link to each job",
            "operationId": "getBatch",
            "parameters": [
                {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": {
                    "description": "the batch",
                    "content": {"application/json": {"schema": _ref("Batch")}},
                },
                "404": _error("no such batch (or not yours)"),
                **AUTH_ERRORS,
            },
        }
    },
    "/files/{key}": {
        "get": {
            "summary": "A stored artifact (file:// storage), behind a signed expiring URL",
            "operationId": "getFile",
            "parameters": [
                {"name": "key", "in": "path", "required": True, "schema": {"type": "string"}},
                {"name": "expires", "in": "query", "required": True, "schema": {"type": "integer"}},
                {"name": "sig", "in": "query", "required": True, "schema": {"type": "string"}},
            ],
            "responses": {
                "200": {"description": "the file"},
                "403": _error("signed URL refused: expired, bad signature or malformed"),
                "404": _error("no such file"),
            },
        }
    },
    "/": {
        "get": {
            "summary": "The web page: submit a job, watch it, see the result in 3D",
            "operationId": "webPage",
            "security": [{}],
            "responses": {
                "200": {"description": "the page", "content": {"text/html": {}}},
                "503": {
                    "description": "the page is not built: run make install",
                    "content": {"text/html": {}},
                },
            },
        }
    },
    "/v1/backends": {
        "get": {
            "summary": "The 3D backends and segmenters (and the prompts each reads), and what "
            "the live workers run",
            "operationId": "listBackends",
            "responses": {"200": {"description": "backends, segmenters, workers"}},
        }
    },
    "/healthz": {
        "get": {
            "summary": "Liveness",
            "operationId": "healthz",
            "responses": {"200": {"description": "the process is up"}},
        }
    },
    "/readyz": {
        "get": {
            "summary": "Readiness: Redis, storage and at least one live worker",
            "operationId": "readyz",
            "responses": {
                "200": {"description": "ready"},
                "503": {"description": "not ready; see checks"},
            },
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics",
            "operationId": "metrics",
            "responses": {"200": {"description": "text exposition format"}},
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "operationId": "openapi",
            "responses": {"200": {"description": "OpenAPI 3.1"}},
        }
    },
}

SPEC = {
    "openapi": "3.1.0",
    "info": {
        "title": "sam3d-jobs",
        "version": "1",
        "description": "Image + object masks in, 3D assets out (GLB meshes, Gaussian-splat PLYs, "
        "a posed scene). Submit, poll, download through signed URLs.",
    },
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
    "security": [{}, {"bearer": []}],
    "paths": PATHS,
}


@bp.get("/openapi.json")
def openapi():
    return jsonify(SPEC)
