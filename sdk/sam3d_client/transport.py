"""HTTP for the SDK: one request at a time, errors as ``ServiceError``, transient ones retried.

A request is retried only when it is safe to send twice: GETs always, a POST only when the
caller says so (a submit carrying an ``Idempotency-Key``). Transient means no answer at all
(connection refused or reset, a timeout) or 429/502/503/504; a ``Retry-After`` header sets
the wait, otherwise it backs off exponentially with jitter.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sam3d_client.errors import CONNECTION_ERROR, Interrupted, ServiceError

log = logging.getLogger("sam3d.client")

_CHUNK = 1 << 20
# Errors that mean "no usable answer came": safe to retry an idempotent request.
_TRANSIENT_OS_ERRORS = (
    ConnectionError,  # refused, reset, aborted, broken pipe, RemoteDisconnected
    TimeoutError,
    socket.timeout,
    http.client.IncompleteRead,
    http.client.BadStatusLine,
)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transient failure is retried."""

    attempts: int = 6  # tries in all, the first one included
    backoff_s: float = 0.25  # first wait; doubles each retry
    max_backoff_s: float = 8.0
    max_retry_after_s: float = 120.0  # a longer Retry-After is capped to this

    def delay(self, retry: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after_s)
        base = min(self.max_backoff_s, self.backoff_s * 2**retry)
        return base * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class Response:
    """A successful answer."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _http_error(exc: urllib.error.HTTPError) -> ServiceError:
    try:
        body = exc.read()
    except OSError:
        body = b""
    code, message = "http_error", body[:200].decode(errors="replace") or str(exc.reason)
    try:
        err = json.loads(body)["error"]
        code, message = str(err.get("code", code)), str(err.get("message", message))
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return ServiceError(
        code, message, exc.code, retry_after=parse_retry_after(exc.headers.get("Retry-After"))
    )


def _connection_error(exc: BaseException, url: str) -> ServiceError:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return ServiceError(CONNECTION_ERROR, f"cannot reach {url}: {reason}")


def _is_transient_os_error(exc: BaseException) -> bool:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return isinstance(reason, _TRANSIENT_OS_ERRORS)


class Transport:
    """Requests against one base URL, with an optional API key and a retry policy.

    ``interrupt``, when given and set, cuts retry waits and downloads short with
    :class:`~sam3d_client.errors.Interrupted`.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 60,
        retry: RetryPolicy | None = None,
        interrupt: threading.Event | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.interrupt = interrupt

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.base_url + path

    def sleep(self, seconds: float) -> None:
        """Sleep, waking early (and raising ``Interrupted``) when the interrupt is set."""
        if self.interrupt is None:
            time.sleep(seconds)
        elif self.interrupt.wait(seconds):
            raise Interrupted()

    def _check_interrupt(self) -> None:
        if self.interrupt is not None and self.interrupt.is_set():
            raise Interrupted()

    def _with_retries(self, what: str, idempotent: bool, attempt: Callable[[], Any]) -> Any:
        retry = 0
        while True:
            self._check_interrupt()
            try:
                return attempt()
            except ServiceError as exc:
                if not (idempotent and exc.retryable) or retry + 1 >= self.retry.attempts:
                    raise
                delay = self.retry.delay(retry, exc.retry_after)
                log.info("%s: %s; retry %d in %.1f s", what, exc, retry + 1, delay)
                self.sleep(delay)
                retry += 1

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
    ) -> Response:
        """Send one request (retrying when ``idempotent``, default: GET/HEAD/DELETE)."""
        if idempotent is None:
            idempotent = method in ("GET", "HEAD", "DELETE")
        all_headers = {"Accept": "application/json", "User-Agent": "sam3d-jobs-sdk"}
        if self.api_key:
            all_headers["Authorization"] = f"Bearer {self.api_key}"
        all_headers.update(headers or {})
        url = self.url(path)

        def attempt() -> Response:
            req = urllib.request.Request(url, data=body, method=method, headers=all_headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return Response(resp.status, dict(resp.headers), resp.read())
            except urllib.error.HTTPError as exc:
                raise _http_error(exc) from None
            except (OSError, http.client.HTTPException) as exc:
                if _is_transient_os_error(exc):
                    raise _connection_error(exc, url) from None
                raise ServiceError("request_failed", f"{method} {url}: {exc}") from None

        return self._with_retries(f"{method} {path}", idempotent, attempt)

    def json(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """A JSON request (``body`` encoded when given) answered with JSON."""
        data = None if body is None else json.dumps(body).encode()
        extra = {"Content-Type": "application/json"} if data is not None else {}
        return self.request(method, path, body=data, headers={**extra, **(headers or {})}).json()

    def download(
        self, url: str, target: Path | None = None, *, expected_bytes: int | None = None
    ) -> bytes | int:
        """GET a signed artifact URL (no API key: the signature is the credential).

        With ``target`` the body streams into that file (written under a temporary name,
        then renamed) and its size is returned; without, the bytes are returned. A body
        shorter than ``expected_bytes`` counts as a dropped connection and is retried.
        """

        def attempt() -> bytes | int:
            req = urllib.request.Request(url, headers={"User-Agent": "sam3d-jobs-sdk"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    if target is None:
                        data = resp.read()
                        size = len(data)
                    else:
                        size = self._stream_to_file(resp, target, expected_bytes)
            except urllib.error.HTTPError as exc:
                raise _http_error(exc) from None
            except (OSError, http.client.HTTPException) as exc:
                if _is_transient_os_error(exc):
                    raise _connection_error(exc, url) from None
                if isinstance(exc, urllib.error.URLError | http.client.HTTPException):
                    raise ServiceError("request_failed", f"GET {url}: {exc}") from None
                raise  # a local file problem (disk full, permissions): not the network
            if expected_bytes is not None and size != expected_bytes:
                raise ServiceError(
                    CONNECTION_ERROR, f"{url}: got {size} bytes, expected {expected_bytes}"
                )
            return data if target is None else size

        return self._with_retries(f"GET {url.split('?')[0]}", True, attempt)

    def _stream_to_file(self, resp: Any, target: Path, expected_bytes: int | None) -> int:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := resp.read(_CHUNK):
                    self._check_interrupt()
                    out.write(chunk)
                    size += len(chunk)
            if expected_bytes is None or size == expected_bytes:
                os.replace(tmp, target)
            return size
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
