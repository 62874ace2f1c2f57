"""The error registry: one entry per code, the README generated from it, no code outside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from werkzeug.exceptions import (
    ImATeapot,
    InternalServerError,
    MethodNotAllowed,
    NotFound,
    RequestEntityTooLarge,
)

from api.errors import http_error
from jobs.errors import (
    ERRORS,
    REFERENCE_FILE,
    ErrorCode,
    Sam3dError,
    job_error,
    readme_section,
)
from jobs.limits import RateLimited

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "jobs", "worker", "sam3d_jobs", "sdk/sam3d_client")


def test_every_code_has_one_registry_entry():
    assert set(ERRORS) == set(ErrorCode)
    for code, entry in ERRORS.items():
        assert 400 <= entry.status <= 599, code
        assert entry.when, code


def test_the_error_reference_is_generated_from_the_registry():
    reference = (ROOT / REFERENCE_FILE).read_text(encoding="utf-8")
    assert readme_section() in reference, f"{REFERENCE_FILE} is stale: run `python -m jobs.errors`"


def test_status_retryable_and_retry_after_come_from_the_registry():
    exc = Sam3dError(ErrorCode.UNAVAILABLE, "Redis is away")
    assert (exc.status, exc.retryable) == (503, True)
    assert exc.response_headers() == {"Retry-After": "5"}
    assert Sam3dError("invalid_mask", "x").status == 400
    assert not Sam3dError("invalid_mask", "x").response_headers()
    limited = RateLimited(ErrorCode.TOO_MANY_IN_FLIGHT, "3 in flight", 0.2)
    assert (limited.status, limited.code, limited.response_headers()) == (
        429,
        ErrorCode.TOO_MANY_IN_FLIGHT,
        {"Retry-After": "1"},
    )
    assert job_error(ErrorCode.TIMEOUT, "late") == {
        "code": "timeout",
        "message": "late",
        "retryable": False,
    }
    with pytest.raises(ValueError):
        Sam3dError("no_such_code", "unregistered codes are refused")


@pytest.mark.parametrize(
    ("exc", "code", "status"),
    [
        (NotFound(), "not_found", 404),
        (MethodNotAllowed(["GET", "POST"]), "method_not_allowed", 405),
        (RequestEntityTooLarge(), "request_too_large", 413),
        # Statuses with no code of their own: the nearest registered one.
        (ImATeapot(), "invalid_request", 400),
        (InternalServerError(), "internal_error", 500),
    ],
)
def test_http_layer_errors_map_to_registered_codes(exc, code, status):
    error = http_error(exc)
    assert (error.code.value, error.status) == (code, status)
    if isinstance(exc, MethodNotAllowed):
        assert error.response_headers() == {"Allow": "GET, POST"}


def _sources():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def test_no_code_branches_on_a_message():
    # Decisions are made on codes and types; messages are for people.
    pattern = re.compile(r"""["'][^"']*["']\s+(not\s+)?in\s+\w+\.message|\.message\s*==""")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in _sources()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders


def test_no_error_code_is_a_loose_string():
    # A code written as a string literal next to "code" must be a registered one.
    literal = re.compile(r"""["']code["']\s*:\s*["']([a-z_]+)["']""")
    server = {c.value for c in ErrorCode}
    for path in _sources():
        if path.parts[-2] == "sam3d_client" or path.name == "openapi.py":
            continue  # the SDK's own codes (connection_error, ...) are not the server's
        for code in literal.findall(path.read_text(encoding="utf-8")):
            assert code in server, f"{path.relative_to(ROOT)}: {code!r} is not registered"
