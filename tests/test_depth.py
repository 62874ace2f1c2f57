"""Depth maps and pointmaps with intrinsics: decoding and checks (jobs/depth.py), the frame
conversion SAM 3D gets, and metric placement by inflate, read back from the scene GLB."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from readers import Glb

from jobs.depth import DepthInput, decode_depth, parse_intrinsics, read_depth_input
from jobs.errors import ErrorCode, Sam3dError
from jobs.frames import PYTORCH3D_TO_OPENGL, Camera
from jobs.options import parse_options
from jobs.settings import Settings
from worker.backends import sam3d
from worker.backends.inflate import InflateBackend
from worker.pipeline import generate_assets

H, W = 120, 160
K = {"fx": 200.0, "fy": 210.0, "cx": 83.0, "cy": 57.5}
NEAR, FAR, BACKGROUND = 1.5, 4.0, 9.0


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def png16(arr_mm: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr_mm.astype(np.uint16)).save(buf, "PNG")
    return buf.getvalue()


def two_objects() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    disc = (xx - 45) ** 2 + (yy - 60) ** 2 <= 25**2
    square = (xx >= 100) & (xx < 140) & (yy >= 30) & (yy < 70)
    return np.stack([disc, square])


def scene_depth() -> np.ndarray:
    """Metres: the disc at NEAR, the square at FAR, the wall behind at BACKGROUND."""
    depth = np.full((H, W), BACKGROUND, np.float32)
    disc, square = two_objects()
    depth[disc], depth[square] = NEAR, FAR
    return depth


def refused(kind, data, intrinsics=K, masks=None) -> Sam3dError:
    with pytest.raises(Sam3dError) as info:
        read_depth_input(kind, data, intrinsics, (H, W), two_objects() if masks is None else masks)
    return info.value


# -- inputs ------------------------------------------------------------------------------------


def test_intrinsics_in_every_form_give_the_same_camera():
    want = Camera(W, H, 200.0, 210.0, 83.0, 57.5)
    assert parse_intrinsics(K, (H, W)) == want
    assert parse_intrinsics([200, 210, 83, 57.5], (H, W)) == want
    assert parse_intrinsics([[200, 0, 83], [0, 210, 57.5], [0, 0, 1]], (H, W)) == want


@pytest.mark.parametrize(
    "bad",
    [
        {"fx": 200, "fy": 210, "cx": 83},  # cy missing
        {**K, "k1": 0.1},  # distortion is not taken
        {**K, "fx": 0},
        {**K, "fy": -5},
        {**K, "cx": "83"},
        {**K, "fx": float("nan")},
        {**K, "fx": 1e308, "fy": 1e308},  # finite, and overflows in the worker
        {**K, "fx": 1e-300},
        {**K, "fy": 1e9},
        {**K, "cx": 5000},
        [200, 210, 83],
        [[200, 1, 83], [0, 210, 57.5], [0, 0, 1]],  # skew
        "200,210,83,57.5",
        None,
    ],
)
def test_bad_intrinsics_are_refused(bad):
    assert refused("depth", npy(scene_depth()), bad).code is ErrorCode.INVALID_INTRINSICS


def test_depth_png_is_millimetres_and_npy_metres():
    depth_m = scene_depth()
    from_png = decode_depth(png16(depth_m * 1000), (H, W))
    assert from_png.dtype == np.float32 and np.allclose(from_png, depth_m)
    assert np.array_equal(decode_depth(npy(depth_m.astype(np.float64)), (H, W)), depth_m)
    # 0 is "no reading": kept as a hole, not refused.
    holes = (depth_m * 1000).astype(np.uint16)
    holes[0, :] = 0
    got = read_depth_input("depth", png16(holes), K, (H, W), two_objects())
    assert np.isnan(got.z()[0]).all() and np.allclose(got.z()[1:], depth_m[1:])


def _png8() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((H, W), 100, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _with(arr: np.ndarray, where, value) -> np.ndarray:
    arr = arr.copy()
    arr[where] = value
    return arr


@pytest.mark.parametrize(
    "kind, data",
    [
        ("depth", npy(np.ones((H, W + 1), np.float32))),  # wrong size
        ("depth", npy(np.ones((W, H), np.float32))),  # transposed (sensor orientation)
        ("depth", npy(_with(scene_depth(), (5, 5), np.nan))),
        ("depth", npy(_with(scene_depth(), (5, 5), np.inf))),
        ("depth", npy(_with(scene_depth(), (5, 5), -1.0))),
        ("depth", npy(np.zeros((H, W), np.float32))),  # no readings at all
        ("depth", npy(_with(scene_depth(), two_objects()[1], 0.0))),  # none under object 1
        ("depth", npy(np.ones((H, W), np.int32))),  # integers: units unknown
        ("depth", png16(np.ones((H, W)))[:40]),  # truncated PNG
        ("depth", _png8()),  # 8-bit: no millimetres
        ("depth", b"not a depth map"),
        ("pointmap", npy(np.ones((H, W), np.float32))),  # not (H, W, 3)
        ("pointmap", png16(np.ones((H, W)))),
        ("pointmap", npy(_with(np.ones((H, W, 3), np.float32), (3, 3, 2), -2.0))),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_depth_is_refused_with_invalid_depth(kind, data):
    error = refused(kind, data)
    assert error.code is ErrorCode.INVALID_DEPTH and error.message


def test_stored_form_round_trips():
    given = read_depth_input("depth", npy(scene_depth()), K, (H, W), two_objects())
    back = DepthInput.from_bytes(given.to_bytes())
    assert back.kind == "depth" and back.camera == given.camera
    assert np.array_equal(back.values, given.values)


# -- the frame SAM 3D gets -----------------------------------------------------------------------


def test_sam3d_pointmap_is_pytorch3d_frame_and_projects_to_pixel_centres():
    given = read_depth_input("depth", npy(scene_depth()), K, (H, W), two_objects())
    points = given.pointmap_pytorch3d()
    assert points.shape == (H, W, 3) and points.dtype == np.float32
    assert np.allclose(points[..., 2], scene_depth())  # +Z forward, the depth itself
    # +X left, +Y up: a pixel right of and below the principal point has x < 0 and y < 0.
    assert points[100, 150, 0] < 0 and points[100, 150, 1] < 0
    assert points[5, 5, 0] > 0 and points[5, 5, 1] > 0
    # Into the manifest's OpenGL camera, every point projects back to its own pixel centre.
    opengl = points.reshape(-1, 3) @ PYTORCH3D_TO_OPENGL.T
    uv = given.camera.project(opengl).reshape(H, W, 2)
    v, u = np.mgrid[:H, :W]
    assert np.allclose(uv[..., 0], u + 0.5, atol=1e-3)
    assert np.allclose(uv[..., 1], v + 0.5, atol=1e-3)


def test_a_pointmap_is_turned_into_pytorch3d_axes_not_backprojected():
    rng = np.random.default_rng(0)
    opencv = rng.uniform([-1, -1, 0.5], [1, 1, 3], (H, W, 3)).astype(np.float32)
    opencv[0, 0] = 0  # no reading
    given = read_depth_input("pointmap", npy(opencv), K, (H, W), two_objects())
    points = given.pointmap_pytorch3d()
    assert np.isnan(points[0, 0]).all()
    assert np.allclose(points[1:], opencv[1:] * [-1, -1, 1])


class RecordingPipeline:
    """Upstream's pipeline.run, recorded: answers with upstream-shaped output."""

    def __init__(self):
        self.calls = []

    def run(self, image, mask, **kwargs):
        from test_sam3d_backend import upstream_output

        self.calls.append(kwargs)
        return upstream_output(image[..., :3], image[..., 3] > 0, seed=kwargs["seed"])


def test_sam3d_backend_passes_the_pointmap_and_reports_the_given_camera():
    # The per-mask path (SAM3D_BATCH_OBJECTS=false): the recording stands in for run() only.
    backend = sam3d.Sam3dBackend(Settings(batch_objects=False))
    backend.pipeline = RecordingPipeline()
    image = np.full((H, W, 3), 120, np.uint8)
    given = read_depth_input("depth", npy(scene_depth()), K, (H, W), two_objects())
    artifacts = generate_assets(
        image,
        two_objects(),
        backend,
        options=parse_options("sam3d", {"seed": 4}),
        job_id="t",
        depth=given,
    )
    assert len(backend.pipeline.calls) == 2
    for call in backend.pipeline.calls:
        pointmap = call["pointmap"]
        assert isinstance(pointmap, torch.Tensor) and pointmap.shape == (H, W, 3)
        assert torch.equal(pointmap, torch.from_numpy(given.pointmap_pytorch3d()))
    manifest = json.loads(artifacts.files["manifest.json"])
    assert manifest["units"] == "metres" and manifest["depth_input"] == "depth"
    assert manifest["camera"]["K"] == [[200.0, 0.0, 83.0], [0.0, 210.0, 57.5], [0.0, 0.0, 1.0]]
    # Without depth, upstream gets no pointmap (it runs its own depth model).
    backend.pipeline = RecordingPipeline()
    generate_assets(
        image, two_objects()[:1], backend, options=parse_options("sam3d", {}), job_id="t"
    )
    assert "pointmap" not in backend.pipeline.calls[0]


# -- inflate placed by the depth map ------------------------------------------------------------


def scene_vertices(files: dict[str, bytes]) -> list[np.ndarray]:
    """Each object's mesh in the scene frame, read from scene.glb (nodes and their matrices)."""
    glb = Glb(files["scene.glb"])
    out = []
    for name, (world, mesh) in sorted(glb.world_matrices().items()):
        if mesh is None or not name.startswith("object_"):
            continue
        local = glb.mesh_arrays(mesh)["POSITION"].astype(np.float64)
        out.append(local @ world[:3, :3].T + world[:3, 3])
    return out


@pytest.fixture(scope="module")
def placed():
    image = np.full((H, W, 3), 150, np.uint8)
    masks = two_objects()
    given = read_depth_input("depth", png16(scene_depth() * 1000), K, (H, W), masks)
    options = parse_options("inflate", {"splats": 500, "resolution": 32})
    with_depth = generate_assets(
        image, masks, InflateBackend(), options=options, job_id="d", depth=given
    )
    without = generate_assets(image, masks, InflateBackend(), options=options, job_id="n")
    return with_depth.files, without.files, given.camera


def test_a_depth_map_moves_each_object_to_the_depth_it_gives(placed):
    files, nominal, camera = placed
    manifest = json.loads(files["manifest.json"])
    assert manifest["units"] == "metres"
    assert json.loads(nominal["manifest.json"])["units"] == "relative"
    masks = two_objects()
    for verts, mask, depth in zip(scene_vertices(files), masks, (NEAR, FAR), strict=True):
        # The visible surface (the half nearer the camera) sits at the measured depth.
        distance = -verts[:, 2]
        centre = np.median(distance)
        front = distance[distance < centre]
        assert np.median(front) == pytest.approx(depth, rel=0.02)
        # And the silhouette still lands on the mask, through the given intrinsics.
        uv = camera.project(verts)
        ys, xs = np.nonzero(mask)
        assert uv[:, 0].min() == pytest.approx(xs.min(), abs=2)
        assert uv[:, 0].max() == pytest.approx(xs.max() + 1, abs=2)
        assert uv[:, 1].min() == pytest.approx(ys.min(), abs=2)
        assert uv[:, 1].max() == pytest.approx(ys.max() + 1, abs=2)
    # Metric size: the square is 40 px wide at about FAR metres, fx = 200 px.
    square = scene_vertices(files)[1]
    width = square[:, 0].max() - square[:, 0].min()
    assert width == pytest.approx(40 * FAR / K["fx"], rel=0.1)
    # Without depth both sit at the nominal 3.0 and are not metric.
    for verts in scene_vertices(nominal):
        assert np.median(-verts[:, 2]) == pytest.approx(3.0, rel=0.05)
