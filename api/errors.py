"""Errors as HTTP answers: every body is ``{"error": {"code", "message"}}``, every status
comes from the registry in ``jobs.errors``."""

from __future__ import annotations

import redis
from flask import Flask, jsonify
from gunicorn.http.errors import ParseException
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from api.models import Error, ErrorDetail
from jobs.errors import ERRORS, ErrorCode, Sam3dError, unavailable
from jobs.storage import StorageError

__all__ = ["error_response", "http_error", "init_app", "unavailable"]


def error_response(exc: Sam3dError):
    body = Error(error=ErrorDetail(code=exc.code, message=exc.message))
    response = jsonify(body.model_dump(mode="json"))
    response.status_code = exc.status
    response.headers.update(exc.response_headers())
    return response


def http_error(exc: HTTPException) -> Sam3dError:
    """Werkzeug's own errors (unknown route, wrong method, ...) as registered codes."""
    if isinstance(exc, RequestEntityTooLarge):
        return Sam3dError(ErrorCode.REQUEST_TOO_LARGE, "the request body is too large")
    name = (exc.name or "error").lower().replace(" ", "_")
    try:
        code = ErrorCode(name)
    except ValueError:  # a status we have no code for: the nearest registered one
        code = ErrorCode.INVALID_REQUEST if (exc.code or 500) < 500 else ErrorCode.INTERNAL_ERROR
    headers = {}
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        headers["Allow"] = ", ".join(sorted(exc.valid_methods))
    return Sam3dError(code, exc.description or exc.name, headers=headers)


def init_app(app: Flask) -> None:
    @app.errorhandler(Sam3dError)
    def _sam3d(exc: Sam3dError):
        return error_response(exc)

    @app.errorhandler(redis.RedisError)
    def _redis(exc: redis.RedisError):
        app.logger.warning("Redis unavailable: %s", exc)
        return error_response(unavailable("the job store"))

    @app.errorhandler(StorageError)
    def _storage(exc: StorageError):
        app.logger.warning("storage unavailable: %s", exc)
        return error_response(unavailable("storage"))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        return error_response(http_error(exc))

    # gunicorn parses a chunked body only as the view reads it: a malformed one raises here.
    @app.errorhandler(ParseException)
    def _malformed_body(exc: ParseException):
        return error_response(
            Sam3dError(ErrorCode.BAD_REQUEST, f"malformed HTTP request: {exc}"[:200])
        )

    # Safety nets: both only ever come from a caller's input (nesting, huge numbers).
    @app.errorhandler(RecursionError)
    def _too_deep(exc: RecursionError):
        return error_response(Sam3dError(ErrorCode.INVALID_REQUEST, "the input nests too deep"))

    @app.errorhandler(OverflowError)
    def _overflow(exc: OverflowError):
        return error_response(
            Sam3dError(ErrorCode.INVALID_REQUEST, f"a number is out of range: {exc}")
        )

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        app.logger.exception("unhandled error")
        return error_response(
            Sam3dError(ErrorCode.INTERNAL_ERROR, "internal error; see the service log")
        )


assert all(code in ERRORS for code in ErrorCode), "every ErrorCode needs a registry entry"
