"""``GET /openapi.json``: the API described in OpenAPI 3.1, every route and schema.

Generated, not copied: each route's error answers come from the error registry
(``jobs.errors``: the code's status, the codes the route can answer with, as an enum); the
submission, ``Options`` (the option tables of ``jobs.options`` for the backend this server
runs, ``SAM3D_BACKEND``), the job, the 202 answer and the error body are the JSON schemas of
the pydantic models in ``api.models``, the same models that validate a JSON submission, so the
document refuses what the server refuses.
``tests/test_conformance.py`` checks live answers against it.
"""

from __future__ import annotations

import copy
import functools

from flask import Blueprint, current_app, jsonify

from api.models import component_schemas, ref
from jobs.errors import ERRORS, ErrorCode
from jobs.masks import MASK_FORMATS
from jobs.records import JobStatus

bp = Blueprint("openapi", __name__)


def _json(description: str, schema: str) -> dict:
    """A response whose body is the JSON of component ``schema``."""
    return {"description": description, "content": {"application/json": {"schema": ref(schema)}}}


E = ErrorCode
# Every route may meet these: Redis or storage away (503), a bug (500).
SERVICE = (E.UNAVAILABLE, E.INTERNAL_ERROR)
AUTHED = (E.UNAUTHORIZED, *SERVICE)
# What a job submission (one job, or each job of a batch) can be refused with.
SUBMISSION = (
    E.INVALID_REQUEST,
    E.BAD_REQUEST,
    E.INVALID_IMAGE,
    E.INVALID_MASK,
    E.INVALID_OPTION,
    E.UNKNOWN_BACKEND,
    E.IMAGE_TOO_LARGE,
    E.REQUEST_TOO_LARGE,
    E.MASK_SIZE_MISMATCH,
    E.EMPTY_MASK,
    E.TOO_MANY_MASKS,
    E.INVALID_DEPTH,
    E.INVALID_INTRINSICS,
    E.JOB_TOO_LARGE,
    E.INVALID_PROMPT,
    E.PROMPT_OUT_OF_BOUNDS,
    E.UNSUPPORTED_PROMPT,
    E.RATE_LIMITED,
    E.TOO_MANY_IN_FLIGHT,
    E.CONFLICT,
    E.IDEMPOTENCY_MISMATCH,
)


def _errors(*codes: ErrorCode) -> dict:
    """The error responses of a route that answers with ``codes``, grouped by the registry's
    status; each one's ``code`` is an enum of exactly those codes."""
    by_status: dict[int, list[ErrorCode]] = {}
    for code in dict.fromkeys(codes):
        by_status.setdefault(ERRORS[code].status, []).append(code)
    responses = {}
    for status, group in sorted(by_status.items()):
        schema = {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string", "enum": [c.value for c in group]},
                        "message": {"type": "string"},
                    },
                }
            },
        }
        description = "; ".join(f"{c.value}: {ERRORS[c].when}" for c in group)
        responses[str(status)] = {
            "description": description,
            "content": {"application/json": {"schema": schema}},
        }
    return responses


# The one component no model gives: the multipart submission (form fields, files); every
# other is a model's own (api/models.py), added by build_spec.
SCHEMAS = {
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
}

JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}

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
                    "multipart/form-data": {"schema": ref("MultipartSubmission")},
                    "application/json": {"schema": ref("JsonSubmission")},
                },
            },
            "responses": {
                "202": _json("queued", "Accepted"),
                **_errors(*SUBMISSION, *AUTHED),
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
                "200": _json("a page", "JobList"),
                **_errors(E.INVALID_REQUEST, *AUTHED),
            },
        },
    },
    "/v1/jobs/{job_id}": {
        "parameters": [JOB_ID],
        "get": {
            "summary": "Status, progress and, when succeeded, every artifact with a signed URL",
            "operationId": "getJob",
            "responses": {
                "200": _json("the job", "Job"),
                **_errors(E.NOT_FOUND, *AUTHED),
            },
        },
        "delete": {
            "summary": "Delete a job and its artifacts",
            "operationId": "deleteJob",
            "responses": {
                "204": {"description": "deleted"},
                **_errors(E.NOT_FOUND, E.JOB_RUNNING, *AUTHED),
            },
        },
    },
    "/v1/jobs/{job_id}/cancel": {
        "parameters": [JOB_ID],
        "post": {
            "summary": "Cancel: queued jobs at once, running ones between objects",
            "operationId": "cancelJob",
            "responses": {
                "200": _json("canceled", "Job"),
                "202": _json("cancel requested; the job stops between objects", "Job"),
                **_errors(E.NOT_FOUND, E.ALREADY_FINISHED, *AUTHED),
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
                "content": {"application/json": {"schema": ref("Sam3dInferRequest")}},
            },
            "responses": {
                "200": _json("the job succeeded", "Sam3dInferResponse"),
                # The submission's codes, then the job's own when it ends without assets.
                **_errors(
                    *SUBMISSION,
                    *AUTHED,
                    E.NOT_FOUND,
                    E.CANCELED,
                    E.BACKEND_FAILED,
                    E.OUT_OF_MEMORY,
                    E.TIMEOUT,
                    E.TOO_MANY_ATTEMPTS,
                    E.PREFLIGHT_FAILED,
                    E.STILL_RUNNING,
                ),
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
                "201": _json("stored", "Upload"),
                **_errors(
                    E.INVALID_REQUEST,
                    E.BAD_REQUEST,
                    E.INVALID_IMAGE,
                    E.IMAGE_TOO_LARGE,
                    E.REQUEST_TOO_LARGE,
                    E.RATE_LIMITED,
                    *AUTHED,
                ),
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
                **_errors(E.NOT_FOUND, *AUTHED),
            },
        },
    },
    "/v1/batches": {
        "post": {
            "summary": "Submit many jobs at once (bulk queue); all validated before any is made",
            "operationId": "createBatch",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ref("BatchRequest")}},
            },
            "responses": {
                "202": _json("queued", "BatchAccepted"),
                # A job's codes carry its index in the message: "jobs[i]: ...".
                **_errors(*SUBMISSION, *AUTHED),
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
                "200": _json("the batch", "Batch"),
                **_errors(E.NOT_FOUND, *AUTHED),
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
                **_errors(E.FORBIDDEN, E.NOT_FOUND, E.RANGE_NOT_SATISFIABLE, *SERVICE),
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
            "responses": {
                "200": {
                    "description": "the process is up",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["status"],
                                "properties": {"status": {"const": "ok"}},
                            }
                        }
                    },
                }
            },
        }
    },
    "/readyz": {
        "get": {
            "summary": "Readiness: Redis, storage and at least one live worker",
            "operationId": "readyz",
            "responses": {
                "200": _json("ready", "Ready"),
                "503": _json("not ready; see checks", "Ready"),
            },
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics",
            "operationId": "metrics",
            "responses": {
                "200": {"description": "text exposition format", "content": {"text/plain": {}}}
            },
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "operationId": "openapi",
            "responses": {
                "200": {
                    "description": "OpenAPI 3.1",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
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


del E


@functools.cache
def build_spec(backend: str | None = None) -> dict:
    """The document for a server running ``backend`` (its options only)."""
    spec = copy.deepcopy(SPEC)
    spec["components"]["schemas"].update(copy.deepcopy(component_schemas(backend)))
    if backend is not None:
        spec["info"]["description"] += f" This server's backend: {backend}."
    return spec


@bp.get("/openapi.json")
def openapi():
    return jsonify(build_spec(current_app.config["SETTINGS"].backend))
