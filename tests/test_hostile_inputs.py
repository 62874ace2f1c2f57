"""Hostile inputs, round two (issue 30): each class sent to the real stack (gunicorn with no
proxy in front, Redis, a Celery worker, the webhook sender) answers a stable 4xx, never a 500 or
a cut body, while other jobs keep succeeding. A hypothesis fuzz test mixes the same classes."""

from __future__ import annotations

import io
import json
import socket
import struct
import time
import zlib
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from sam3d_client.http import ApiError, Http
from service import (
    FAST,
    SQUARE_FLAT,
    H,
    W,
    b64,
    exchange,
    make_stack,
    scene_image,
    serve_on_loopback,
    submit_json,
    wait_until,
)

SECRET = "hostile-webhook-secret"
LIMIT = 2_000_000  # SAM3D_MAX_REQUEST_BYTES of this stack
BODY_TIMEOUT_S = 1.5
K = {"fx": 200.0, "fy": 200.0, "cx": 80.0, "cy": 60.0}


class Redirector:
    """Loopback HTTP: /moved answers 302 to /target; every request is recorded."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                recorder.requests.append((self.command, self.path))
                if self.path.startswith("/moved"):
                    self.send_response(302)
                    self.send_header("Location", "/target")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = _any  # noqa: N815 - http.server's naming

            def log_message(self, *args):
                pass

        self.server, self.url = serve_on_loopback(Handler)


@pytest.fixture(scope="module")
def redirector():
    r = Redirector()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = make_stack(
        tmp_path_factory.mktemp("hostile"),
        workers=1,
        allow_private_urls=True,  # the redirecting receiver is on loopback
        webhook_secret=SECRET,
        webhook_max_attempts=2,
        webhook_retry_base_s=0.2,
        max_request_bytes=LIMIT,
        body_timeout_s=BODY_TIMEOUT_S,
    )
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(stack) -> Http:
    return Http(stack.url)


@pytest.fixture(scope="module")
def bystander(http):
    """A job submitted before the hostile requests; it must still succeed after them."""
    return submit_json(http, SQUARE_FLAT)


def refused(http, body: dict, path: str = "/v1/jobs") -> ApiError:
    with pytest.raises(ApiError) as info:
        http.json("POST", path, body)
    assert 400 <= info.value.status < 500, info.value
    return info.value


def post_whole(port: int, path: str, body: dict, timeout: float = 120) -> tuple[int, bytes]:
    """POST JSON; the status and the whole body, de-chunked (a cut one raises IncompleteRead)."""
    connection = HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode()
        connection.request("POST", path, data, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def job_body(**extra) -> dict:
    body = {"image": {"type": "base64", "value": b64(scene_image())}, "mask_input": SQUARE_FLAT}
    body["options"] = dict(FAST)
    body.update(extra)
    return body


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def npy_with_header(header: str) -> bytes:
    """A version 1.0 .npy whose header dict is ``header``, padded as numpy pads it."""
    text = header.encode("latin1")
    pad = 64 - (10 + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + b"\0" * 64


def png16_header_only(width: int, height: int) -> bytes:
    """A 16-bit greyscale PNG of (width, height) whose pixel data is one tiny compressed run:
    a few hundred bytes that decode to width * height * 2 bytes (a small "bomb")."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    raw = zlib.compress(b"\0" * (1 + width * 2) * height, 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def depth_body(blob: bytes, intrinsics=K, kind: str = "depth") -> dict:
    return job_body(**{kind: {"type": "base64", "value": b64(blob)}, "intrinsics": intrinsics})


# -- 1. webhooks follow no redirect ----------------------------------------------------------


def test_a_webhook_that_redirects_is_not_followed(http, redirector, bystander):
    job = submit_json(http, SQUARE_FLAT, webhook_url=redirector.url + "/moved")
    final = wait_until(
        http, job["id"], lambda j: (j.get("webhook") or {}).get("state") == "failed", 30
    )
    attempts = final["webhook"]["attempts"]
    assert [a["status"] for a in attempts] == [302, 302]
    assert all("redirects are not followed" in a["error"] for a in attempts)
    assert ("POST", "/moved") in redirector.requests
    assert not any(path == "/target" for _, path in redirector.requests)


# -- 2, 6. depth files checked from their headers ----------------------------------------------


@pytest.mark.parametrize(
    "blob",
    [
        npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (120, 160), }"[:30]),
        npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, }"),
        npy_with_header("{'descr': '<f8', 'fortran_order': False, 'shape': (4000000, 4000000), }"),
        npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (120, 160), }"),
        npy_with_header("{'descr': '|O', 'fortran_order': False, 'shape': (120, 160), }"),
        npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 160), }"),
        b"\x93NUMPY\x09\x00" + b"\0" * 100,
        b"\x93NUMPY\x01\x00\xff\xff" + b"{" * 100,
    ],
    ids=["cut", "syntax", "huge", "short", "object", "negative", "version", "overlong"],
)
def test_malformed_or_huge_npy_headers_are_invalid_depth(http, blob):
    for kind in ("depth", "pointmap"):
        assert refused(http, depth_body(blob, kind=kind)).code == "invalid_depth"


def test_a_depth_png_is_checked_against_the_image_before_it_is_decoded(http):
    bomb = png16_header_only(8000, 8000)
    assert len(bomb) < 200_000
    error = refused(http, depth_body(bomb))
    assert error.code == "invalid_depth"
    assert "8000x8000" in error.message and "pixel for pixel" in error.message


# -- 3. URL forms that do not parse ------------------------------------------------------------

BAD_URLS = [
    "http://example.com:99999/x.png",
    "http://[127.0.0.1]/x.png",
    "http://example.com:abc/x.png",
    "http://[::1/x.png",
    "http://example.com:0/x.png",
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_urls_that_do_not_parse_are_refused_with_the_fields_code(http, url):
    image = refused(http, {**job_body(), "image": {"type": "url", "value": url}})
    assert image.code == "invalid_image" and "image URL" in image.message
    depth = refused(http, {**job_body(), "depth": {"type": "url", "value": url}, "intrinsics": K})
    assert depth.code == "invalid_depth" and "depth URL" in depth.message
    hook = refused(http, job_body(webhook_url=url))
    assert hook.code == "invalid_request" and "webhook_url" in hook.message
    batch = refused(http, {"jobs": [job_body()], "webhook_url": url}, "/v1/batches")
    assert batch.code == "invalid_request"


# -- 4. intrinsics no camera has ---------------------------------------------------------------


@pytest.mark.parametrize(
    "intrinsics",
    [{**K, "fx": 1e308, "fy": 1e308}, {**K, "fx": 1e-300, "fy": 1e-300}, [1e308, 1e308, 80, 60]],
)
def test_extreme_finite_intrinsics_are_refused_at_submit(http, intrinsics):
    depth = np.full((H, W), 3000, np.uint16)
    buf = io.BytesIO()
    Image.fromarray(depth).save(buf, "PNG")
    error = refused(http, depth_body(buf.getvalue(), intrinsics))
    assert error.code == "invalid_intrinsics" and "field of view" in error.message


def test_absurd_but_finite_depths_are_refused_at_submit(http):
    depth = np.full((H, W), 3.0, np.float32)
    depth[0, 0] = 1e30
    error = refused(http, depth_body(npy(depth)))
    assert error.code == "invalid_depth" and "over" in error.message


# -- 5. Roboflow's route answers whole or refuses before its 200 -------------------------------


@pytest.mark.parametrize(
    "options", [{"formats": ["spz"]}, {"scene": False}, {"formats": ["ply"], "scene": False}]
)
def test_the_roboflow_route_never_cuts_its_body(stack, options):
    body = {
        "image": {"type": "base64", "value": b64(scene_image())},
        "mask_input": SQUARE_FLAT,
        "options": {**FAST, **options},
    }
    status, answer = post_whole(stack.port, "/sam3_3d/infer", body)
    assert status == 200, answer[:300]
    parsed = json.loads(answer)  # a cut body fails here
    assert len(parsed["objects"]) == 1
    if options.get("scene") is False:
        assert parsed["mesh_glb"] is None and parsed["gaussian_ply"] is None
    if "glb" not in options.get("formats", ["glb"]):
        assert parsed["objects"][0]["mesh_glb"] is None
        assert any("null where" in note for note in parsed["notes"])


# -- 7, 8. bodies over the limit, and bodies that stall ----------------------------------------


def chunked(body: bytes, size: int = 16384) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
             for i in range(0, len(body), size)]  # fmt: skip
    return b"".join(parts) + b"0\r\n\r\n"


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/batches", "/sam3_3d/infer"])
def test_a_body_over_the_limit_is_413_chunked_or_not(stack, path):
    big = json.dumps({"pad": "x" * (LIMIT + 10)}).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    for framing, body in (
        ("Transfer-Encoding: chunked", chunked(big)),
        (f"Content-Length: {len(big)}", big),
    ):
        request = (head + framing + "\r\n\r\n").encode() + body
        status, headers, answer = exchange(stack.port, request, timeout=30)
        assert status == 413, (framing, answer[:300])
        assert json.loads(answer)["error"]["code"] == "request_too_large"


def test_stalled_bodies_are_dropped_and_the_api_keeps_answering(stack):
    stalled = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", stack.port), timeout=30)
        sock.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{}"
        )
        stalled.append(sock)
    t0 = time.monotonic()
    status, _, body = exchange(stack.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 30)
    assert status == 200, body
    # 20 stalls over the API's threads, each dropped after BODY_TIMEOUT_S: a few rounds.
    assert time.monotonic() - t0 < 20 * BODY_TIMEOUT_S
    for sock in stalled:
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        sock.close()
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"


# -- 9. the smaller inconsistencies -------------------------------------------------------------


def test_base64_images_take_the_forms_mask_pngs_take(http):
    plain = b64(scene_image())
    urlsafe = plain.translate(str.maketrans("+/", "-_"))
    assert urlsafe != plain
    wrapped = "\n".join(plain[i : i + 76] for i in range(0, len(plain), 76))
    for value in (urlsafe, wrapped, plain.rstrip("="), "data:image/png;base64," + wrapped):
        job = http.json("POST", "/v1/jobs", job_body(image={"type": "base64", "value": value}))
        assert job["status"] == "queued"
    assert refused(http, job_body(image={"type": "base64", "value": "abc!"})).code == (
        "invalid_image"
    )


@pytest.mark.parametrize("value", ["1_0_0", " 24", "0x18", "inf", "24 ", "2,4", ""])
def test_numeric_options_refuse_strings_that_are_not_numbers(http, value):
    error = refused(http, job_body(options={**FAST, "resolution": value}))
    assert error.code == "invalid_option"


def test_a_number_in_a_string_is_still_taken(http):
    job = http.json("POST", "/v1/jobs", job_body(options={**FAST, "resolution": "24"}))
    assert job["status"] == "queued"


def test_prompts_must_be_a_list(http):
    body = {"image": {"type": "base64", "value": b64(scene_image())}}
    error = refused(http, {**body, "prompts": {"box": [10, 10, 60, 60]}})
    assert error.code == "invalid_prompt"


@pytest.mark.parametrize("coding", ["gzip, chunked", "deflate, chunked", "identity, chunked"])
def test_transfer_codings_other_than_chunked_are_501(stack, coding):
    data = json.dumps(job_body()).encode()
    request = (
        "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Transfer-Encoding: {coding}\r\n\r\n"
    ).encode() + chunked(data)
    status, _, answer = exchange(stack.port, request)
    assert status == 501, answer[:300]
    assert json.loads(answer)["error"]["code"] == "not_implemented"


# -- the fuzz test over the same classes -------------------------------------------------------

_urls = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
    st.sampled_from(["http", "https", "ftp", "HTTP", ""]),
    st.sampled_from(["example.com", "[127.0.0.1]", "[::1]", "127.0.0.1", "[", "a..b", "%00"]),
    st.one_of(st.just(""), st.integers(-5, 200_000).map(lambda p: f":{p}"), st.just(":x")),
    st.sampled_from(["/", "/a.png", "/?x=[", "#f"]),
)
_npy_headers = st.builds(
    lambda descr, shape: npy_with_header(
        f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    ),
    st.sampled_from(["<f4", "<f8", "<f2", "|O", "<i4", "<c8", "V8", "<U4", "zz"]),
    st.one_of(
        st.tuples(st.integers(-3, 10**9), st.integers(-3, 10**9)).map(str),
        st.just(f"({H}, {W})"),
        st.just(f"({H}, {W}, 3)"),
        st.text(max_size=10).map(repr),
    ),
)
_numbers = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(10**30), 10**30),
    st.text(max_size=8),
)


def _fuzz_body(draw_kind: str, value) -> tuple[str, dict]:
    if draw_kind == "image_url":
        return "/v1/jobs", {**job_body(), "image": {"type": "url", "value": value}}
    if draw_kind == "depth_url":
        return "/v1/jobs", {**job_body(), "depth": {"type": "url", "value": value}, "intrinsics": K}
    if draw_kind == "webhook_url":
        return "/v1/jobs", job_body(webhook_url=value)
    if draw_kind == "npy":
        return "/v1/jobs", depth_body(value, kind="pointmap" if len(value) % 2 else "depth")
    if draw_kind == "intrinsics":
        return "/v1/jobs", depth_body(npy(np.full((H, W), 3.0, np.float32)), value)
    if draw_kind == "option":
        return "/v1/jobs", job_body(options={**FAST, "resolution": value})
    if draw_kind == "base64":
        return "/v1/jobs", job_body(image={"type": "base64", "value": value})
    body = {"image": {"type": "base64", "value": b64(scene_image())}, "mask_input": SQUARE_FLAT}
    return "/sam3_3d/infer", {**body, "options": value}


_cases = st.one_of(
    st.tuples(st.sampled_from(["image_url", "depth_url", "webhook_url"]), _urls),
    st.tuples(st.just("npy"), _npy_headers),
    st.tuples(
        st.just("intrinsics"),
        st.fixed_dictionaries({"fx": _numbers, "fy": _numbers, "cx": _numbers, "cy": _numbers}),
    ),
    st.tuples(st.just("option"), _numbers),
    st.tuples(
        st.just("base64"),
        st.builds(
            lambda cut, junk: b64(scene_image())[:cut] + junk,
            st.integers(0, 400),
            st.text(alphabet="=-_+/\n \t!", max_size=6),
        ),
    ),
    st.tuples(
        st.just("roboflow"),
        st.fixed_dictionaries(
            {"formats": st.lists(st.sampled_from(["glb", "ply", "spz", "x"]), max_size=3)},
            optional={"scene": st.booleans(), **{k: st.just(v) for k, v in FAST.items()}},
        ),
    ),
)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=_cases)
def test_fuzzed_hostile_inputs_get_no_5xx_and_no_cut_body(stack, case):
    kind, value = case
    path, body = _fuzz_body(kind, value)
    status, answer = post_whole(stack.port, path, body)
    assert status < 500, (kind, value, answer[:300])
    parsed = json.loads(answer)  # the whole body: a cut one does not parse
    if status >= 400:
        assert isinstance(parsed["error"]["code"], str)


# -- and throughout, the other jobs ------------------------------------------------------------


def test_the_job_submitted_before_all_of_it_succeeded(http, bystander):
    final = wait_until(http, bystander["id"], lambda j: j["status"] in ("succeeded", "failed"), 60)
    assert final["status"] == "succeeded", final
    after = submit_json(http, SQUARE_FLAT)
    final = wait_until(http, after["id"], lambda j: j["status"] in ("succeeded", "failed"), 60)
    assert final["status"] == "succeeded", final
