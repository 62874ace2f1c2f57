"""Image URLs: fetched over real HTTP; private addresses refused unless settings allow them."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jobs.errors import Sam3dError
from jobs.fetch import check_public_url, fetch_url

BODY = b"\x89PNG fake body" * 100


class _Handler(BaseHTTPRequestHandler):
    def _trickle(self, data: bytes) -> None:
        for i in range(len(data)):
            try:
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.25)

    def do_POST(self):  # noqa: N802 - a webhook receiver that trickles its answer
        self.rfile.read(int(self.headers["Content-Length"]))
        self._trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path == "/trickle-headers":
            self._trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n" + b"x" * 20)
            return
        if self.path == "/trickle-body":
            self.send_response(200)
            self.send_header("Content-Length", "40")
            self.end_headers()
            self._trickle(b"x" * 40)
            return
        if self.path == "/huge":
            self.send_response(200)
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
            return
        if self.path == "/missing":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_loopback_is_refused_by_default(server):
    with pytest.raises(Sam3dError) as info:
        fetch_url(server + "/img.png", max_bytes=10_000)
    assert info.value.code == "invalid_image" and "non-public" in info.value.message


def test_allowed_private_fetch_and_limits(server):
    assert fetch_url(server + "/img.png", max_bytes=10_000, allow_private=True) == BODY
    with pytest.raises(Sam3dError) as info:
        fetch_url(server + "/img.png", max_bytes=100, allow_private=True)
    assert info.value.code == "image_too_large"
    with pytest.raises(Sam3dError) as info:
        fetch_url(server + "/missing", max_bytes=10_000, allow_private=True)
    assert "404" in info.value.message


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/a.png",
        "file:///etc/passwd",
        "http://169.254.169.254/latest",
        "http://[::1]/x",
        "http://10.0.0.1/x",
        "http://192.168.1.1/x",
        "http://224.0.0.1/x",  # multicast
        "http://[64:ff9b::a00:1]/x",  # NAT64 of 10.0.0.1
        "http://[64:ff9b::808:808]/x",  # NAT64 of a public one: still a translator
        "http://[2002:a00:1::]/x",  # 6to4 of 10.0.0.1
        "http://[::ffff:127.0.0.1]/x",  # IPv4-mapped
        "http://[::7f00:1]/x",  # IPv4-compatible
        "http://[fec0::1]/x",  # site-local
        "not a url",
    ],  # fmt: skip
)
def test_non_public_urls_are_refused(url):
    with pytest.raises(Sam3dError) as info:
        check_public_url(url)
    assert info.value.code == "invalid_image"


@pytest.mark.parametrize("path", ["/trickle-headers", "/trickle-body"])
def test_a_trickling_server_is_cut_off_at_the_whole_request_deadline(server, path):
    """One byte every 0.25 s never trips a socket timeout; the deadline ends it anyway."""
    started = time.monotonic()
    with pytest.raises(Sam3dError) as info:
        fetch_url(server + path, max_bytes=10_000, allow_private=True, deadline_s=1.0)
    assert info.value.code == "invalid_image" and "within 1 s" in info.value.message
    assert time.monotonic() - started < 2.0


def test_a_content_length_over_the_cap_is_refused_before_reading(server):
    with pytest.raises(Sam3dError) as info:
        fetch_url(server + "/huge", max_bytes=10_000, allow_private=True, deadline_s=5)
    assert info.value.code == "image_too_large"


def test_a_webhook_receiver_that_trickles_holds_the_sender_no_longer_than_its_timeout(server):
    from jobs.webhooks import envelope, post

    started = time.monotonic()
    status, error = post(
        server + "/hook", envelope("job.succeeded", {}), secret="s", event="job.succeeded",
        timeout=1.0, allow_private=True,
    )  # fmt: skip
    assert status is None and "within 1 s" in error
    assert time.monotonic() - started < 2.0


def test_public_addresses_pass():
    import ipaddress

    from jobs.fetch import is_public_address

    for text in ("8.8.8.8", "2001:4860:4860::8888", "2002:808:808::1"):
        assert is_public_address(ipaddress.ip_address(text)), text
