"""Fetching an image by URL without letting callers reach the service's private network."""

from __future__ import annotations

import ipaddress
import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from jobs.errors import ErrorCode, Sam3dError

TIMEOUT_S = 15


def check_public_url(url: str, *, allow_private: bool = False) -> None:
    """Refuse non-HTTP(S) URLs and hosts that resolve to private, loopback, link-local,
    multicast or reserved addresses (unless ``allow_private``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Sam3dError(ErrorCode.INVALID_IMAGE, "image URL must be http:// or https://")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise Sam3dError(
            ErrorCode.INVALID_IMAGE, f"cannot resolve {parts.hostname}: {exc}"
        ) from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global:
            raise Sam3dError(
                ErrorCode.INVALID_IMAGE,
                f"image URL host {parts.hostname} resolves to a non-public address ({address})",
            )


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_public_url(newurl, allow_private=self.allow_private)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(url: str, *, max_bytes: int, allow_private: bool = False) -> bytes:
    """The body at ``url``, at most ``max_bytes`` (``image_too_large`` beyond)."""
    check_public_url(url, allow_private=allow_private)
    opener = urllib.request.build_opener(_CheckedRedirects(allow_private))
    request = urllib.request.Request(url, headers={"User-Agent": "sam3d-jobs"})
    try:
        with opener.open(request, timeout=TIMEOUT_S) as response:
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise Sam3dError(ErrorCode.INVALID_IMAGE, f"image URL answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Sam3dError(ErrorCode.INVALID_IMAGE, f"cannot fetch image URL: {reason}") from None
    if len(data) > max_bytes:
        raise Sam3dError(ErrorCode.IMAGE_TOO_LARGE, f"image at URL exceeds {max_bytes} bytes")
    return data
