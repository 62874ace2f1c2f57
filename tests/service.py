"""Helpers for the service tests: small inputs in every mask format, and stack factories."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import zlib
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from jobs.settings import Settings
from sam3d_jobs.devstack import DevStack

TESTS = Path(__file__).resolve().parent
H, W = 120, 160
FAST = {"splats": 800, "resolution": 24}


def exchange(port: int, request: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole answer: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                lines = head.decode("latin1").split("\r\n")
                headers = dict(line.split(": ", 1) for line in lines[1:])
                length = int(headers.get("Content-Length", -1))
                if len(body) >= length >= 0:
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def scene_image() -> bytes:
    yy, xx = np.mgrid[:H, :W]
    img = np.stack([xx * 255 // W, yy * 255 // H, np.full_like(xx, 90)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def scene_masks() -> np.ndarray:
    """Two blobs: an ellipse and a square."""
    yy, xx = np.mgrid[:H, :W]
    ellipse = ((xx - 50) / 30) ** 2 + ((yy - 60) / 40) ** 2 <= 1
    square = (xx >= 100) & (xx < 140) & (yy >= 30) & (yy < 70)
    return np.stack([ellipse, square])


def png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


SQUARE_FLAT = [100, 30, 140, 30, 140, 70, 100, 70]
TRIANGLE_FLAT = [20, 20, 80, 20, 50, 100]


def mask_inputs() -> dict[str, tuple[object, int]]:
    """{family: (mask_input, number of objects)} for every format family over JSON."""
    masks = scene_masks()
    rle = coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    rle_str = [{"counts": r["counts"].decode(), "size": r["size"]} for r in rle]
    flat_counts = []
    for m in masks:
        runs, current, count = [], False, 0
        for v in m.flatten(order="F"):
            if v != current:
                runs.append(count)
                current, count = v, 0
            count += 1
        runs.append(count)
        flat_counts.append({"counts": runs, "size": [H, W]})
    coco = {
        "images": [{"id": 7, "file_name": "scene.png", "width": W, "height": H}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "segmentation": rle_str[0], "iscrowd": 1},
            {"id": 2, "image_id": 7, "category_id": 1, "segmentation": [SQUARE_FLAT]},
        ],
    }
    return {
        "binary nested list": (masks[0].astype(int).tolist(), 1),
        "list of binary masks": (masks.astype(int).tolist(), 2),
        "base64 png": (b64(png(masks[1])), 1),
        "list of base64 png": ([b64(png(m)) for m in masks], 2),
        "flat polygon": (SQUARE_FLAT, 1),
        "flat polygons": ([SQUARE_FLAT, TRIANGLE_FLAT], 2),
        "points polygon": (np.array(SQUARE_FLAT).reshape(-1, 2).tolist(), 1),
        "rle string counts": (rle_str, 2),
        "rle list counts": (flat_counts[1], 1),
        "coco file": (coco, 2),
    }


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header claims a huge image."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def fixture_env() -> dict[str, str]:
    """Lets worker processes load tests/fixture_backends.py."""
    import os

    paths = [str(TESTS), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"PYTHONPATH": os.pathsep.join(paths)}


def make_stack(tmp: Path, *, workers: int = 0, **settings) -> DevStack:
    """A stack on free ports in ``tmp`` (not started)."""
    return DevStack(
        tmp,
        workers=workers,
        settings=Settings(**settings) if settings else None,
        extra_env={**fixture_env(), "SAM3D_FIXTURE_SLOW_S": "1.0"},
        api_workers=1,
    )


def serve_on_loopback(handler: type) -> tuple[ThreadingHTTPServer, str]:
    """An HTTP server of ``handler`` on a free loopback port, in a daemon thread; its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def worker_starter(stack: DevStack):
    """A fixture body: yields ``start(backend, queues, env)``, which starts a worker on
    ``stack`` and waits for it; every worker (restarted ones too) is stopped afterwards."""
    started = []

    def start(backend="inflate", queues="interactive,bulk", env=None):
        proc = stack.start_worker(backend=backend, queues=queues, env=env)
        started.append(proc)
        stack.wait_ready(60)
        return proc

    yield start
    for proc in [*started, *stack.workers]:
        stack.stop_worker(proc)


def submit_json(http, mask_input, *, options=None, headers=None, **extra) -> dict:
    body = {"image": {"type": "base64", "value": b64(scene_image())}, "mask_input": mask_input}
    body["options"] = {**FAST, **(options or {})}
    body.update(extra)
    return http.json("POST", "/v1/jobs", body, headers=headers)


def wait_until(http, job_id: str, predicate, timeout: float = 30) -> dict:
    """Poll a job until ``predicate(job)`` holds; fail the test with its last state if not."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        job = http.json("GET", f"/v1/jobs/{job_id}")
        if predicate(job):
            return job
        assert time.monotonic() < deadline, f"timed out; last state {job}"
        time.sleep(0.05)


def listed_files(root: Path, job_id: str) -> list[str]:
    base = root / "storage" / "jobs" / job_id
    return sorted(
        str(p.relative_to(base))
        for p in base.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    )


def manifest_of(http, job: dict) -> dict:
    import urllib.request

    with urllib.request.urlopen(job["result"]["manifest"]["url"]) as resp:
        return json.loads(resp.read())


class NginxProxy:
    """nginx with deploy/base/nginx/sam3d.conf.template in front of ``upstream`` (host:port), on
    a free port, as compose and Kubernetes run it."""

    TEMPLATE = TESTS.parent / "deploy" / "base" / "nginx" / "sam3d.conf.template"

    def __init__(self, tmp: Path, upstream: str) -> None:
        from jobs.redis_server import free_port

        self.dir = Path(tmp)
        self.port = free_port()
        self.upstream = upstream
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> NginxProxy:
        import shutil
        import subprocess
        import time
        import urllib.error
        import urllib.request

        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.dir.mkdir(parents=True, exist_ok=True)
        server = self.TEMPLATE.read_text()
        server = server.replace("${SAM3D_API_UPSTREAM}", self.upstream)
        server = server.replace("${SAM3D_PROXY_PORT}", f"127.0.0.1:{self.port}")
        (self.dir / "sam3d.conf").write_text(server)
        temps = []
        for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.dir / name).mkdir(exist_ok=True)
            (self.dir / name).chmod(0o777)  # nginx's workers drop root
            temps.append(
                f"{name if name != 'body' else 'client_body'}_temp_path {self.dir / name};"
            )
        (self.dir / "nginx.conf").write_text(
            f"daemon off;\nworker_processes 1;\npid {self.dir / 'nginx.pid'};\n"
            f"error_log {self.dir / 'error.log'} warn;\n"
            "events { worker_connections 1024; }\n"
            "http {\n  access_log off;\n  " + "\n  ".join(temps) + "\n"
            f"  include {self.dir / 'sam3d.conf'};\n}}\n"
        )
        self.proc = subprocess.Popen(
            [nginx, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "stderr.log", "wb"),  # noqa: SIM115 - owned by the child
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.dir / "stderr.log").read_text())
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=1).close()
                return self
            except urllib.error.HTTPError:
                return self  # nginx answers (its upstream may be down on purpose)
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"nginx did not start; see {self.dir}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
