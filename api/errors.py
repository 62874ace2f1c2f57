"""The one place error codes become HTTP statuses. Every error body is
``{"error": {"code", "message"}}``."""

from __future__ import annotations

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from jobs.errors import ErrorCode, Sam3dError

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


def init_app(app: Flask) -> None:
    @app.errorhandler(Sam3dError)
    def _sam3d(exc: Sam3dError):
        return error_response(STATUS.get(exc.code, 400), exc.code.value, exc.message)

    @app.errorhandler(ApiError)
    def _api(exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc):
        return error_response(413, "request_too_large", "the request body is too large")

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        return error_response(exc.code or 500, code, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        app.logger.exception("unhandled error")
        return error_response(500, "internal_error", "internal error; see the service log")
