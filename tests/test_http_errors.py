"""Every error the API answers is JSON with a stable code, gunicorn's own too (a request it
refuses before Flask sees it: bad request line, URI or headers over its limits), against the
real gunicorn with no proxy in front."""

from __future__ import annotations

import json

import pytest
from service import exchange, make_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = make_stack(tmp_path_factory.mktemp("http-errors"))
    s.start(wait=False)  # no worker: these requests never reach a queue
    yield s
    s.stop()


CASES = {
    "URI over the request line limit": (
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        414,
        "uri_too_long",
    ),
    "header over the field size limit": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"x" * 20_000 + b"\r\n\r\n",
        431,
        "request_header_fields_too_large",
    ),
    "too many headers": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
        + b"\r\n",
        431,
        "request_header_fields_too_large",
    ),
    "garbage request line": (b"NOT AN HTTP REQUEST\r\n\r\n", 400, "bad_request"),
    "bad HTTP version": (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 400, "bad_request"),
    "invalid header name": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
        400,
        "bad_request",
    ),
    "invalid chunk size": (
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/json\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gunicorn_refusals_are_json_with_a_stable_code(stack, case):
    request, status, code = CASES[case]
    got, headers, body = exchange(stack.port, request)
    assert got == status, body[:300]
    assert headers["content-type"] == "application/json", body[:300]
    error = json.loads(body)["error"]
    assert error["code"] == code and isinstance(error["message"], str)


def test_flask_errors_are_json_and_405_names_the_allowed_methods(stack):
    status, headers, body = exchange(
        stack.port, b"PUT /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    assert status == 405 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "method_not_allowed"
    assert {"GET", "POST"} <= set(headers["allow"].replace(" ", "").split(","))
    status, headers, body = exchange(stack.port, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


def test_multipart_parts_without_a_parsable_name_are_not_a_500(stack):
    """Found by schemathesis: such a part is listed under the name None, and the idempotency
    fingerprint sorted None against str (TypeError, 500)."""
    body = (
        b'--b\r\nContent-Disposition: form-data; name="\xc2\xab\\"\r\n\r\n{}\r\n'
        b'--b\r\nContent-Disposition: form-data; name="mask_input"\r\n\r\n[1, 2, 3, 4, 5, 6]\r\n'
        b'--b\r\nContent-Disposition: form-data; filename="x"\r\n\r\nnot an image\r\n'
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="i"\r\n\r\nj\r\n--b--\r\n'
    )
    head = (
        "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nIdempotency-Key: unnamed-parts\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    status, headers, answer = exchange(stack.port, head.encode() + body)
    assert status == 400 and headers["content-type"] == "application/json", answer
    assert json.loads(answer)["error"]["code"] == "invalid_image"
