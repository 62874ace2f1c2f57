"""The buffering reverse proxy (deploy/base/nginx/sam3d.conf.template, the file compose and
Kubernetes mount) run with a real nginx in front of the real API: slow clients are held by
nginx, not by gunicorn's threads, and nginx's own errors are the API's JSON."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from sam3d_client.http import Http
from service import SQUARE_FLAT, NginxProxy, make_stack, submit_json

from jobs.redis_server import free_port

SLOW_CLIENTS = 32  # gunicorn here: 1 process x 8 threads


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = make_stack(tmp_path_factory.mktemp("proxied"))
    s.start(wait=False)
    s.start_worker()
    s.wait_ready(60)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def proxy(stack, tmp_path_factory):
    p = NginxProxy(tmp_path_factory.mktemp("nginx"), f"127.0.0.1:{stack.port}").start()
    yield p
    p.stop()


def slowloris(port: int, stop: threading.Event) -> None:
    """Headers a byte at a time, never finished; or a body promised and never sent."""
    socks = []
    for i in range(SLOW_CLIENTS):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if i % 2:
            sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        else:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        socks.append(sock)
    while not stop.wait(0.5):
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.sendall(b"X")  # a body byte, or a header byte that never ends a line
    for sock in socks:
        sock.close()


def probes(url: str, count: int = 16) -> int:
    """How many of ``count`` health probes (1 s timeout each) answered 200."""
    ok = 0
    for _ in range(count):
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as resp:
                ok += resp.status == 200
        except OSError:
            pass
        time.sleep(0.05)
    return ok


def under_slowloris(port: int, url: str, count: int = 16) -> int:
    stop = threading.Event()
    attack = threading.Thread(target=slowloris, args=(port, stop), daemon=True)
    attack.start()
    time.sleep(1.0)
    try:
        return probes(url, count)
    finally:
        stop.set()
        attack.join(10)


def test_slow_clients_are_held_by_the_proxy_not_by_gunicorn(stack, proxy):
    direct = under_slowloris(stack.port, stack.url, count=4)  # the figure, not a check
    proxied = under_slowloris(proxy.port, proxy.url)
    print(f"\nhealth probes answered under {SLOW_CLIENTS} slow clients: "
          f"direct to gunicorn {direct}/4, through nginx {proxied}/16")  # fmt: skip
    assert proxied == 16


def test_jobs_submitted_through_the_proxy_under_slowloris_end_once(proxy):
    stop = threading.Event()
    attack = threading.Thread(target=slowloris, args=(proxy.port, stop), daemon=True)
    attack.start()
    time.sleep(1.0)
    try:
        http = Http(proxy.url, timeout=10)
        ids = [submit_json(http, SQUARE_FLAT)["id"] for _ in range(3)]
        finals = [http.wait(job_id, timeout=60) for job_id in ids]
    finally:
        stop.set()
        attack.join(10)
    assert [(j["status"], j["attempts"]) for j in finals] == [("succeeded", 1)] * 3


def raw_error(url: str, **kwargs) -> tuple[int, dict, dict]:
    try:
        urllib.request.urlopen(urllib.request.Request(url, **kwargs), timeout=10)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())
    raise AssertionError("no error")


def test_the_proxy_answers_its_own_errors_in_json(proxy):
    status, _, body = raw_error(proxy.url + "/healthz", headers={"X-Big": "x" * 20_000})
    assert status == 400 and body["error"]["code"] == "bad_request"
    status, _, body = raw_error(proxy.url + "/v1/jobs", data=b"x" * (65 * 2**20), method="POST")
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_the_api_away_answers_503_unavailable_with_retry_after(tmp_path):
    dead = NginxProxy(tmp_path, f"127.0.0.1:{free_port()}").start()
    try:
        status, headers, body = raw_error(dead.url + "/v1/jobs")
    finally:
        dead.stop()
    assert status == 503 and body["error"]["code"] == "unavailable"
    assert headers["Retry-After"] == "5"
