"""``sam3d-jobs bulk`` run as users run it (a real process, Ctrl-C included) against the dev
stack, over a small COCO dataset made here: polygons, RLE (compressed and not), crowd
annotations, an image with no annotations, a missing file, an input the service refuses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from sam3d_client import Client, ServiceError
from sam3d_client.bulk_state import STATE_FILE
from sam3d_client.transport import RetryPolicy
from service import FAST, SQUARE_FLAT, make_stack, scene_image

CLI = str(Path(sys.executable).parent / "sam3d-jobs")
H, W = 72, 96
KEY = "bulk-key"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Two workers of a slowed-down inflate (0.25 s per object): time to press Ctrl-C; and a
    per-key submit rate limit (burst 2, then 3/s): bulk runs meet real 429s."""
    s = make_stack(
        tmp_path_factory.mktemp("bulk-stack"),
        api_keys=(KEY, "other-key"),
        submit_rate_per_s=3.0,
        submit_burst=2,
    )
    s.extra_env["SAM3D_FIXTURE_SLOW_S"] = "0.25"
    s.start(wait=False)
    s.start_worker(backend="fixture_backends:SlowInflate")
    s.start_worker(backend="fixture_backends:SlowInflate")
    s.wait_ready()
    yield s
    s.stop()


def _rect(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _disc(cx: int, cy: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _rle_compressed(mask: np.ndarray) -> dict:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [H, W], "counts": rle["counts"].decode()}


def _rle_uncompressed(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], edges])).tolist()
    return {"size": [H, W], "counts": counts}


def make_dataset(root: Path) -> tuple[Path, Path, dict[str, int]]:
    """(coco file, images folder, {output folder: objects}) for 8 images:
    a, b, sub/c, d, other/a: submitted; e: no annotations; f: no file; g: an empty mask."""
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    (images / "other").mkdir()
    rng = np.random.default_rng(0)
    entries = [
        (1, "a.png"),
        (2, "b.png"),
        (3, "sub/c.jpg"),
        (4, "d.png"),
        (5, "e.png"),
        (6, "f.png"),
        (7, "g.png"),
        (8, "other/a.jpg"),
    ]
    for _, name in entries:
        if name == "f.png":
            continue  # listed in the COCO file, not on disk
        pixels = rng.integers(40, 220, (H, W, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / name)
    ann = [
        (1, [_rect(10, 10, 40, 40)], 0),
        (1, [_rect(50, 20, 90, 60)], 0),
        (2, _rle_compressed(_disc(30, 36, 18)), 1),
        (2, [[60, 10, 90, 10, 75, 50]], 0),
        (3, _rle_uncompressed(_disc(60, 30, 20)), 1),
        (3, [_rect(5, 5, 20, 20), _rect(5, 40, 25, 65)], 0),  # one object, two polygons
        (4, [_rect(20, 15, 70, 55)], 0),
        (6, [_rect(10, 10, 30, 30)], 0),
        (7, [_rect(500, 500, 560, 560)], 0),  # wholly outside the image: empty_mask
        (8, [_rect(30, 20, 60, 50)], 0),
    ]
    coco = {
        "images": [{"id": i, "file_name": name, "width": W, "height": H} for i, name in entries],
        "annotations": [
            {
                "id": n + 1,
                "image_id": image_id,
                "category_id": 1,
                "segmentation": seg,
                "iscrowd": crowd,
            }
            for n, (image_id, seg, crowd) in enumerate(ann)
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    coco_path = root / "dataset.coco.json"
    coco_path.write_text(json.dumps(coco))
    return coco_path, images, {"a": 2, "b": 2, "c": 2, "d": 1, "a-8": 1}


def bulk_cmd(stack, coco: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return [
        CLI,
        "bulk",
        "--coco",
        str(coco),
        "--images",
        str(images),
        "--out",
        str(out),
        "--server",
        stack.url,
        "--concurrency",
        "2",
        "--options",
        json.dumps(FAST),
        *extra,
    ]


def env(key: str = KEY) -> dict[str, str]:
    return {**os.environ, "SAM3D_API_KEY": key}


def read_state(out: Path) -> dict:
    return json.loads((out / STATE_FILE).read_text())


def server_job_ids(stack, key: str = KEY) -> list[str]:
    return [job.id for job in Client(stack.url, key).jobs()]


def assert_layout(folder: Path, objects: int) -> None:
    names = {"scene.glb", "scene.ply", "manifest.json"}
    names |= {f"objects/{i}.{ext}" for i in range(objects) for ext in ("glb", "ply")}
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert on_disk == names, folder
    assert len(json.loads((folder / "manifest.json").read_text())["objects"]) == objects


def assert_consistent(state: dict) -> None:
    """What an interrupted run may leave: every entry whole and self-consistent."""
    for key, entry in state["images"].items():
        assert entry["status"] in {
            "pending",
            "queued",
            "running",
            "downloading",
            "succeeded",
            "failed",
            "canceled",
            "error",
            "missing",
            "no_annotations",
        }, entry
        if entry["status"] in ("queued", "running", "downloading", "succeeded"):
            assert entry["job_id"], entry
        if entry["status"] not in ("missing", "no_annotations"):
            assert entry["idempotency_key"].startswith("sam3d-bulk-"), entry
        if entry["status"] == "pending":
            assert entry["job_id"] is None, entry
        assert str(entry["image_id"]) == key


def test_bulk_interrupted_then_resumed_submits_each_image_once(stack, tmp_path):
    coco, images, expected = make_dataset(tmp_path)
    out = tmp_path / "out"
    cmd = bulk_cmd(stack, coco, images, out)

    # 1. Start, and press Ctrl-C once the state shows jobs in flight.
    proc = subprocess.Popen(
        cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no job in flight in time"
        try:
            statuses = [e["status"] for e in read_state(out)["images"].values()]
        except (OSError, ValueError, KeyError):  # not written yet (never half-written)
            statuses = []
        if any(s in ("queued", "running") for s in statuses):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Run the same command again to resume" in stderr
    first = read_state(out)
    assert_consistent(first)
    assert first["images"]["5"]["status"] == "no_annotations"
    assert first["images"]["6"]["status"] == "missing"
    assert json.loads((out / "summary.json").read_text())["complete"] is False
    submitted_before = {k: e["job_id"] for k, e in first["images"].items() if e.get("job_id")}
    unfinished = {"pending", "queued", "running", "downloading"}
    assert submitted_before and unfinished & {e["status"] for e in first["images"].values()}

    # 2. The same command again: it finishes, resubmitting nothing.
    run = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=180)
    assert run.returncode == 1, run.stderr  # g.png is refused: a failure in the summary
    state = read_state(out)
    assert_consistent(state)
    by_file = {e["file_name"]: e for e in state["images"].values()}
    assert {e["status"] for n, e in by_file.items() if n not in ("e.png", "f.png", "g.png")} == {
        "succeeded"
    }
    assert by_file["g.png"]["status"] == "failed"
    assert by_file["g.png"]["error"]["code"] == "empty_mask" and by_file["g.png"]["job_id"] is None
    for key, job_id in submitted_before.items():
        assert state["images"][key]["job_id"] == job_id  # polled again, not resubmitted
    job_ids = [e["job_id"] for e in state["images"].values() if e.get("job_id")]
    assert sorted(server_job_ids(stack)) == sorted(job_ids)  # one job per image, no more
    assert len(job_ids) == len(expected) == len(set(job_ids))
    for stem, objects in expected.items():
        assert_layout(out / stem, objects)
        assert by_file[{"c": "sub/c.jpg", "a-8": "other/a.jpg"}.get(stem, f"{stem}.png")]
    assert "failed images:" in run.stdout and "g.png (id 7): failed: empty_mask" in run.stdout
    assert "missing: f.png" in run.stdout and "no annotations: e.png" in run.stdout
    assert "ETA" in run.stderr or "done in" in run.stderr

    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True
    assert summary["counts"] == {
        "succeeded": 5,
        "failed": 1,
        "missing": 1,
        "no_annotations": 1,
    }
    for row in summary["images"]:
        entry = state["images"][str(row["image_id"])]
        assert (row["status"], row["job_id"], row["error"]) == (
            entry["status"],
            entry.get("job_id"),
            entry.get("error"),
        )
        if row["status"] == "succeeded":
            assert row["out"] == entry["stem"] and row["objects"] == expected[entry["stem"]]

    # 3. A submit whose answer was lost (crash between sending it and writing the job id):
    #    the rerun sends it again with the same key and gets the same job back.
    lost = state["images"]["4"]
    state["images"]["4"] = {**lost, "status": "pending", "job_id": None}
    (out / STATE_FILE).write_text(json.dumps(state))
    for path in sorted((out / "d").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    run = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=180)
    assert run.returncode == 1, run.stderr
    again = read_state(out)
    assert again["images"]["4"]["job_id"] == lost["job_id"]
    assert again["images"]["4"]["status"] == "succeeded"
    assert_layout(out / "d", 1)
    assert sorted(server_job_ids(stack)) == sorted(job_ids)


def test_bulk_refuses_bad_input_and_a_foreign_state(stack, tmp_path):
    coco, images, _ = make_dataset(tmp_path)
    out = tmp_path / "out"
    run = subprocess.run(
        bulk_cmd(stack, tmp_path / "nope.json", images, out), env=env(), capture_output=True
    )
    assert run.returncode == 2 and b"cannot read" in run.stderr
    run = subprocess.run(
        bulk_cmd(stack, coco, tmp_path / "no-dir", out), env=env(), capture_output=True
    )
    assert run.returncode == 2 and b"is not a folder" in run.stderr
    run = subprocess.run(
        bulk_cmd(stack, coco, images, out), env=env("wrong-key"), capture_output=True
    )
    assert run.returncode == 2 and b"unauthorized" in run.stderr

    # A state written for other options is not reused.
    (out / STATE_FILE).parent.mkdir(parents=True, exist_ok=True)
    (out / STATE_FILE).write_text(
        json.dumps(
            {
                "version": 1,
                "run": {"server": stack.url, "coco": str(coco.resolve()), "options": {}},
                "images": {},
            }
        )
    )
    run = subprocess.run(bulk_cmd(stack, coco, images, out), env=env(), capture_output=True)
    assert run.returncode == 2 and b"state_mismatch" in run.stderr


def test_submits_wait_out_the_rate_limit(stack):
    impatient = Client(stack.url, "other-key", retry=RetryPolicy(attempts=1))
    image, masks = scene_image(), [SQUARE_FLAT]

    def submit_once():
        try:
            impatient.submit(image, masks, **FAST)
        except ServiceError as exc:
            return exc
        return None

    # Ten at once against a burst of 2 refilled at 3/s: some must be refused, however slowly
    # a loaded machine serves them (one after another, each may take longer than a refill).
    with ThreadPoolExecutor(10) as pool:
        refused = [e for e in pool.map(lambda _: submit_once(), range(10)) if e is not None]
    assert refused, "a burst of 10 submits was never rate-limited"
    for exc in refused:
        assert (exc.status, exc.code) == (429, "rate_limited")
        assert exc.retryable and exc.retry_after >= 1
    job = Client(stack.url, "other-key").submit(image, masks, **FAST)  # waits, then goes
    assert job.result(timeout=60).objects
