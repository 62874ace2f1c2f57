"""Fetching an image by URL without letting callers reach the service's private network,
every outbound request (image fetches, webhooks) under a deadline for the whole of it.

Socket timeouts bound each read, not a request: a server that trickles a byte every few
seconds would hold a thread for ever. ``open_with_deadline`` shuts the request's sockets
down when its deadline passes, whatever stage it is in (connect, headers, body, redirects).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from jobs.errors import ErrorCode, Sam3dError

TIMEOUT_S = 15  # the whole fetch of an image URL, redirects included
CHUNK = 64 * 1024


@dataclass(frozen=True)
class UrlField:
    """Which input a URL is, for the refusals: its name and the codes they carry."""

    name: str
    code: ErrorCode  # the URL refused, or its fetch failed
    too_large: ErrorCode  # its body over the limit


IMAGE_URL = UrlField("image URL", ErrorCode.INVALID_IMAGE, ErrorCode.IMAGE_TOO_LARGE)


class DeadlineExceeded(OSError):
    """The request's deadline passed before it was done."""


class _Deadline:
    """Shuts down every connection it made once ``seconds`` have passed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True

    def track(self, cls: type[http.client.HTTPConnection]) -> Any:
        """A connection factory whose sockets this deadline cuts (urllib drops the
        connection's reference once the headers are in; the response keeps the socket)."""

        def make(*args: Any, **kwargs: Any) -> http.client.HTTPConnection:
            kwargs["timeout"] = min(kwargs.get("timeout") or self.seconds, self.seconds)
            connection = cls(*args, **kwargs)
            connect = connection.connect

            def connect_tracked() -> None:
                connect()
                with self._lock:
                    self._sockets.append(connection.sock)
                    if self.expired:
                        self._shutdown(connection.sock)

            connection.connect = connect_tracked  # type: ignore[method-assign]
            return connection

        return make

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def _cut(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                self._shutdown(sock)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


class _DeadlineHTTP(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(self.deadline.track(http.client.HTTPConnection), req)


class _DeadlineHTTPS(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(
            self.deadline.track(http.client.HTTPSConnection), req, context=self._context
        )


@contextlib.contextmanager
def open_with_deadline(
    request: urllib.request.Request,
    deadline_s: float,
    *handlers: urllib.request.BaseHandler,
) -> Iterator[Any]:
    """``urlopen`` whose connect, headers, redirects and body reads all end by
    ``deadline_s``; past it, reads fail with ``DeadlineExceeded``."""
    with _Deadline(deadline_s) as deadline:
        opener = urllib.request.build_opener(
            _DeadlineHTTP(deadline), _DeadlineHTTPS(deadline), *handlers
        )
        try:
            with opener.open(request, timeout=deadline_s) as response:
                yield response
        except (OSError, http.client.HTTPException) as exc:
            if deadline.expired and not isinstance(exc, urllib.error.HTTPError):
                raise DeadlineExceeded(f"no complete answer within {deadline_s:g} s") from None
            raise
        if deadline.expired:
            raise DeadlineExceeded(f"no complete answer within {deadline_s:g} s")


def read_capped(response: Any, max_bytes: int) -> bytes:
    """At most ``max_bytes + 1`` bytes of a response body, in chunks."""
    chunks, total = [], 0
    while total <= max_bytes:
        chunk = response.read(min(CHUNK, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def check_public_url(
    url: str,
    *,
    allow_private: bool = False,
    field: UrlField = IMAGE_URL,
) -> None:
    """Refuse non-HTTP(S) URLs, URLs that do not parse (a port out of range, an IPv4 address
    in brackets, ...) and hosts that resolve to private, loopback, link-local, multicast or
    reserved addresses (unless ``allow_private``). Refusals carry ``field``'s code."""
    try:
        parts = urlsplit(url)
        hostname, port = parts.hostname, parts.port  # .port raises on "99999" or "x"
    except ValueError as exc:
        raise Sam3dError(field.code, f"{field.name} cannot be parsed: {exc}") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise Sam3dError(field.code, f"{field.name} must be http:// or https://")
    if port == 0:
        raise Sam3dError(field.code, f"{field.name} has port 0")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(hostname, port or 443, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, ValueError, OSError) as exc:
        raise Sam3dError(field.code, f"{field.name}: cannot resolve {hostname}: {exc}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not is_public_address(address):
            raise Sam3dError(
                field.code,
                f"{field.name} host {hostname} resolves to a non-public address ({address})",
            )


# IPv6 ranges that carry (or translate to) an IPv4 address or are not routable, which
# ``is_global`` lets through: NAT64 (well-known and local-use), IPv4-compatible, site-local.
_NON_PUBLIC_V6 = tuple(
    ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96", "fec0::/10")
)


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A globally routable unicast address that embeds no non-public IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if embedded is not None and not is_public_address(embedded):
            return False
        if any(address in network for network in _NON_PUBLIC_V6):
            return False
    return address.is_global and not (
        address.is_multicast or address.is_reserved or address.is_unspecified
    )


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL that passes the same check as the first."""

    def __init__(self, allow_private: bool, field: UrlField) -> None:
        self.allow_private = allow_private
        self.field = field

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_public_url(newurl, allow_private=self.allow_private, field=self.field)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """Answers a 3xx as it is (an ``HTTPError``): the caller follows nothing."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def fetch_url(
    url: str,
    *,
    max_bytes: int,
    allow_private: bool = False,
    deadline_s: float = TIMEOUT_S,
    field: UrlField = IMAGE_URL,
) -> bytes:
    """The body at ``url``, at most ``max_bytes`` (``image_too_large`` beyond), all of it
    within ``deadline_s``; every redirect hop checked as ``url`` is. Refusals of the URL or
    its answer carry ``field``'s codes."""
    check_public_url(url, allow_private=allow_private, field=field)
    request = urllib.request.Request(url, headers={"User-Agent": "sam3d-jobs"})
    try:
        redirects = _CheckedRedirects(allow_private, field)
        with open_with_deadline(request, deadline_s, redirects) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise Sam3dError(field.too_large, f"{field.name} exceeds {max_bytes} bytes")
            data = read_capped(response, max_bytes)
    except urllib.error.HTTPError as exc:
        raise Sam3dError(field.code, f"{field.name} answered HTTP {exc.code}") from None
    except DeadlineExceeded as exc:
        raise Sam3dError(field.code, f"cannot fetch {field.name}: {exc}") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise Sam3dError(field.code, f"cannot fetch {field.name}: {reason}") from None
    if len(data) > max_bytes:
        raise Sam3dError(field.too_large, f"{field.name} exceeds {max_bytes} bytes")
    return data
