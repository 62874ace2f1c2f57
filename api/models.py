"""Pydantic models of the JSON API: the job submission body, the options of each backend, the
job view, the 202 answer and the error body. The same models validate the JSON submission's
envelope (``parse_json_body``) and give ``/openapi.json`` its component schemas
(``component_schemas``), so the document cannot drift from what the server checks.

What needs the image or the server's settings (masks, prompts against the image's size, option
ranges, intrinsics, webhook URLs) is checked after the envelope by the shared functions of
``jobs/`` and ``api.submit``, which multipart submissions go through as well; the models
describe those fields, and ``Options`` is generated from the option tables of ``jobs.options``.
"""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    SkipValidation,
    StrictStr,
    ValidationError,
    WithJsonSchema,
    create_model,
)
from pydantic.json_schema import GenerateJsonSchema, models_json_schema

from jobs.depth import KINDS as DEPTH_KINDS
from jobs.errors import ErrorCode, Sam3dError
from jobs.masks import MASK_FORMATS
from jobs.options import BACKEND_OPTIONS, COMMON_OPTIONS, Option
from jobs.prompts import DEFAULT_MIN_SCORE, MAX_POINTS, MAX_TEXT_CHARS
from jobs.queue import QUEUES
from jobs.records import JobStatus

REF_TEMPLATE = "#/components/schemas/{model}"


def ref(name: str) -> dict[str, str]:
    """A reference to the component schema ``name``."""
    return {"$ref": REF_TEMPLATE.format(model=name)}


class DocSchema(GenerateJsonSchema):
    """Pydantic's JSON schema without a title on every property (the names say it)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def _described(schema: dict[str, Any], *, nullable: bool = False) -> Any:
    """A field validated later (by ``jobs/``), documented as ``schema`` here (or null: the
    field's default, the same as leaving it out)."""
    if nullable:
        schema = {"anyOf": [schema, {"type": "null"}]}
    return Annotated[Any, WithJsonSchema(schema)]


# -- errors -------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: ErrorCode
    message: str


class Error(BaseModel):
    """Every error answer: a stable code (the registry's) and a one-line message."""

    error: ErrorDetail


# -- the job view -------------------------------------------------------------------------


class Links(BaseModel):
    self: str | None = None
    cancel: str | None = None


class Accepted(BaseModel):
    """The 202 answer to a submission."""

    id: str
    status: str
    links: Links


class JobError(BaseModel):
    code: str | None = None
    message: str | None = None
    retryable: bool | None = None


class Artifact(BaseModel):
    url: str = Field(description="signed URL, minted fresh on every GET")
    expires_at: datetime
    bytes: int
    content_type: str


Floats = list[float]


class Metadata(BaseModel):
    """Pose of the object. rotation/translation/scale exactly as SAM 3D reports them (w,x,y,z;
    PyTorch3D camera; row vectors; Z-up object); matrix: 4x4 row-major, column vectors,
    per-object GLB local frame -> scene (OpenGL camera)."""

    rotation: Annotated[Floats, Field(min_length=4, max_length=4)] | None = None
    translation: Annotated[Floats, Field(min_length=3, max_length=3)] | None = None
    scale: Annotated[Floats, Field(min_length=3, max_length=3)] | None = None
    matrix: list[Floats] | None = None


class SceneFiles(BaseModel):
    mesh_glb: Artifact | None = None
    gaussian_ply: Artifact | None = None


class ResultObject(SceneFiles):
    index: int
    metadata: Metadata | None = None


class Result(BaseModel):
    time: float | None = Field(None, description="seconds the worker spent on the job")
    scene: SceneFiles | None = None
    objects: list[ResultObject] | None = None
    manifest: Artifact | None = None
    camera: dict[str, Any] | None = None
    units: Literal["metres", "relative"] | None = Field(
        None, description="metres when the job had a depth map or pointmap"
    )
    timings: dict[str, Any] | None = None


class Progress(BaseModel):
    objects_done: int | None = None
    objects_total: int | None = None


class JobObject(SceneFiles):
    index: int
    state: Literal["pending", "done"]
    metadata: Metadata | None = None
    time_s: float | None = None


class Job(BaseModel):
    """A job: status, progress and, when succeeded, every artifact with a signed URL."""

    id: str
    status: JobStatus
    stage: str
    progress: Progress
    queue: Literal[QUEUES] | None = None  # type: ignore[valid-type]
    queue_position: int | None = Field(None, description="0 = next; null unless queued")
    attempts: int | None = None
    cancel_requested: bool | None = None
    created_at: datetime | None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    options: dict[str, Any] | None = None
    batch_id: str | None = None
    webhook: dict[str, Any] | None = Field(
        None, description="url, state (pending, retrying, delivered, failed), attempts"
    )
    error: JobError | None
    objects: list[JobObject] | None = Field(
        None,
        description="every object with its state; a done object's files are stored and listed "
        "as soon as it finishes, and kept if the job then fails, times out or is canceled "
        "(absent from listings)",
    )
    result: Result | None
    links: Links | None = None


class JobList(BaseModel):
    """A page of jobs, newest first."""

    jobs: list[Job]
    next: str | None = Field(None, description="the cursor of the next page; null on the last")


class Upload(BaseModel):
    """A stored image, to name in job specs as ``{"type": "key", "value": key}``."""

    key: str
    bytes: int
    width: int
    height: int


class Ready(BaseModel):
    ready: bool
    checks: dict[str, Any]


class BatchJobLink(BaseModel):
    id: str
    links: Links


class BatchLinks(BaseModel):
    self: str | None = None


class BatchAccepted(BaseModel):
    """The 202 answer to a batch."""

    id: str
    status: Literal["queued"]
    jobs: list[BatchJobLink]
    links: BatchLinks


class BatchJob(BaseModel):
    id: str | None = None
    status: str | None = None
    links: Links | None = None


class Batch(BaseModel):
    """Counts by status and a link to each job."""

    id: str | None = None
    total: int | None = None
    counts: dict[str, int] | None = None
    finished: bool | None = None
    created_at: datetime | None = None
    completed_at: datetime | None = None
    webhook: dict[str, Any] | None = None
    jobs: list[BatchJob] | None = None
    links: BatchLinks | None = None


# -- the submission -----------------------------------------------------------------------


class ImageRef(BaseModel):
    type: Literal["base64", "url", "key"]
    value: StrictStr = Field(
        min_length=1, description="base64 bytes, an http(s) URL, or a key from /v1/uploads"
    )


class Blob(BaseModel):
    """depth: 16-bit PNG (millimetres) or float .npy (H,W) metres; pointmap: float .npy
    (H,W,3) metres, OpenCV camera frame. The upright image's size; 0 = no reading. Needs
    intrinsics."""

    type: Literal["base64", "url"]
    value: StrictStr = Field(min_length=1)


class Prompt(BaseModel):
    """One object: a box, points (or both), or a text for every instance found (sam3 only).
    Checked against the image (``jobs.prompts.parse_prompts``)."""

    model_config = ConfigDict(extra="forbid")

    box: Annotated[Floats, Field(min_length=4, max_length=4)] | None = Field(
        None, description="x0, y0, x1, y1"
    )
    points: (
        Annotated[
            list[Annotated[Floats, Field(min_length=3, max_length=3)]],
            Field(min_length=1, max_length=MAX_POINTS),
        ]
        | None
    ) = Field(None, description="[x, y, 1 (on the object) | 0 (off it)], ...")
    text: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)] | None = Field(
        None, description="every instance found (sam3 only)"
    )
    max_objects: Annotated[int, Field(ge=1)] | None = None
    min_score: Annotated[float, Field(ge=0, le=1)] = DEFAULT_MIN_SCORE


class Prompts(RootModel[Annotated[list[Prompt], Field(min_length=1)]]):
    """Instead of mask_input: one entry per object, for the worker's segmenter
    (GET /v1/backends). Pixels of the upright image (EXIF applied)."""


class MaskInput(RootModel[Any]):
    """Masks in any supported format: binary (H,W)/(N,H,W) nested lists, base64 PNG(s), COCO
    flat polygon(s), points polygon(s), RLE dict(s) with string or list counts, or a whole COCO
    dataset (choose the image with image_id or file_name)."""


class CameraIntrinsics(BaseModel):
    fx: float
    fy: float
    cx: float
    cy: float


class Intrinsics(
    RootModel[
        CameraIntrinsics
        | Annotated[Floats, Field(min_length=4, max_length=4)]
        | Annotated[list[list[float]], Field(min_length=3, max_length=3)]
    ]
):
    """pixels, pixel (i, j) covering [i, i+1) x [j, j+1): {fx, fy, cx, cy}, [fx, fy, cx, cy]
    or a 3x3 K"""


def _image_id_input(value: Any) -> Any:
    if isinstance(value, bool):  # JSON's true is no image id
        raise ValueError("a boolean")
    return None if value == "" else value  # an empty form field: none


# Fields under SkipValidation are checked after the envelope, by the functions multipart
# submissions go through too (they need the image, the segmenter or the backend's tables):
# passed on as sent, never copied (masks can be large).
class JsonSubmission(BaseModel):
    """mask_input or prompts, exactly one."""

    model_config = ConfigDict(extra="forbid")

    image: ImageRef
    webhook_url: _described({"type": "string"}, nullable=True) = Field(
        None, description="POSTed, signed, when the job ends"
    )
    mask_input: SkipValidation[MaskInput | None] = None
    prompts: SkipValidation[Prompts | None] = None
    mask_format: Literal[MASK_FORMATS] | None = None  # type: ignore[valid-type]
    options: SkipValidation[dict[str, Any] | None] = None  # per backend: submission_model
    image_id: Annotated[int | None, BeforeValidator(_image_id_input)] = None
    file_name: StrictStr | None = None
    depth: Blob | None = None
    pointmap: Blob | None = None
    intrinsics: SkipValidation[Intrinsics | None] = None


# The envelope's faults as the codes and messages the API has always answered with, checked
# in this order (the first faulty field wins, as when each was checked in turn).
def _blob_errors(kind: str) -> dict[str, tuple[ErrorCode, str]]:
    return {
        kind: (
            ErrorCode.INVALID_REQUEST,
            f'"{kind}" must be {{"type": "base64" | "url", "value": ...}}',
        ),
        f"{kind}.value": (ErrorCode.INVALID_REQUEST, f'"{kind}.value" must be a non-empty string'),
    }


_FIELD_ERRORS: dict[str, tuple[ErrorCode, str]] = {
    "file_name": (ErrorCode.INVALID_REQUEST, "file_name must be a string"),
    "image": (
        ErrorCode.INVALID_REQUEST,
        '"image" must be {"type": "base64" | "url" | "key", "value": ...}',
    ),
    "image.value": (ErrorCode.INVALID_REQUEST, '"image.value" must be a non-empty string'),
    "image_id": (ErrorCode.INVALID_REQUEST, "image_id must be an integer"),
    **{where: error for kind in DEPTH_KINDS for where, error in _blob_errors(kind).items()},
    "mask_format": (ErrorCode.INVALID_MASK, "unknown mask_format {value!r}; one of {formats}"),
}


def _refusal(exc: ValidationError, body: dict[str, Any]) -> Sam3dError:
    errors = exc.errors()
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        return Sam3dError(ErrorCode.INVALID_REQUEST, f"unknown field(s): {', '.join(unknown)}")
    faults = set()
    for e in errors:
        field = str(e["loc"][0])
        faults.add(f"{field}.value" if e["loc"][1:2] == ("value",) else field)
    for where, (code, message) in _FIELD_ERRORS.items():
        if where in faults:
            if where == "mask_format":
                message = message.format(
                    value=body.get("mask_format"), formats=", ".join(MASK_FORMATS)
                )
            return Sam3dError(code, message)
    return Sam3dError(ErrorCode.INVALID_REQUEST, f"invalid job: {errors[0]['msg']}")


def parse_json_body(body: Any, backend: str) -> JsonSubmission:
    """A JSON job's envelope for a server running ``backend``, validated; every fault a
    ``Sam3dError`` with its stable code."""
    if not isinstance(body, dict):
        raise Sam3dError(ErrorCode.INVALID_REQUEST, "a job must be a JSON object")
    try:
        return submission_model(backend).model_validate(body)
    except ValidationError as exc:
        raise _refusal(exc, body) from None


class BatchRequest(BaseModel):
    """Many jobs at once (bulk queue); all validated before any is made."""

    model_config = ConfigDict(extra="forbid")

    # Each job is checked as one POST /v1/jobs body, its faults prefixed with "jobs[i]: "
    # (and the list itself by parse_batch_body: a skipped list keeps its items' reference).
    jobs: SkipValidation[Annotated[list[JsonSubmission], Field(min_length=1)]]
    options: SkipValidation[dict[str, Any] | None] = Field(
        None, description="defaults merged under each job's options"
    )
    webhook_url: _described({"type": "string"}, nullable=True) = Field(
        None, description="POSTed once every job has ended"
    )


def parse_batch_body(body: Any, backend: str) -> BatchRequest:
    """A batch's envelope for a server running ``backend`` (its jobs are checked one by
    one, as job bodies); every fault a ``Sam3dError`` with its stable code."""
    if not isinstance(body, dict) or not isinstance(body.get("jobs"), list) or not body["jobs"]:
        raise Sam3dError(
            ErrorCode.INVALID_REQUEST, 'send {"jobs": [job, ...]} with at least one job'
        )
    try:
        return batch_model(backend).model_validate(body)
    except ValidationError as exc:
        raise _refusal(exc, body) from None


class InferImage(BaseModel):
    type: Literal["base64", "url"] | None = None
    value: str | None = None


class Sam3dInferRequest(BaseModel):
    """Roboflow's /sam3_3d/infer request (inference-sdk sam3_3d_infer); unknown fields are
    ignored. Read by ``api.roboflow``, which turns it into a job body."""

    image: InferImage
    mask_input: SkipValidation[MaskInput]
    model_id: Literal["sam3-3d-objects"] | None = None
    api_key: str | None = None
    output_meshes: bool = True
    output_scene: bool = True
    with_mesh_postprocess: bool = True
    with_texture_baking: bool = True
    use_distillations: bool = False
    mask_format: Literal[MASK_FORMATS] | None = None  # type: ignore[valid-type]
    options: SkipValidation[dict[str, Any] | None] = None  # per backend: infer_model
    image_id: int | None = None
    file_name: str | None = None
    depth: Blob | None = None
    pointmap: Blob | None = None
    intrinsics: SkipValidation[Intrinsics | None] = None


class InferObject(BaseModel):
    mesh_glb: str | None = None
    gaussian_ply: str | None = None
    metadata: Metadata | None = None
    index: int | None = None


class Sam3dInferResponse(BaseModel):
    """Roboflow's response, plus job_id, camera, units, notes, links."""

    mesh_glb: str | None = Field(None, description="base64 scene GLB")
    gaussian_ply: str | None = Field(None, description="base64 scene PLY")
    objects: list[InferObject] | None = None
    time: float | None = None
    job_id: str | None = None
    camera: dict[str, Any] | None = None
    units: Literal["metres", "relative"] | None = None
    notes: list[str] | None = None
    links: Links | None = None


# -- options, per backend -----------------------------------------------------------------


def _option_field(option: Option) -> tuple[Any, Any]:
    """``option`` as a pydantic field: its type, range, choices, default and meaning."""
    if option.schema is not None:
        kind: Any = _described(option.schema)
    elif option.choices:
        kind = Literal[option.choices]  # type: ignore[valid-type]
    else:
        kind = option.kind
    return kind, Field(option.default, description=option.doc, ge=option.low, le=option.high)


@functools.cache
def options_model(backend: str | None = None) -> type[BaseModel]:
    """``Options`` for ``backend``: the common options and its own, from the tables of
    ``jobs.options`` (every backend's when ``backend`` is None). ``parse_options`` checks
    them, with the tables' messages."""
    tables = BACKEND_OPTIONS.values() if backend is None else [BACKEND_OPTIONS.get(backend, ())]
    options = COMMON_OPTIONS + tuple(o for table in tables for o in table)
    return create_model(
        "Options",
        __config__=ConfigDict(extra="forbid"),
        __doc__=f"The options of a job ({backend or 'every backend'}'s and the common ones).",
        priority=(
            Literal[QUEUES],  # type: ignore[valid-type]
            Field(QUEUES[0], description="queue: interactive (default) or bulk"),
        ),
        **{o.name: _option_field(o) for o in options},
    )


@functools.cache
def submission_model(backend: str | None = None) -> type[JsonSubmission]:
    """``JsonSubmission`` with ``backend``'s ``Options``."""
    return create_model(
        "JsonSubmission",
        __base__=JsonSubmission,
        __doc__=JsonSubmission.__doc__,
        options=(SkipValidation[options_model(backend) | None], None),
    )


@functools.cache
def batch_model(backend: str | None = None) -> type[BatchRequest]:
    """``BatchRequest`` with ``backend``'s ``JsonSubmission`` and ``Options``."""
    return create_model(
        "BatchRequest",
        __base__=BatchRequest,
        __doc__=BatchRequest.__doc__,
        jobs=(
            SkipValidation[Annotated[list[submission_model(backend)], Field(min_length=1)]],
            ...,
        ),
        options=(
            SkipValidation[options_model(backend) | None],
            Field(None, description="defaults merged under each job's options"),
        ),
    )


@functools.cache
def infer_model(backend: str | None = None) -> type[Sam3dInferRequest]:
    """``Sam3dInferRequest`` with ``backend``'s ``Options``."""
    return create_model(
        "Sam3dInferRequest",
        __base__=Sam3dInferRequest,
        __doc__=Sam3dInferRequest.__doc__,
        options=(SkipValidation[options_model(backend) | None], None),
    )


# -- the document's component schemas -----------------------------------------------------

RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    Error,
    Accepted,
    Job,
    JobList,
    Upload,
    Ready,
    BatchAccepted,
    Batch,
)


def document_models(backend: str | None = None) -> tuple[type[BaseModel], ...]:
    """Every model whose schema is a component of the document for ``backend`` (the models
    they nest are components too)."""
    per_backend = (infer_model, batch_model, submission_model, options_model)
    return (*RESPONSE_MODELS, Sam3dInferResponse, *(model(backend) for model in per_backend))


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema as the document has it (references to components)."""
    return model.model_json_schema(ref_template=REF_TEMPLATE, schema_generator=DocSchema)


@functools.cache
def component_schemas(backend: str | None = None) -> dict[str, dict[str, Any]]:
    """The component schemas the models give, nested models and enums included."""
    _, top = models_json_schema(
        [(m, "validation") for m in document_models(backend)],
        ref_template=REF_TEMPLATE,
        schema_generator=DocSchema,
    )
    return top["$defs"]
