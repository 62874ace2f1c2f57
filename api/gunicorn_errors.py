"""gunicorn's own error answers (a request it cannot parse never reaches Flask: a bad request
line, a URI or headers over its limits) in the API's JSON error shape, not gunicorn's HTML."""

from __future__ import annotations

import json

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

from jobs.errors import ERRORS, ErrorCode

# What gunicorn refuses itself, by the status it picks: registered codes (jobs.errors).
HTTP_LAYER = (
    ErrorCode.BAD_REQUEST,
    ErrorCode.FORBIDDEN,
    ErrorCode.URI_TOO_LONG,
    ErrorCode.EXPECTATION_FAILED,
    ErrorCode.REQUEST_HEADER_FIELDS_TOO_LARGE,
    ErrorCode.INTERNAL_ERROR,
    ErrorCode.NOT_IMPLEMENTED,
)
CODES = {ERRORS[code].status: code.value for code in HTTP_LAYER}
MAX_MESSAGE = 200  # gunicorn's message quotes the request; keep it short


def error_body(status: int, reason: str, message: str) -> bytes:
    """``{"error": {"code", "message"}}`` for one of gunicorn's own answers."""
    code = CODES.get(status) or reason.lower().replace(" ", "_") or "error"
    text = (message or reason)[:MAX_MESSAGE]
    return json.dumps({"error": {"code": code, "message": text}}).encode() + b"\n"


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """A drop-in for ``gunicorn.util.write_error`` answering JSON."""
    body = error_body(status_int, reason, mesg)
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin1") + body)


class JsonErrorWorker(ThreadWorker):
    """gunicorn's gthread worker whose own error answers are JSON.

    gunicorn picks the status (400, 414, 431, ...) in ``Worker.handle_error`` and writes it
    with ``gunicorn.util.write_error``, which only knows HTML; that one function is swapped in
    each worker process, so the statuses stay gunicorn's."""

    def init_process(self) -> None:
        util.write_error = write_json_error
        super().init_process()
