"""Jobs from prompts (boxes, points, text) end to end: a real redis-server, real Celery worker
processes segmenting with GrabCut, the API over HTTP, local-disk storage."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from pycocotools import mask as coco_mask
from sam3d_client.http import ApiError, Http
from service import FAST, TESTS, b64, listed_files, make_stack, manifest_of, wait_until

from jobs.masks import decode_masks

SAMPLE = TESTS.parent / "samples" / "shapes.jpg"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = make_stack(
        tmp_path_factory.mktemp("prompts"),
        max_masks=4,
        job_time_limit_s=20,
        visibility_timeout_s=90,
        heartbeat_interval_s=0.5,
        heartbeat_ttl_s=2.0,
    )
    s.start(wait=False)
    s.start_worker(backend="inflate", queues="interactive")
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(stack) -> Http:
    return Http(stack.url)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    coco = json.loads((TESTS.parent / "samples" / "shapes.coco.json").read_text())
    return decode_masks(coco, (480, 640))


def loose_box(mask: np.ndarray, pad: int = 12) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [
        float(max(0, xs.min() - pad)),
        float(max(0, ys.min() - pad)),
        float(min(640, xs.max() + 1 + pad)),
        float(min(480, ys.max() + 1 + pad)),
    ]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def submit(http: Http, prompts, **extra) -> dict:
    body = {
        "image": {"type": "base64", "value": b64(SAMPLE.read_bytes())},
        "prompts": prompts,
        "options": FAST,
        **extra,
    }
    return http.json("POST", "/v1/jobs", body)


def rle_mask(entry: dict) -> np.ndarray:
    rle = entry["rle"]
    return coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def test_a_job_from_boxes_succeeds_with_its_masks_in_the_manifest(stack, http, reference):
    job = submit(http, [{"box": loose_box(m)} for m in reference])
    done = wait_until(http, job["id"], lambda j: j["status"] in ("succeeded", "failed"), 60)
    assert done["status"] == "succeeded", done["error"]
    manifest = manifest_of(http, done)
    assert len(manifest["objects"]) == 3
    for i, obj in enumerate(manifest["objects"]):
        mask = obj["mask"]
        assert mask["prompt"] == i and mask["score"] is None  # GrabCut has no score
        assert mask["segmenter"].startswith("grabcut opencv-")
        assert iou(rle_mask(mask), reference[i]) > 0.9
        assert mask["area"] == int(rle_mask(mask).sum())
    # The same RLE reaches GET /v1/jobs/{id} (the page draws it over the photo).
    assert done["objects"][0]["mask"]["rle"] == manifest["objects"][0]["mask"]["rle"]
    files = listed_files(stack.data_dir, job["id"])
    assert {"input/prompts.json", "input/masks.json", "input/segments.json"} <= set(files)


def test_a_job_from_clicked_points_over_multipart(stack, http, reference):
    import urllib.request

    ys, xs = np.nonzero(reference[0])
    prompts = [{"points": [[float(xs.mean()), float(ys.mean()), 1], [20.0, 20.0, 0]]}]
    boundary = "sam3dboundary"
    parts = [
        (b'name="image"; filename="shapes.jpg"', SAMPLE.read_bytes()),
        (b'name="prompts"', json.dumps(prompts).encode()),
        (b'name="options"', json.dumps(FAST).encode()),
    ]
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Disposition: form-data; " + head + b"\r\n\r\n"
        + data + b"\r\n"
        for head, data in parts
    ) + b"--" + boundary.encode() + b"--\r\n"  # fmt: skip
    request = urllib.request.Request(
        stack.url + "/v1/jobs",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(request) as resp:
        job = json.loads(resp.read())
    done = wait_until(http, job["id"], lambda j: j["status"] in ("succeeded", "failed"), 60)
    assert done["status"] == "succeeded", done["error"]
    mask = manifest_of(http, done)["objects"][0]["mask"]
    assert iou(rle_mask(mask), reference[0]) > 0.9


@pytest.mark.parametrize(
    ("prompts", "extra", "status", "code"),
    [
        ([{"text": "ball"}], {}, 422, "unsupported_prompt"),  # grabcut reads no text
        ([{"box": [10, 10, 700, 100]}], {}, 422, "prompt_out_of_bounds"),
        ([{"points": [[10, 500, 1]]}], {}, 422, "prompt_out_of_bounds"),
        ([{"box": [10, 10, 11, 100]}], {}, 400, "invalid_prompt"),  # degenerate
        ([{"box": [50, 10, 10, 100]}], {}, 400, "invalid_prompt"),  # x1 < x0
        ([{"points": [[10, 10, 2]]}], {}, 400, "invalid_prompt"),
        ([{"points": [[10, 10, 0]]}], {}, 400, "invalid_prompt"),  # nothing on the object
        ([{"text": "   "}], {}, 400, "invalid_prompt"),
        ([{"text": "x" * 200}], {}, 400, "invalid_prompt"),
        ([{"box": [1, 1, 50, 50], "colour": "red"}], {}, 400, "invalid_prompt"),
        ([], {}, 400, "invalid_prompt"),
        ([{"box": [1, 1, 50, 50]}] * 5, {}, 422, "too_many_masks"),
        ([{"box": [1, 1, 50, 50]}], {"mask_input": [[1, 1, 9, 1, 9, 9]]}, 400, "invalid_request"),
    ],
)
def test_bad_prompts_get_a_stable_4xx(http, prompts, extra, status, code):
    with pytest.raises(ApiError) as info:
        submit(http, prompts, **extra)
    assert (info.value.status, info.value.code) == (status, code), info.value
    if code == "unsupported_prompt":
        assert "sam3" in str(info.value)  # it names what is needed


def test_a_redelivered_job_does_not_segment_again(stack, http, reference):
    """Killed after segmenting, mid 3D: the next run reuses the stored masks."""
    victim = stack.start_worker(backend="fixture_backends:SlowInflate", queues="bulk")
    stack.wait_ready()
    job = submit(
        http, [{"box": loose_box(m)} for m in reference[:2]], options={**FAST, "priority": "bulk"}
    )
    wait_until(http, job["id"], lambda j: j["stage"] == "generating", 60)
    inputs = stack.data_dir / "storage" / "jobs" / job["id"] / "input"
    stamps = {n: (inputs / n).stat().st_mtime_ns for n in ("masks.json", "segments.json")}
    masks = (inputs / "masks.json").read_bytes()
    stack.kill_worker(victim)
    time.sleep(0.5)
    stack.start_worker(backend="inflate", queues="bulk")
    done = wait_until(http, job["id"], lambda j: j["status"] in ("succeeded", "failed"), 90)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    assert {n: (inputs / n).stat().st_mtime_ns for n in stamps} == stamps
    assert (inputs / "masks.json").read_bytes() == masks


def run_cli(*args: str) -> tuple[int, str, str]:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "sam3d_jobs.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=TESTS.parent,
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_submits_boxes_from_a_file_and_prompts_as_json(stack, reference, tmp_path):
    boxes = tmp_path / "boxes.txt"
    boxes.write_text("# x0 y0 x1 y1, one object per line\n" + "\n".join(
        " ".join(f"{v:g}" for v in loose_box(m)) for m in reference[:2]
    ) + "\n")  # fmt: skip
    opts = json.dumps(FAST)
    code, out, err = run_cli(
        "submit", str(SAMPLE), "--boxes", str(boxes), "--server", stack.url, "--wait",
        "--options", opts,
    )  # fmt: skip
    assert code == 0, err
    assert out.strip().startswith("job_")
    ys, xs = np.nonzero(reference[1])
    prompts = json.dumps([{"points": [[float(xs.mean()), float(ys.mean()), 1]]}])
    code, out, err = run_cli(
        "submit", str(SAMPLE), "--prompts", prompts, "--server", stack.url, "--wait",
        "--options", opts,
    )  # fmt: skip
    assert code == 0, err


@pytest.mark.parametrize(
    "args",
    [
        ["--prompts", '[{"box": [0, 0, 9000, 10]}]'],  # outside: 422 from the service
        ["--prompts", '[{"text": "ball"}]'],  # grabcut reads no text: 422
        ["--prompts", "[not json"],
        ["--prompts", "[]", "--masks", "samples/shapes.coco.json"],
    ],
)
def test_cli_bad_prompts_exit_2(stack, args):
    code, _, err = run_cli("submit", str(SAMPLE), *args, "--server", stack.url)
    assert code == 2, err
    assert "error" in err


def test_sdk_submits_an_array_of_boxes(stack, reference):
    from sam3d_client import Client

    client = Client(stack.url)
    boxes = np.array([loose_box(m) for m in reference[:1]])
    job = client.submit(SAMPLE, prompts=boxes, **FAST)
    job.wait(60)
    assert job.status == "succeeded"
    masks = [o["mask"] for o in job.data["objects"]]
    assert iou(rle_mask(masks[0]), reference[0]) > 0.9


def test_backends_lists_the_segmenters_and_what_the_workers_run(http):
    body = http.json("GET", "/v1/backends")
    assert body["segmenter"] == "grabcut" and body["prompts"] == ["box", "points"]
    assert {s["name"]: s["prompts"] for s in body["segmenters"]} == {
        "grabcut": ["box", "points"],
        "sam3": ["box", "points", "text"],
    }
    assert body["backend"] == "inflate"
    assert "inflate" in {b["name"] for b in body["backends"]}
    assert any(w["segmenter"] == "grabcut" for w in body["workers"])
