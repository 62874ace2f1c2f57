"""Webhooks: signed POSTs when a job (or a batch) ends, delivered from their own queue.

Every delivery carries ``X-Sam3d-Timestamp`` (unix seconds) and ``X-Sam3d-Signature:
v1=<hex>``, the HMAC-SHA256 of ``"{timestamp}.{body}"`` under ``SAM3D_WEBHOOK_SECRET``. A
receiver recomputes it over the raw body, compares in constant time, and refuses timestamps
older than a few minutes (replays). ``verify`` below is that check.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from jobs.errors import ErrorCode, Sam3dError
from jobs.fetch import NoRedirects, UrlField, check_public_url, open_with_deadline, read_capped

TASK_NAME = "sam3d.webhook"
QUEUE = "webhooks"
TIMESTAMP_HEADER = "X-Sam3d-Timestamp"
SIGNATURE_HEADER = "X-Sam3d-Signature"
EVENT_HEADER = "X-Sam3d-Event"
DELIVERY_HEADER = "X-Sam3d-Delivery"
RESPONSE_BYTES = 64 * 1024  # of a receiver's answer, read then dropped
MAX_DELAY_S = 600  # below the broker's visibility timeout: a delayed retry is never doubled
WEBHOOK_URL = UrlField("webhook_url", ErrorCode.INVALID_REQUEST, ErrorCode.REQUEST_TOO_LARGE)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + digest.hexdigest()


def verify(
    secret: str,
    body: bytes,
    timestamp: str,
    signature: str,
    *,
    tolerance_s: float = 300,
    now: float | None = None,
) -> None:
    """Raise ``ValueError`` unless ``signature`` signs ``body`` at a recent ``timestamp``."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        raise ValueError("bad timestamp") from None
    if abs((now if now is not None else time.time()) - ts) > tolerance_s:
        raise ValueError("timestamp outside the tolerance (replayed or clock skew)")
    if not hmac.compare_digest(sign(secret, ts, body), signature or ""):
        raise ValueError("bad signature")


def check_webhook_url(url: Any, *, allow_private: bool) -> str:
    """The URL, if it may be called; ``invalid_request`` otherwise (private addresses too)."""
    if not isinstance(url, str) or not url:
        raise Sam3dError(ErrorCode.INVALID_REQUEST, "webhook_url must be an http(s) URL")
    check_public_url(url, allow_private=allow_private, field=WEBHOOK_URL)
    return url


def retry_delay(attempt: int, base_s: float) -> float:
    """Exponential backoff after failed attempt ``attempt`` (1-based), capped."""
    return min(MAX_DELAY_S, base_s * 2 ** (attempt - 1))


def envelope(event: str, data: dict[str, Any]) -> bytes:
    return json.dumps(
        {"id": "evt_" + uuid.uuid4().hex, "type": event, "created_at": time.time(), "data": data}
    ).encode()


def post(
    url: str, body: bytes, *, secret: str, event: str, timeout: float, allow_private: bool
) -> tuple[int | None, str | None]:
    """One delivery attempt: (HTTP status, None) or (status or None, error text).

    Redirects are not followed: a 3xx is a failed attempt. Following one would mean checking
    every hop's address again, and urllib turns a redirected POST into a GET without the
    signed body, so no receiver could want it; a receiver that moved gets a new URL."""
    check_public_url(url, allow_private=allow_private, field=WEBHOOK_URL)  # DNS may change
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "sam3d-jobs-webhook/1",
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(secret, timestamp, body),
        EVENT_HEADER: event,
        DELIVERY_HEADER: json.loads(body)["id"],
    }
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        # ``timeout`` bounds the whole delivery: a receiver that trickles its answer does not
        # hold a sender thread; at most RESPONSE_BYTES of its body are read.
        with open_with_deadline(request, timeout, NoRedirects()) as response:
            read_capped(response, RESPONSE_BYTES)
            return response.status, None
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            return exc.code, f"HTTP {exc.code}: redirects are not followed"
        return exc.code, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        return None, str(getattr(exc, "reason", exc))
