"""Image URLs: fetched over real HTTP; private addresses refused unless settings allow them."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jobs.errors import Sam3dError
from jobs.fetch import check_public_url, fetch_url

BODY = b"\x89PNG fake body" * 100


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
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
        "not a url",
    ],  # fmt: skip
)
def test_non_public_urls_are_refused(url):
    with pytest.raises(Sam3dError) as info:
        check_public_url(url)
    assert info.value.code == "invalid_image"
