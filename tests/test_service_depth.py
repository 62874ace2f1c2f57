"""Depth input over HTTP (multipart through the SDK, JSON, Roboflow's route), from the CLI, and
the 422s bad depth gets: the dev stack with a real worker, the result read back from storage."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from readers import Glb
from sam3d_client import Client
from sam3d_client.errors import InvalidInput, ServiceError
from sam3d_client.http import ApiError, Http
from service import FAST, SQUARE_FLAT, b64, make_stack, scene_image, submit_json

H, W = 120, 160
K = {"fx": 200.0, "fy": 200.0, "cx": 80.0, "cy": 60.0}
SQUARE_AT_M = 2.5
CLI = str(Path(sys.executable).parent / "sam3d-jobs")


def depth_mm() -> np.ndarray:
    """16-bit millimetres: the square of SQUARE_FLAT at 2.5 m in front of a wall at 6 m."""
    depth = np.full((H, W), 6000, np.uint16)
    depth[30:70, 100:140] = int(SQUARE_AT_M * 1000)
    return depth


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = make_stack(tmp_path_factory.mktemp("depth"), workers=1)
    s.start()
    yield s
    s.stop()


def scene_distance(job: dict) -> float:
    """Median distance from the camera of the scene mesh, read from scene.glb."""
    import urllib.request

    with urllib.request.urlopen(job["result"]["scene"]["mesh_glb"]["url"]) as resp:
        glb = Glb(resp.read())
    (world, mesh) = glb.world_matrices()["object_0"]
    local = glb.mesh_arrays(mesh)["POSITION"].astype(np.float64)
    return float(np.median(-(local @ world[:3, :3].T + world[:3, 3])[:, 2]))


def test_sdk_sends_a_depth_png_and_the_square_lands_at_its_depth(stack, tmp_path):
    path = tmp_path / "depth.png"
    Image.fromarray(depth_mm()).save(path)
    job = (
        Client(stack.url)
        .submit(scene_image(), SQUARE_FLAT, depth=path, intrinsics=K, **FAST)
        .wait(60)
    )
    result = job.result()
    assert result.units == "metres"
    assert result.camera["K"] == [[200.0, 0.0, 80.0], [0.0, 200.0, 60.0], [0.0, 0.0, 1.0]]
    manifest = result.manifest.json()
    assert manifest["units"] == "metres" and manifest["depth_input"] == "depth"
    distance = scene_distance(job.data)
    assert SQUARE_AT_M < distance < SQUARE_AT_M * 1.2  # its centre, a little behind the face


def test_json_pointmap_gives_the_same_placement_as_the_depth_it_holds(stack):
    http = Http(stack.url)
    v, u = np.mgrid[:H, :W]
    z = depth_mm().astype(np.float32) / 1000
    pointmap = np.stack([(u + 0.5 - 80) / 200 * z, (v + 0.5 - 60) / 200 * z, z], -1)
    jobs = [
        submit_json(
            http,
            SQUARE_FLAT,
            **{kind: {"type": "base64", "value": b64(data)}},
            intrinsics=[200, 200, 80, 60],
        )
        for kind, data in (("pointmap", npy(pointmap)), ("depth", npy(z)))
    ]
    done = [http.wait(j["id"], timeout=60) for j in jobs]
    assert all(j["status"] == "succeeded" for j in done), [j["error"] for j in done]
    a, b = (j["result"]["objects"][0]["metadata"]["translation"] for j in done)
    assert np.allclose(a, b, rtol=1e-4)


@pytest.mark.parametrize(
    "fields, code",
    [
        ({"depth": npy(np.ones((H, W + 2), np.float32))}, "invalid_depth"),
        ({"depth": npy(np.full((H, W), np.nan, np.float32))}, "invalid_depth"),
        ({"depth": npy(-np.ones((H, W), np.float32))}, "invalid_depth"),
        ({"depth": b"\x89PNG\r\n\x1a\nbroken"}, "invalid_depth"),
        ({"depth": npy(np.ones((H, W), np.float32)), "intrinsics": None}, "invalid_intrinsics"),
        (
            {"depth": npy(np.ones((H, W), np.float32)), "intrinsics": [0, 1, 2, 3]},
            "invalid_intrinsics",
        ),
        ({"intrinsics": K}, "invalid_intrinsics"),
    ],
)
def test_bad_depth_over_multipart_is_422_with_its_code(stack, fields, code):
    intrinsics = fields.pop("intrinsics", K)
    form = {"mask_input": json.dumps(SQUARE_FLAT)}
    if intrinsics is not None:
        form["intrinsics"] = json.dumps(intrinsics)
    files = [("image", "scene.png", scene_image())]
    files += [(name, f"{name}.bin", data) for name, data in fields.items()]
    with pytest.raises(ApiError) as info:
        Http(stack.url).post_multipart("/v1/jobs", form, files)
    assert (info.value.status, info.value.code) == (422, code), info.value


def test_depth_and_pointmap_together_is_400(stack):
    with pytest.raises(ApiError) as info:
        submit_json(
            Http(stack.url),
            SQUARE_FLAT,
            depth={"type": "base64", "value": b64(npy(np.ones((H, W), np.float32)))},
            pointmap={"type": "base64", "value": b64(npy(np.ones((H, W, 3), np.float32)))},
            intrinsics=K,
        )
    assert (info.value.status, info.value.code) == (400, "invalid_request")
    with pytest.raises(InvalidInput):
        Client(stack.url).submit(scene_image(), SQUARE_FLAT, depth=np.ones((H, W)))


def test_roboflow_route_takes_depth_too(stack):
    body = {
        "image": {"type": "base64", "value": b64(scene_image())},
        "mask_input": SQUARE_FLAT,
        "depth": {"type": "base64", "value": b64(npy(depth_mm().astype(np.float32) / 1000))},
        "intrinsics": K,
        "options": FAST,
    }
    answer = Http(stack.url).json("POST", "/sam3_3d/infer", body)
    assert answer["units"] == "metres" and answer["camera"]["K"][0] == [200.0, 0.0, 80.0]
    bad = {**body, "depth": {"type": "base64", "value": b64(npy(np.zeros((3, 3), "f4")))}}
    with pytest.raises(ApiError) as info:
        Http(stack.url).json("POST", "/sam3_3d/infer", bad)
    assert (info.value.status, info.value.code) == (422, "invalid_depth")


def test_cli_submit_and_generate_take_depth(stack, tmp_path):
    image, mask, depth = tmp_path / "scene.png", tmp_path / "mask.json", tmp_path / "depth.png"
    image.write_bytes(scene_image())
    mask.write_text(json.dumps(SQUARE_FLAT))
    Image.fromarray(depth_mm()).save(depth)
    common = [
        str(image),
        "--masks",
        str(mask),
        "--depth",
        str(depth),
        "--options",
        json.dumps(FAST),
    ]
    submitted = subprocess.run(
        [CLI, "submit", *common, "--intrinsics", "200,200,80,60", "--server", stack.url, "--wait"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submitted.returncode == 0, submitted.stderr
    job = Http(stack.url).json("GET", f"/v1/jobs/{submitted.stdout.strip()}")
    assert job["result"]["units"] == "metres"
    out = tmp_path / "out"
    generated = subprocess.run(
        [CLI, "generate", *common, "--intrinsics", json.dumps(K), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert generated.returncode == 0, generated.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["units"] == "metres"
    # The same inputs give the same pose, served or local.
    assert np.allclose(
        manifest["objects"][0]["metadata"]["translation"],
        job["result"]["objects"][0]["metadata"]["translation"],
    )
    missing = subprocess.run(
        [CLI, "generate", *common, "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and "invalid_intrinsics" in missing.stderr
    with pytest.raises(ServiceError):  # the SDK refuses before sending
        Client(stack.url).submit(str(image), str(mask), intrinsics=K)
