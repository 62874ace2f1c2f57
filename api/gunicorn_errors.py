"""gunicorn's own error answers (a request it cannot parse never reaches Flask: a bad request
line, a URI or headers over its limits) in the API's JSON error shape, not gunicorn's HTML."""

from __future__ import annotations

import json

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

# gunicorn's statuses for what it refuses itself, and their stable codes.
CODES = {
    400: "bad_request",
    403: "forbidden",
    414: "uri_too_long",
    417: "expectation_failed",
    431: "request_header_fields_too_large",
    500: "internal_error",
    501: "not_implemented",
}
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
