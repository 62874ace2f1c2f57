"""One error type for every failure a caller can cause or meet, each with a stable code."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable, documented error codes. Never rename one: clients match on them."""

    INVALID_IMAGE = "invalid_image"
    IMAGE_TOO_LARGE = "image_too_large"
    INVALID_MASK = "invalid_mask"
    MASK_SIZE_MISMATCH = "mask_size_mismatch"
    EMPTY_MASK = "empty_mask"
    TOO_MANY_MASKS = "too_many_masks"
    INVALID_OPTION = "invalid_option"
    UNKNOWN_BACKEND = "unknown_backend"
    INVALID_REQUEST = "invalid_request"
    INVALID_DEPTH = "invalid_depth"
    INVALID_INTRINSICS = "invalid_intrinsics"
    BACKEND_FAILED = "backend_failed"
    OUT_OF_MEMORY = "out_of_memory"
    PREFLIGHT_FAILED = "preflight_failed"
    JOB_TOO_LARGE = "job_too_large"
    # Prompts (boxes, points, text) instead of masks: jobs/prompts.py, worker/segmenters/.
    INVALID_PROMPT = "invalid_prompt"
    PROMPT_OUT_OF_BOUNDS = "prompt_out_of_bounds"
    UNSUPPORTED_PROMPT = "unsupported_prompt"
    UNKNOWN_SEGMENTER = "unknown_segmenter"
    NO_OBJECTS_FOUND = "no_objects_found"
    # A dependency (Redis, storage, the queue) is away: 503 with Retry-After.
    UNAVAILABLE = "unavailable"


# Codes a client may retry unchanged: the failure was the service's, not the input's.
RETRYABLE = frozenset({ErrorCode.BACKEND_FAILED, ErrorCode.OUT_OF_MEMORY, ErrorCode.UNAVAILABLE})


class Sam3dError(Exception):
    """A failure with a stable ``code`` and a one-line human ``message``."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code.value, "message": self.message, "retryable": self.retryable}

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"
