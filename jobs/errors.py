"""One error type for every failure a caller can cause or meet, and the one registry of codes.

Every code the service answers with (in an HTTP error body or in a failed job's ``error``)
is an :class:`ErrorCode` with an entry in :data:`ERRORS`: its HTTP status, whether the same
request may succeed when sent again, and one line saying when it happens. The API maps
errors to statuses through this table only, and the README's table of codes is generated
from it (``python -m jobs.errors``; ``tests/test_errors.py`` checks it is current).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from jobs.references import rewrite_section, section

# Seconds a client is told to wait when a dependency (Redis, storage, the queue) is away.
RETRY_AFTER_S = 5


class ErrorCode(StrEnum):
    """Stable, documented error codes. Never rename one: clients match on them."""

    # -- the request
    INVALID_REQUEST = "invalid_request"
    BAD_REQUEST = "bad_request"
    INVALID_IMAGE = "invalid_image"
    INVALID_MASK = "invalid_mask"
    INVALID_OPTION = "invalid_option"
    UNKNOWN_BACKEND = "unknown_backend"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    ALREADY_FINISHED = "already_finished"
    JOB_RUNNING = "job_running"
    CONFLICT = "conflict"
    CANCELED = "canceled"
    REQUEST_TIMEOUT = "request_timeout"
    IMAGE_TOO_LARGE = "image_too_large"
    REQUEST_TOO_LARGE = "request_too_large"
    URI_TOO_LONG = "uri_too_long"
    EXPECTATION_FAILED = "expectation_failed"
    REQUEST_HEADER_FIELDS_TOO_LARGE = "request_header_fields_too_large"
    RANGE_NOT_SATISFIABLE = "requested_range_not_satisfiable"
    MASK_SIZE_MISMATCH = "mask_size_mismatch"
    EMPTY_MASK = "empty_mask"
    TOO_MANY_MASKS = "too_many_masks"
    INVALID_DEPTH = "invalid_depth"
    INVALID_INTRINSICS = "invalid_intrinsics"
    JOB_TOO_LARGE = "job_too_large"
    IDEMPOTENCY_MISMATCH = "idempotency_mismatch"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_IN_FLIGHT = "too_many_in_flight"
    # -- the service
    INTERNAL_ERROR = "internal_error"
    UNAVAILABLE = "unavailable"
    STILL_RUNNING = "still_running"
    NOT_IMPLEMENTED = "not_implemented"
    # -- a job's own failure (in ``error`` of a failed job; the sync route answers with it)
    BACKEND_FAILED = "backend_failed"
    OUT_OF_MEMORY = "out_of_memory"
    TIMEOUT = "timeout"
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    PREFLIGHT_FAILED = "preflight_failed"
    # Prompts (boxes, points, text) instead of masks: jobs/prompts.py, worker/segmenters/.
    INVALID_PROMPT = "invalid_prompt"
    PROMPT_OUT_OF_BOUNDS = "prompt_out_of_bounds"
    UNSUPPORTED_PROMPT = "unsupported_prompt"
    UNKNOWN_SEGMENTER = "unknown_segmenter"
    NO_OBJECTS_FOUND = "no_objects_found"


@dataclass(frozen=True)
class ErrorSpec:
    """What a code means to a client: the HTTP status, whether to retry, when it happens."""

    status: int
    retryable: bool
    when: str
    # Seconds for the Retry-After header, where the answer always carries one.
    retry_after: int | None = None


E = ErrorCode
ERRORS: dict[ErrorCode, ErrorSpec] = {
    E.INVALID_REQUEST: ErrorSpec(
        400,
        False,
        "the request is malformed: unknown or missing fields, bad JSON (also `NaN`, "
        "`Infinity`, `1e400`, nesting deeper than 64), a bad `limit` or cursor",
    ),
    E.BAD_REQUEST: ErrorSpec(400, False, "HTTP the server cannot parse (from the HTTP layer)"),
    E.INVALID_IMAGE: ErrorSpec(400, False, "the image cannot be read, fetched or decoded"),
    E.INVALID_MASK: ErrorSpec(400, False, "the masks cannot be read in any known format"),
    E.INVALID_OPTION: ErrorSpec(400, False, "an option is unknown or out of range"),
    E.UNKNOWN_BACKEND: ErrorSpec(400, False, "no such backend"),
    E.UNAUTHORIZED: ErrorSpec(
        401, False, "API keys are on and the key is missing or unknown (with WWW-Authenticate)"
    ),
    E.FORBIDDEN: ErrorSpec(403, False, "a signed URL was tampered with or has expired"),
    E.NOT_FOUND: ErrorSpec(
        404, False, "no such job, batch, upload, file or route (also another key's job)"
    ),
    E.METHOD_NOT_ALLOWED: ErrorSpec(
        405, False, "the route does not take this method (with `Allow`)"
    ),
    E.ALREADY_FINISHED: ErrorSpec(409, False, "cancel of a job that has already finished"),
    E.JOB_RUNNING: ErrorSpec(409, False, "delete of a running job: cancel it first"),
    E.CONFLICT: ErrorSpec(409, True, "a request with the same `Idempotency-Key` is in progress"),
    E.CANCELED: ErrorSpec(409, False, "the job was canceled (`POST /sam3_3d/infer`)"),
    E.REQUEST_TIMEOUT: ErrorSpec(
        408, True, "the request body stalled for `SAM3D_BODY_TIMEOUT_S` (no proxy in front)"
    ),
    E.IMAGE_TOO_LARGE: ErrorSpec(413, False, "the image is over the byte or pixel limit"),
    E.REQUEST_TOO_LARGE: ErrorSpec(413, False, "the request body is over the body limit"),
    E.URI_TOO_LONG: ErrorSpec(414, False, "the request line is over the HTTP layer's limit"),
    E.RANGE_NOT_SATISFIABLE: ErrorSpec(416, False, "a `Range` outside the file (`/files/`)"),
    E.EXPECTATION_FAILED: ErrorSpec(417, False, "an `Expect` header the HTTP layer refuses"),
    E.MASK_SIZE_MISMATCH: ErrorSpec(422, False, "a mask's size is not the image's"),
    E.EMPTY_MASK: ErrorSpec(422, False, "a mask has no pixel set"),
    E.TOO_MANY_MASKS: ErrorSpec(422, False, "more masks than `SAM3D_MAX_MASKS`"),
    E.INVALID_DEPTH: ErrorSpec(422, False, "the depth map or pointmap cannot be used"),
    E.INVALID_INTRINSICS: ErrorSpec(422, False, "the intrinsics are missing or malformed"),
    E.JOB_TOO_LARGE: ErrorSpec(
        422,
        False,
        "the job's estimated output (options x objects) is over "
        "`SAM3D_MAX_JOB_OUTPUT_BYTES`; the message names the limit",
    ),
    E.IDEMPOTENCY_MISMATCH: ErrorSpec(
        422,
        False,
        "the `Idempotency-Key` was used for a different request (keys are bound to a digest "
        "of the request; a key whose job was deleted is free again)",
    ),
    E.RATE_LIMITED: ErrorSpec(429, True, "over the key's submit or upload rate (with Retry-After)"),
    E.TOO_MANY_IN_FLIGHT: ErrorSpec(429, True, "over the key's jobs in flight (with Retry-After)"),
    E.REQUEST_HEADER_FIELDS_TOO_LARGE: ErrorSpec(
        431, False, "too many headers, or one over the HTTP layer's limit"
    ),
    E.INTERNAL_ERROR: ErrorSpec(500, False, "a bug: the service log has the traceback"),
    E.NOT_IMPLEMENTED: ErrorSpec(
        501, False, "a transfer encoding or method the HTTP layer does not implement"
    ),
    E.UNAVAILABLE: ErrorSpec(
        503,
        True,
        "Redis, storage or the queue is away; nothing of the request is kept, send it again "
        "(the SDK does)",
        retry_after=RETRY_AFTER_S,
    ),
    E.STILL_RUNNING: ErrorSpec(
        504,
        True,
        "`POST /sam3_3d/infer` waited its limit; send it again to keep waiting",
        retry_after=1,
    ),
    E.BACKEND_FAILED: ErrorSpec(500, True, "the backend raised while generating (job error)"),
    E.OUT_OF_MEMORY: ErrorSpec(
        503, True, "the GPU ran out of memory (job error)", retry_after=RETRY_AFTER_S
    ),
    E.TIMEOUT: ErrorSpec(500, False, "the job ran past its time limit (job error)"),
    E.TOO_MANY_ATTEMPTS: ErrorSpec(
        500,
        False,
        "its workers died `SAM3D_MAX_ATTEMPTS` times: a poison job (job error)",
    ),
    E.PREFLIGHT_FAILED: ErrorSpec(
        500, False, "the machine cannot run the backend (weights, GPU memory)"
    ),
    E.INVALID_PROMPT: ErrorSpec(
        400,
        False,
        "`prompts` is malformed: not a list of box/points/text entries, or both "
        "`prompts` and `mask_input`, or neither",
    ),
    E.PROMPT_OUT_OF_BOUNDS: ErrorSpec(
        422, False, "a box or point lies outside the image, or a box is degenerate"
    ),
    E.UNSUPPORTED_PROMPT: ErrorSpec(
        422,
        False,
        "the segmenter cannot read this prompt (text needs `sam3`); the message "
        "names what is needed",
    ),
    E.UNKNOWN_SEGMENTER: ErrorSpec(400, False, "no such segmenter"),
    E.NO_OBJECTS_FOUND: ErrorSpec(
        422, False, "the segmenter found no object for the prompts (job error)"
    ),
}
del E


def spec(code: ErrorCode | str) -> ErrorSpec:
    """The registry entry of ``code`` (``ValueError`` for a code that is not ours)."""
    return ERRORS[ErrorCode(code)]


class Sam3dError(Exception):
    """A failure with a stable ``code`` and a one-line human ``message``.

    ``status`` and ``retryable`` come from the registry; ``retry_after`` (seconds) overrides
    the registry's Retry-After, ``headers`` adds response headers (``WWW-Authenticate``).
    """

    def __init__(
        self,
        code: ErrorCode | str,
        message: str,
        *,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.retry_after = retry_after
        self.headers = dict(headers or {})

    @property
    def spec(self) -> ErrorSpec:
        return ERRORS[self.code]

    @property
    def status(self) -> int:
        return self.spec.status

    @property
    def retryable(self) -> bool:
        return self.spec.retryable

    def response_headers(self) -> dict[str, str]:
        """Headers the HTTP answer carries: Retry-After where it applies, then ``headers``."""
        headers = {}
        retry_after = self.retry_after if self.retry_after is not None else self.spec.retry_after
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        headers.update(self.headers)
        return headers

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code.value, "message": self.message, "retryable": self.retryable}

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


def job_error(code: ErrorCode, message: str) -> dict[str, object]:
    """A failed job's ``error`` field for ``code``: its retryability from the registry."""
    return Sam3dError(code, message).to_dict()


def unavailable(what: str) -> Sam3dError:
    """503 ``unavailable`` with Retry-After: the request may be sent again unchanged."""
    return Sam3dError(ErrorCode.UNAVAILABLE, f"{what} is unavailable; retry later")


README_BEGIN = "<!-- error codes: generated by `python -m jobs.errors` from jobs/errors.py -->"
README_END = "<!-- end of error codes -->"


REFERENCE_FILE = "docs/api.md"  # where the generated table lives


def markdown_table() -> str:
    """The error reference (docs/api.md): every code, by HTTP status."""
    lines = ["| code | HTTP | retryable | when |", "|---|---|---|---|"]
    for code, entry in sorted(ERRORS.items(), key=lambda item: item[1].status):
        retry = "yes" if entry.retryable else "no"
        lines.append(f"| `{code.value}` | {entry.status} | {retry} | {entry.when} |")
    return "\n".join(lines)


def readme_section() -> str:
    return section(README_BEGIN, markdown_table(), README_END)


if __name__ == "__main__":
    rewrite_section(REFERENCE_FILE, README_BEGIN, README_END, markdown_table())
