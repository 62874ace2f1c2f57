"""The Python SDK (``sam3d_client.Client``) and ``sam3d-jobs submit`` against the real dev stack:
gunicorn API, Celery workers, a private Redis, local-disk storage behind signed URLs."""

from __future__ import annotations

import http.client
import http.server
import io
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_COCO, SAMPLE_IMAGE, sample_masks_reference
from PIL import Image
from pycocotools import mask as coco_mask
from sam3d_client import Client, InvalidInput, JobCanceled, JobFailed, ServiceError
from sam3d_client.inputs import encode_masks
from sam3d_client.transport import RetryPolicy
from service import (
    FAST,
    SQUARE_FLAT,
    TRIANGLE_FLAT,
    H,
    W,
    make_stack,
    png,
    scene_image,
    scene_masks,
)

CLI = str(Path(sys.executable).parent / "sam3d-jobs")
# Signed URLs expire at a whole second: with 2 s, a fresh URL lives at least 1 s.
URL_TTL_S = 2
LAYOUT = {
    "scene.glb",
    "scene.ply",
    "manifest.json",
    "objects/0.glb",
    "objects/0.ply",
    "objects/1.glb",
    "objects/1.ply",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """inflate on 'interactive' only: a job with priority 'bulk' stays queued (to cancel)."""
    s = make_stack(tmp_path_factory.mktemp("sdk-stack"))
    s.start(wait=False)
    s.start_worker(backend="inflate", queues="interactive")
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(stack) -> Client:
    return Client(stack.url)


@pytest.fixture(scope="module")
def short_ttl_stack(tmp_path_factory):
    """Signed URLs live URL_TTL_S; 'bulk' jobs go to a backend that always raises."""
    s = make_stack(tmp_path_factory.mktemp("ttl-stack"), url_ttl_s=URL_TTL_S)
    s.start(wait=False)
    s.start_worker(backend="inflate", queues="interactive")
    s.start_worker(backend="fixture_backends:FailingBackend", queues="bulk")
    s.wait_ready()
    yield s
    s.stop()


def areas(job) -> list[int]:
    manifest = job.result().manifest.json()
    return [obj["mask"]["area"] for obj in manifest["objects"]]


def expected_areas(masks: np.ndarray) -> list[int]:
    return [int(m.sum()) for m in masks]


# -- inputs ----------------------------------------------------------------------------------


def image_as(kind: str, tmp_path: Path) -> object:
    data = scene_image()
    if kind == "path":
        path = tmp_path / "scene.png"
        path.write_bytes(data)
        return path
    if kind == "str path":
        path = tmp_path / "scene.png"
        path.write_bytes(data)
        return str(path)
    if kind == "bytes":
        return data
    if kind == "PIL":
        return Image.open(io.BytesIO(data))
    assert kind == "numpy"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("kind", ["path", "str path", "bytes", "PIL", "numpy"])
def test_submit_each_image_kind(client, tmp_path, kind):
    masks = scene_masks()
    job = client.submit(image_as(kind, tmp_path), masks, **FAST)
    assert job.status == "queued" and job.id.startswith("job_")
    result = job.result(timeout=60)
    assert result.camera["width"] == W and result.camera["height"] == H
    assert areas(job) == expected_areas(masks)


class FakeDetections:
    """A stand-in for ``supervision.Detections`` (not installed here): the SDK only reads
    its ``mask`` attribute, an (N, H, W) bool array."""

    def __init__(self, mask: np.ndarray | None) -> None:
        self.mask = mask  # None when the detector made boxes only
        self.xyxy = np.zeros((0 if mask is None else len(mask), 4))


def coco_rle(mask: np.ndarray) -> dict:
    """pycocotools' own output: ``counts`` as bytes (not JSON-ready)."""
    return coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))


def mask_kinds(tmp_path: Path) -> dict[str, tuple[object, list[int] | int]]:
    """{kind: (masks, expected areas or object count)}."""
    masks = scene_masks()
    exact = expected_areas(masks)
    np.save(tmp_path / "masks.npy", masks)
    (tmp_path / "square.png").write_bytes(png(masks[1]))
    coco = {
        "images": [{"id": 3, "file_name": "scene.png", "width": W, "height": H}],
        "annotations": [
            {"id": 1, "image_id": 3, "segmentation": coco_rle(masks[0]), "iscrowd": 1},
            {"id": 2, "image_id": 3, "segmentation": [SQUARE_FLAT], "iscrowd": 0},
        ],
    }
    (tmp_path / "coco.json").write_text(
        json.dumps({**coco, "annotations": [{**coco["annotations"][1]}]})
    )
    return {
        "numpy (N,H,W)": (masks, exact),
        "numpy (H,W)": (masks[0], exact[:1]),
        "numpy uint8 0/255": (masks.astype(np.uint8) * 255, exact),
        "list of arrays": ([masks[0], masks[1]], exact),
        "nested list": (masks[0].astype(int).tolist(), exact[:1]),
        "flat polygons": ([SQUARE_FLAT, TRIANGLE_FLAT], 2),
        "RLE dict (bytes counts)": (coco_rle(masks[1]), exact[1:]),
        "RLE list": ([coco_rle(m) for m in masks], exact),
        "COCO dict": (coco, exact),
        "detections (.mask)": (FakeDetections(masks), exact),
        "PNG bytes": (png(masks[1]), exact[1:]),
        "list of PNG bytes": ([png(m) for m in masks], exact),
        ".npy path": (tmp_path / "masks.npy", exact),
        ".png path": (str(tmp_path / "square.png"), exact[1:]),
        ".json COCO path": (tmp_path / "coco.json", exact[1:]),
        "mixed paths, in order": ([tmp_path / "square.png", tmp_path / "masks.npy"], 3),
    }


def test_submit_each_mask_kind(client, tmp_path):
    kinds = mask_kinds(tmp_path)
    image = scene_image()
    jobs = {kind: client.submit(image, masks, **FAST) for kind, (masks, _) in kinds.items()}
    for kind, job in jobs.items():
        want = kinds[kind][1]
        got = areas(job.wait(timeout=60))
        if isinstance(want, int):
            assert len(got) == want, kind
        else:
            assert got == want, kind
    # The mixed list keeps its order: the square first, then the .npy's two masks.
    assert areas(jobs["mixed paths, in order"]) == [
        int(scene_masks()[1].sum()),
        *expected_areas(scene_masks()),
    ]


def test_numpy_masks_travel_as_compact_rle():
    masks = scene_masks()
    payload = encode_masks(masks, image=scene_image())
    assert payload.mask_format == "rle" and not payload.files
    assert len(payload.mask_input) == 2
    assert len(json.dumps(payload.mask_input)) < masks[0].size // 10  # far below H*W numbers
    decoded = coco_mask.decode(payload.mask_input[0]).astype(bool)
    assert np.array_equal(decoded, masks[0])


def test_mixed_sources_keep_their_order_without_decoding(tmp_path):
    masks = scene_masks()
    polygons = tmp_path / "polygons.json"
    polygons.write_text(json.dumps([SQUARE_FLAT]))
    # A JSON source first, then arrays: mask_input, then the arrays as PNG files.
    payload = encode_masks([polygons, masks[0], masks[1]], image=b"")
    assert payload.mask_input == [SQUARE_FLAT] and len(payload.files) == 2
    decoded = [np.asarray(Image.open(io.BytesIO(f))) > 127 for f in payload.files]
    assert all(np.array_equal(d, m) for d, m in zip(decoded, masks, strict=True))
    # A JSON source after another kind cannot keep its order: refused, not reordered.
    with pytest.raises(InvalidInput, match="must come first") as info:
        encode_masks([masks[0], polygons], image=b"")
    assert info.value.code == "invalid_mask"


# -- waiting, results, files ------------------------------------------------------------------


def test_wait_shows_progress_and_result_mirrors_the_response(client, capsys):
    job = client.submit(scene_image(), scene_masks(), seed=2, **FAST)
    assert job.wait(timeout=60, progress=True) is job
    err = capsys.readouterr().err
    assert job.id in err and "succeeded" in err and "2/2 objects" in err
    assert job.progress == (2, 2)
    result = job.result()
    assert result.job_id == job.id and result.time > 0
    assert result.mesh_glb.content_type == "model/gltf-binary"
    assert [o.index for o in result.objects] == [0, 1]
    meta = result.objects[1].metadata
    assert len(meta.rotation) == 4 and len(meta.translation) == 3 and len(meta.scale) == 3
    assert meta.matrix_array().shape == (4, 4)
    assert meta.matrix == job.data["result"]["objects"][1]["metadata"]["matrix"]


def test_artifacts_download_lazily_once(client, tmp_path):
    job = client.submit(scene_image(), scene_masks(), **FAST)
    result = job.result(timeout=60)
    glb = result.objects[0].mesh_glb
    assert not glb.downloaded  # nothing fetched until asked
    data = glb.read()
    assert glb.downloaded and data[:4] == b"glTF" and len(data) == glb.size == glb.bytes_size
    glb.url = "http://127.0.0.1:9/nothing-listens-here"  # a second read must not fetch
    assert glb.read() is data
    saved = glb.save(tmp_path / "deep" / "obj0.glb")
    assert saved.read_bytes() == data
    ply = result.gaussian_ply.save(tmp_path / "scene.ply")  # streamed, never read into memory
    assert ply.read_bytes()[:3] == b"ply" and not result.gaussian_ply.downloaded


def test_download_writes_the_generate_layout(client, tmp_path):
    job = client.submit(scene_image(), scene_masks(), **FAST)
    files = job.download(tmp_path / "out")
    on_disk = {
        str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file()
    }
    assert set(files) == on_disk == LAYOUT
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["job_id"] == job.id and len(manifest["objects"]) == 2
    for name, artifact in job.result().files().items():
        assert (tmp_path / "out" / name).stat().st_size == artifact.size


def test_list_jobs(client):
    job = client.submit(scene_image(), scene_masks()[:1], **FAST).wait(timeout=60)
    listed = [j.id for j in client.jobs(status="succeeded", page_size=2)]
    assert job.id in listed and len(listed) == len(set(listed))


# -- cancel, failures, errors -----------------------------------------------------------------


def test_cancel_a_queued_job(client):
    job = client.submit(scene_image(), scene_masks(), priority="bulk", **FAST)  # no bulk worker
    with pytest.raises(TimeoutError):
        job.wait(timeout=0.5)
    assert job.status == "queued" and job.queue_position is not None
    assert job.cancel().status == "canceled"
    with pytest.raises(JobCanceled) as info:
        job.result()
    assert isinstance(info.value, JobFailed) and info.value.code == "canceled"
    with pytest.raises(ServiceError) as info:
        job.delete() or client.job(job.id)
    assert info.value.status == 404 and info.value.code == "not_found"


def test_failed_job_raises_job_failed(short_ttl_stack):
    client = Client(short_ttl_stack.url)
    job = client.submit(scene_image(), scene_masks(), priority="bulk", **FAST)
    with pytest.raises(JobFailed) as info:
        job.result(timeout=60)
    assert info.value.code == "backend_failed" and info.value.retryable
    assert "the model fell over" in info.value.message and info.value.job is job


@pytest.mark.parametrize(
    ("image", "masks", "options", "status", "code"),
    [
        (scene_image(), np.zeros((1, 10, 10), bool) | True, {}, 422, "mask_size_mismatch"),
        (scene_image(), np.zeros((H, W), bool), {}, 422, "empty_mask"),
        (b"GIF89a not an image", [SQUARE_FLAT], {}, 400, "invalid_image"),
        (scene_image(), [SQUARE_FLAT], {"splats": -3}, 400, "invalid_option"),
        (scene_image(), None, {}, 400, "invalid_mask"),
    ],
    ids=["size mismatch", "empty mask", "bad image", "bad option", "no masks"],
)
def test_bad_input_raises_service_error(client, image, masks, options, status, code):
    with pytest.raises(ServiceError) as info:
        client.submit(image, masks, **options)
    assert (info.value.status, info.value.code) == (status, code)
    assert info.value.message and not info.value.retryable


def test_bad_input_refused_before_any_request(client, tmp_path):
    with pytest.raises(InvalidInput) as info:
        client.submit(scene_image(), object())
    assert info.value.code == "invalid_mask" and info.value.status is None
    assert isinstance(info.value, ValueError)
    with pytest.raises(InvalidInput, match="cannot read image file"):
        client.submit(tmp_path / "nope.jpg", [SQUARE_FLAT])
    with pytest.raises(InvalidInput, match="no masks to send"):
        client.submit(scene_image(), FakeDetections(None))
    with pytest.raises(ServiceError) as info:
        client.job("job_doesnotexist")
    assert (info.value.status, info.value.code) == (404, "not_found")


def test_idempotency_key_returns_the_same_job(client):
    first = client.submit(scene_image(), [SQUARE_FLAT], idempotency_key="sdk-test-17", **FAST)
    again = client.submit(scene_image(), [SQUARE_FLAT], idempotency_key="sdk-test-17", **FAST)
    assert again.id == first.id and again.replayed and not first.replayed
    other = client.submit(scene_image(), [SQUARE_FLAT], **FAST)  # a key of its own
    assert other.id != first.id


# -- expired URLs and transient errors --------------------------------------------------------


def test_expired_url_is_renewed_and_retried_once(short_ttl_stack, proxies, tmp_path):
    proxy = proxies(short_ttl_stack.url)  # counts the API requests (files go direct)
    client = Client(proxy.url)
    job = client.submit(scene_image(), scene_masks(), **FAST)
    result = job.result(timeout=60)
    polls = len(proxy.seen)
    old_url = result.manifest.url
    time.sleep(URL_TTL_S + 1.1)  # past the URLs' lifetime
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(old_url)
    assert info.value.code == 403
    assert result.objects[0].mesh_glb.read()[:4] == b"glTF"  # 403, fresh URLs, retried
    assert len(proxy.seen) == polls + 1  # the one job GET that minted fresh URLs
    files = job.download(tmp_path / "out")  # every other URL had expired: the same GET serves
    assert set(files) == LAYOUT and len(proxy.seen) == polls + 1
    assert result.manifest.json()["job_id"] == job.id  # adopts the URL the GET minted
    assert result.manifest.url != old_url and len(proxy.seen) == polls + 1


class FlakyProxy(http.server.ThreadingHTTPServer):
    """A real HTTP proxy in front of the stack that misbehaves on cue: each request takes the
    next fault from ``faults`` (an HTTP status to answer instead, ``"drop"`` to close without
    answering, ``"lose answer"`` to forward and then close without answering), then passes
    requests through."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults: list[object] = []
        self.seen: list[tuple[str, str, object]] = []  # (method, path, fault)
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: FlakyProxy

    def log_message(self, *args) -> None:
        pass

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fault = self.server.faults.pop(0) if self.server.faults else None
        self.server.seen.append((self.command, self.path, fault))
        if fault == "drop":
            self.close_connection = True
            return
        if isinstance(fault, int):
            payload = json.dumps({"error": {"code": "busy", "message": "try later"}}).encode()
            self.send_response(fault)
            self.send_header("Retry-After", "1" if fault == 429 else "0")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        host = self.server.upstream.removeprefix("http://")
        conn = http.client.HTTPConnection(host, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        conn.request(self.command, self.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if fault == "lose answer":  # the work is done upstream; its answer never arrives
            self.close_connection = True
            return
        self.send_response(resp.status)
        for name in ("Content-Type", "Retry-After", "Idempotent-Replayed", "Location"):
            if resp.getheader(name):
                self.send_header(name, resp.getheader(name))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _handle


@pytest.fixture
def proxies():
    servers: list[FlakyProxy] = []
    yield lambda upstream: servers.append(FlakyProxy(upstream)) or servers[-1]
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy(stack, proxies) -> FlakyProxy:
    return proxies(stack.url)


def job_count(client: Client) -> int:
    return sum(1 for _ in client.jobs())


def test_gets_are_retried_through_transient_errors(client, proxy):
    job = client.submit(scene_image(), [SQUARE_FLAT], **FAST).wait(timeout=60)
    flaky = Client(proxy.url, retry=RetryPolicy(backoff_s=0.01))
    proxy.faults = [503, "drop", 502, 504]
    assert flaky.job(job.id).status == "succeeded"
    assert [fault for _, _, fault in proxy.seen] == [503, "drop", 502, 504, None]


def test_429_waits_as_retry_after_says(client, proxy):
    flaky = Client(proxy.url, retry=RetryPolicy(backoff_s=0.01))
    proxy.faults = [429]
    started = time.monotonic()
    job = flaky.submit(scene_image(), [SQUARE_FLAT], **FAST)
    assert time.monotonic() - started >= 1.0  # Retry-After: 1
    assert job.id and [fault for _, _, fault in proxy.seen] == [429, None]


def test_a_submit_whose_answer_was_lost_makes_one_job(client, proxy):
    flaky = Client(proxy.url, retry=RetryPolicy(backoff_s=0.01))
    before = job_count(client)
    proxy.faults = ["lose answer", 503]
    job = flaky.submit(scene_image(), [SQUARE_FLAT], **FAST)  # no key given: one is made
    assert job.replayed  # the third try got the job the first one made
    assert [m for m, _, _ in proxy.seen] == ["POST"] * 3
    assert job_count(client) == before + 1


def test_errors_that_are_not_transient_are_not_retried(proxy):
    flaky = Client(proxy.url, retry=RetryPolicy(backoff_s=0.01))
    with pytest.raises(ServiceError) as info:
        flaky.job("job_missing")
    assert info.value.status == 404 and len(proxy.seen) == 1
    dead = Client("http://127.0.0.1:9", retry=RetryPolicy(attempts=2, backoff_s=0.01))
    with pytest.raises(ServiceError) as info:
        dead.job("job_x")
    assert info.value.code == "connection_error" and info.value.retryable


# -- sam3d-jobs submit ------------------------------------------------------------------------


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120, env=env)


def test_cli_submit_wait_out(stack, tmp_path):
    run = cli(
        "submit",
        str(SAMPLE_IMAGE),
        "--masks",
        str(SAMPLE_COCO),
        "--server",
        stack.url,
        "--options",
        json.dumps(FAST),
        "--out",
        str(tmp_path / "out"),
    )
    assert run.returncode == 0, run.stderr
    job_id = run.stdout.strip()
    assert job_id.startswith("job_") and "\n" not in job_id
    assert "succeeded" in run.stderr and "3/3 objects" in run.stderr
    objects = len(sample_masks_reference())
    names = {"scene.glb", "scene.ply", "manifest.json"}
    names |= {f"objects/{i}.{ext}" for i in range(objects) for ext in ("glb", "ply")}
    on_disk = {
        str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file()
    }
    assert on_disk == names
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["job_id"] == job_id


def test_cli_submit_without_wait_prints_the_id(stack, tmp_path):
    mask = tmp_path / "m.png"
    mask.write_bytes(png(sample_masks_reference()[0]))
    run = cli("submit", str(SAMPLE_IMAGE), "--masks", str(mask), "--server", stack.url)
    assert run.returncode == 0, run.stderr
    assert Client(stack.url).job(run.stdout.strip()).id == run.stdout.strip()


def test_cli_submit_bad_input_exits_2_with_one_line(stack, tmp_path):
    mask = tmp_path / "small.png"
    mask.write_bytes(png(np.ones((10, 10), bool)))
    run = cli("submit", str(SAMPLE_IMAGE), "--masks", str(mask), "--server", stack.url)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "mask_size_mismatch" in run.stderr
    run = cli("submit", str(SAMPLE_IMAGE), "--masks", str(tmp_path / "x.txt"), "--server", "x")
    assert run.returncode == 2 and "unknown extension" in run.stderr


def test_cli_submit_failed_job_exits_1(short_ttl_stack):
    run = cli(
        "submit",
        str(SAMPLE_IMAGE),
        "--masks",
        str(SAMPLE_COCO),
        "--server",
        short_ttl_stack.url,
        "--options",
        json.dumps({**FAST, "priority": "bulk"}),
        "--wait",
    )
    assert run.returncode == 1
    assert "backend_failed" in run.stderr.splitlines()[-1]
