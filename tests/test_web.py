"""The web page (GET /) in a real browser: Debian's Chromium, headless, driven by
playwright-core (tests/js/browser_check.mjs) against the dev stack. The browser renders
WebGL2 in software (SwiftShader); the viewer's pixels are read back from screenshots."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SAMPLE_COCO, SAMPLE_IMAGE, sample_masks_reference
from PIL import Image
from service import make_stack

from api import create_app
from jobs.settings import Settings

JS = ROOT / "tests" / "js"
BUILT_PAGE = ROOT / "api" / "static" / "index.html"
SCREENSHOT = ROOT / "docs" / "screenshot.png"
# Small assets keep software rendering quick; the page does not care.
OPTIONS = '{"splats": 5000, "resolution": 48, "seed": 1}'
# The same rule as the browser script: a pixel is drawn when it differs from the background.
DRAWN_THRESHOLD = 24


def chromium() -> str:
    path = os.environ.get("SAM3D_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail("the browser test needs Chromium: `make test` installs it (apt-get chromium)")
    return path


def drawn_pixels(png: Path, background: list[int]) -> tuple[int, int]:
    """Pixels of a screenshot that differ from the background (read here with Pillow)."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    diff = np.abs(rgb - np.array(background)).sum(axis=-1)
    return int((diff > DRAWN_THRESHOLD).sum()), diff.size


def run_browser(tmp: Path, stack, *extra: str) -> dict:
    """Runs the browser script against ``stack``; its JSON report."""
    if not BUILT_PAGE.is_file():
        pytest.fail("the web page is not built: run `make install` (or `make test`)")
    if not (JS / "node_modules" / "playwright-core").is_dir():
        pytest.fail("tests/js/node_modules lacks playwright-core: run `make install-dev`")
    masks = []
    for i, mask in enumerate(sample_masks_reference()):
        path = tmp / f"mask-{i}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
        masks += ["--mask", str(path)]
    command = [
        "node",
        str(JS / "browser_check.mjs"),
        "--url",
        stack.url,
        "--image",
        str(SAMPLE_IMAGE),
        *masks,
        "--options",
        OPTIONS,
        "--out",
        str(tmp / "shots"),
        "--chromium",
        chromium(),
        *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=150, cwd=JS)
    lines = done.stdout.strip().splitlines()
    assert lines, f"no report from the browser script: {done.stderr[-2000:]}"
    report = json.loads(lines[-1])
    if not report.get("ok"):
        logs = "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
            for p in sorted(stack.log_dir.glob("*.log"))
        )
        pytest.fail(f"browser check failed: {report.get('error')}\n{json.dumps(report)}\n{logs}")
    return report


def test_page_answers_503_until_built(tmp_path):
    app = create_app(Settings(storage_url=f"file://{tmp_path / 'storage'}"))
    app.static_folder = str(tmp_path / "not-built")
    response = app.test_client().get("/")
    assert response.status_code == 503
    assert response.mimetype == "text/html"
    assert b"make install" in response.data


@pytest.mark.slow
def test_page_submits_a_job_and_shows_it_in_3d(tmp_path):
    shot_path = tmp_path / "screenshot.png"  # kept with the test's files
    stack = make_stack(tmp_path / "stack", workers=1).start()
    try:
        report = run_browser(
            tmp_path, stack, "--screenshot", str(shot_path), "--coco", str(SAMPLE_COCO)
        )
    finally:
        stack.stop()

    assert report["index_status"] == 200 and report["title"] == "sam3d-jobs"
    assert report["external_requests"] == []  # works offline: everything from the service
    # The bad option's 400 is the only error the browser logs.
    assert [e for e in report["console_errors"] if "400 (BAD REQUEST)" not in e] == []
    assert report["mask_items"] == 3 and report["mask_warnings"] == 0
    assert report["final_status"] == "succeeded", report["status_text"]
    assert "3 of 3" in report["status_text"]
    assert report["statuses_seen"][-1] == "succeeded"
    assert report["viewer_state"] == "ready"
    assert report["object_toggles"] == 3
    assert report["downloads"] == 3 + 2 * 3  # scene GLB + PLY, manifest, 2 per object

    views = report["views"]
    for name in ("splats", "mesh", "splats_again", "phone"):
        drawn, total = drawn_pixels(Path(views[name]["path"]), report["background"])
        assert drawn > 0.02 * total, (name, drawn, total)
        assert abs(drawn - views[name]["drawn"]) <= 0.01 * total  # the page counted the same
    # Splats and meshes are different pictures of the same objects.
    splats = np.asarray(Image.open(views["splats"]["path"]).convert("RGB")).astype(int)
    mesh = np.asarray(Image.open(views["mesh"]["path"]).convert("RGB")).astype(int)
    assert np.abs(splats - mesh).sum(axis=-1).mean() > 1
    # Hiding object 0 hides its mesh, and its splats (cut from scene.ply), not the others'.
    assert report["splat_source"] == "scene.ply"
    for view in ("mesh", "splats"):
        without, _ = drawn_pixels(
            Path(views[f"{view}_without_object_0"]["path"]), report["background"]
        )
        assert 0.2 * views[view]["drawn"] < without < 0.9 * views[view]["drawn"], view

    assert report["recent_listed"]
    desktop, phone = report["layout"]["desktop"], report["layout"]["phone"]
    assert desktop["scrollWidth"] <= desktop["innerWidth"] == 1280
    assert phone["scrollWidth"] <= phone["innerWidth"] == 390  # no horizontal scroll

    # A polygon drawn with the mouse is one object.
    assert report["drawn_items"] == 1
    assert report["drawn_job"]["status"] == "succeeded", report["drawn_job"]
    assert "1 of 1" in report["drawn_job"]["text"]
    # A box dragged on the photo: the worker segments it; the mask shows over the photo.
    assert report["prompt_item"].startswith("Prompt 1: box"), report["prompt_item"]
    assert report["prompt_job"]["status"] == "succeeded", report["prompt_job"]
    assert report["prompt_mask_links"] == ["Object 0 mask (PNG)", "All masks (COCO RLE, JSON)"]
    pixels = report["prompt_mask_pixels"]
    assert pixels["size"] == [640, 480]
    sky, ball = pixels["sky"], pixels["ball"]
    assert abs(sky[2] - 230) < 40 and sky[0] < 200  # the photo, untinted, outside the mask
    assert ball[0] > 150 and ball[1] > 60  # the red ball tinted with object 0's colour
    # A COCO file is the masks too; the service's errors show in the form.
    assert "COCO file, 3 annotations" in report["coco_item"]
    assert report["bad_option_error"].startswith("invalid_option: ")
    assert report["coco_job"]["status"] == "succeeded", report["coco_job"]
    assert "3 of 3" in report["coco_job"]["text"]
    assert report["recent_after_reload"] == 4  # sample, drawn polygon, box prompt, COCO

    # Keyboard: Tab walks the form in order, each stop with a visible focus ring.
    order = [stop["id"] for stop in report["tab_order"]]
    wanted = ["image-input", "masks-input", "options-input", "submit"]
    assert [i for i in order if i in wanted] == wanted, order
    assert all(stop["ring"] for stop in report["tab_order"]), report["tab_order"]

    shot = Image.open(shot_path)
    assert shot.size == (1280, 800)
    if os.environ.get("SAM3D_UPDATE_SCREENSHOT"):  # refresh the README's picture on request
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copy(shot_path, SCREENSHOT)


def test_page_shows_a_job_without_scene_files_from_each_objects_glb_and_spz(tmp_path):
    """formats glb + spz, scene off: no scene.glb or scene.ply to load, so the page places
    each object's GLB and SPZ (read by Spark) by its matrix, and lists exactly those files."""
    options = json.dumps({"formats": ["glb", "spz"], "scene": False})
    stack = make_stack(tmp_path / "stack", workers=1).start()
    try:
        report = run_browser(tmp_path, stack, "--quick", "1", "--options", options)
    finally:
        stack.stop()
    assert report["final_status"] == "succeeded", report["status_text"]
    assert report["viewer_state"] == "ready"
    assert report["splat_source"] == "objects-spz" and report["mesh_source"] == "objects"
    assert report["downloads"] == 1 + 2 * 3  # the manifest; GLB and SPZ of each object
    drawn, total = drawn_pixels(Path(report["views"]["splats"]["path"]), report["background"])
    assert drawn > 0.02 * total


def test_page_shows_textured_meshes_with_their_baked_texture(tmp_path):
    """Option texture: the page draws each object's mesh with its baked base-colour texture
    (three.js's GLTFLoader material, its map set), and the mesh view is drawn."""
    options = json.dumps({"texture": 256, "resolution": 32, "splats": 2000})
    stack = make_stack(tmp_path / "stack", workers=1).start()
    try:
        report = run_browser(tmp_path, stack, "--options", options)
    finally:
        stack.stop()
    assert report["final_status"] == "succeeded", report["status_text"]
    assert report["mesh_source"] == "scene.glb"
    assert report["mesh_textures"] == 3  # every object's mesh shows its texture
    drawn, total = drawn_pixels(Path(report["views"]["mesh"]["path"]), report["background"])
    assert drawn > 0.02 * total


@pytest.mark.slow
def test_page_asks_for_the_key_and_shows_progress_live(tmp_path):
    stack = make_stack(tmp_path / "stack", api_keys=("web-test-key",))
    stack.start(wait=False)
    try:
        stack.start_worker(backend="fixture_backends:SlowInflate")  # 1 s per object
        stack.wait_ready()
        report = run_browser(tmp_path, stack, "--api-key", "web-test-key", "--quick", "1")
    finally:
        stack.stop()
    assert report["stored_key"] == "web-test-key"  # kept in localStorage
    assert report["final_status"] == "succeeded", report["status_text"]
    assert "running" in report["statuses_seen"], report["statuses_seen"]
    running = [p for p in report["progress_seen"] if p.startswith("running")]
    assert any(not p.endswith("3 of 3") for p in running), report["progress_seen"]
    assert report["progress_seen"][-1] == "succeeded 3 of 3"
    assert report["views"]["splats"]["drawn"] > 0.02 * report["views"]["splats"]["total"]
