"""The one place error codes become HTTP statuses. Every error body is
``{"error": {"code", "message"}}``."""

from __future__ import annotations

import redis
from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from jobs.errors import ErrorCode, Sam3dError
from jobs.storage import StorageError

# Seconds a client is told to wait when a dependency (Redis, storage, the queue) is away.
RETRY_AFTER_S = 5

STATUS = {
    ErrorCode.INVALID_IMAGE: 400,
    ErrorCode.IMAGE_TOO_LARGE: 413,
    ErrorCode.INVALID_MASK: 400,
    ErrorCode.MASK_SIZE_MISMATCH: 422,
    ErrorCode.EMPTY_MASK: 422,
    ErrorCode.TOO_MANY_MASKS: 422,
    ErrorCode.INVALID_OPTION: 400,
    ErrorCode.UNKNOWN_BACKEND: 400,
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.INVALID_DEPTH: 422,
    ErrorCode.INVALID_INTRINSICS: 422,
    ErrorCode.JOB_TOO_LARGE: 422,
    ErrorCode.INVALID_PROMPT: 400,
    ErrorCode.PROMPT_OUT_OF_BOUNDS: 422,
    ErrorCode.UNSUPPORTED_PROMPT: 422,
    ErrorCode.UNKNOWN_SEGMENTER: 400,
    ErrorCode.UNAVAILABLE: 503,
}


class ApiError(Exception):
    """An HTTP-level failure with a stable code (not found, unauthorized, conflict, ...)."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_response(status: int, code: str, message: str, headers: dict | None = None):
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def unavailable(what: str) -> ApiError:
    """503 ``unavailable`` with Retry-After: the request may be sent again unchanged."""
    return ApiError(
        503,
        ErrorCode.UNAVAILABLE.value,
        f"{what} is unavailable; retry later",
        {"Retry-After": str(RETRY_AFTER_S)},
    )


def init_app(app: Flask) -> None:
    @app.errorhandler(Sam3dError)
    def _sam3d(exc: Sam3dError):
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.code is ErrorCode.UNAVAILABLE else {}
        return error_response(STATUS.get(exc.code, 400), exc.code.value, exc.message, headers)

    @app.errorhandler(redis.RedisError)
    def _redis(exc: redis.RedisError):
        app.logger.warning("Redis unavailable: %s", exc)
        return _api(unavailable("the job store"))

    @app.errorhandler(StorageError)
    def _storage(exc: StorageError):
        app.logger.warning("storage unavailable: %s", exc)
        return _api(unavailable("storage"))

    @app.errorhandler(ApiError)
    def _api(exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc):
        return error_response(413, "request_too_large", "the request body is too large")

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        headers = {}
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        return error_response(exc.code or 500, code, exc.description or exc.name, headers)

    # Safety nets: both only ever come from a caller's input (nesting, huge numbers).
    @app.errorhandler(RecursionError)
    def _too_deep(exc: RecursionError):
        return error_response(400, "invalid_request", "the input nests too deep")

    @app.errorhandler(OverflowError)
    def _overflow(exc: OverflowError):
        return error_response(400, "invalid_request", f"a number is out of range: {exc}")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        app.logger.exception("unhandled error")
        return error_response(500, "internal_error", "internal error; see the service log")
