"""Request bodies read whole before a view runs: the API's own protection where no proxy
stands in front (the dev stack, a deployment without nginx), the same answers either way.

- a ``Content-Length`` over ``SAM3D_MAX_REQUEST_BYTES``, or a chunked body that grows past it:
  413 ``request_too_large`` (werkzeug alone truncated a chunked body, and the view saw bad JSON);
- a ``Transfer-Encoding`` other than ``chunked`` (``gzip, chunked``, ...): 501
  ``not_implemented``, never read as if it were plain chunked;
- a body that stalls, no byte for ``SAM3D_BODY_TIMEOUT_S``: 408 ``request_timeout`` and the
  connection closed, so a client that sends a Content-Length of 100 and 2 bytes holds an API
  thread that long and no longer (nginx's ``client_body_timeout`` does the same in front);
- a malformed chunked body: 400 ``bad_request``.

The body is spooled (memory up to ``SPOOL_MEMORY_BYTES``, then a temporary file) and handed
to Flask as a file of known length, so no view ever blocks on the client's socket.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from gunicorn.http.errors import ParseException

from jobs.errors import ErrorCode, Sam3dError
from jobs.settings import Settings

SPOOL_MEMORY_BYTES = 1 << 20
CHUNK = 64 * 1024
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ROBOFLOW_PREFIX = "/sam3_3d/"  # its clients read "message" (api/roboflow.py)


def _error_answer(environ: dict[str, Any], start_response: Callable, exc: Sam3dError):
    """The API's error body (Roboflow's route: with its ``message``), before Flask runs."""
    code, message = exc.code.value, exc.message
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if environ.get("PATH_INFO", "").startswith(ROBOFLOW_PREFIX):
        body = {"message": message, "error_type": code, **body}
    data = json.dumps(body).encode() + b"\n"
    start_response(
        f"{exc.status} {HTTPStatus(exc.status).phrase}",
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
            ("Connection", "close"),  # what the client still sends is not read
        ],
    )
    return [data]


def _codings(environ: dict[str, Any]) -> list[str]:
    value = environ.get("HTTP_TRANSFER_ENCODING", "")
    return [c.strip().lower() for c in value.split(",") if c.strip()]


def _content_length(environ: dict[str, Any]) -> int | None:
    text = environ.get("CONTENT_LENGTH") or ""
    if not text:
        return None
    if not text.isdigit():
        raise Sam3dError(ErrorCode.BAD_REQUEST, "Content-Length is not a number")
    return int(text)


class BodyGuard:
    """WSGI middleware: reads each request's body under the limits above, then calls ``app``."""

    def __init__(self, app: Callable, settings: Settings) -> None:
        self.app = app
        self.max_bytes = settings.max_request_bytes
        self.timeout_s = settings.body_timeout_s

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD", "GET") not in BODY_METHODS:
            return self.app(environ, start_response)
        try:
            spooled = self._read_body(environ)
        except Sam3dError as exc:
            return _error_answer(environ, start_response, exc)
        if spooled is None:
            return self.app(environ, start_response)
        body, length = spooled
        environ["wsgi.input"] = body
        environ["CONTENT_LENGTH"] = str(length)
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        environ["wsgi.input_terminated"] = False
        try:
            result = self.app(environ, start_response)
        except BaseException:
            body.close()
            raise
        return _ClosingIterable(result, body)

    def _read_body(self, environ: dict[str, Any]) -> tuple[Any, int] | None:
        codings = _codings(environ)
        if codings and codings != ["chunked"]:
            raise Sam3dError(
                ErrorCode.NOT_IMPLEMENTED,
                f"Transfer-Encoding {', '.join(codings)} is not supported; send the body "
                "plain (Content-Length) or chunked",
            )
        length = None if codings else _content_length(environ)
        if not codings and not length:
            return None  # no body
        if length is not None and length > self.max_bytes:
            raise Sam3dError(
                ErrorCode.REQUEST_TOO_LARGE,
                f"the request body ({length} bytes) is over the limit of {self.max_bytes} bytes",
            )
        sock = environ.get("gunicorn.socket")
        if sock is not None and self.timeout_s > 0:
            sock.settimeout(self.timeout_s)
        try:
            return self._spool(environ["wsgi.input"], length)
        finally:
            if sock is not None and self.timeout_s > 0:
                with contextlib.suppress(OSError):
                    sock.settimeout(None)  # the answer is written as gunicorn would

    def _spool(self, stream: Any, length: int | None) -> tuple[Any, int]:
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)  # noqa: SIM115 - handed on
        total = 0
        want = self.max_bytes + 1 if length is None else length
        try:
            while total < want:
                chunk = stream.read(min(CHUNK, want - total))
                if not chunk:
                    break
                spool.write(chunk)
                total += len(chunk)
        except TimeoutError:  # the socket's timeout above
            spool.close()
            raise Sam3dError(
                ErrorCode.REQUEST_TIMEOUT,
                f"the request body stalled: no data for {self.timeout_s:g} s",
            ) from None
        except ParseException as exc:
            spool.close()
            raise Sam3dError(ErrorCode.BAD_REQUEST, f"malformed HTTP body: {exc}"[:200]) from None
        except (OSError, ValueError) as exc:  # reset, or gunicorn's NoMoreData
            spool.close()
            raise Sam3dError(ErrorCode.BAD_REQUEST, f"the request body broke off: {exc}") from None
        if total > self.max_bytes:
            spool.close()
            raise Sam3dError(
                ErrorCode.REQUEST_TOO_LARGE,
                f"the request body is over the limit of {self.max_bytes} bytes",
            )
        if length is not None and total < length:
            spool.close()
            raise Sam3dError(
                ErrorCode.BAD_REQUEST,
                f"the request body ended after {total} of its {length} bytes",
            )
        spool.seek(0)
        return spool, total


class _ClosingIterable:
    """The app's answer, closing the spooled body once the server is done with it."""

    def __init__(self, result: Iterable[bytes], body: Any) -> None:
        self.result = result
        self.body = body

    def __iter__(self):
        return iter(self.result)

    def close(self) -> None:
        try:
            close = getattr(self.result, "close", None)
            if close is not None:
                close()
        finally:
            self.body.close()
