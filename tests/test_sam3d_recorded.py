"""``convert_output`` on a REAL upstream output, recorded on the lent H200.

tests/data/sam3d_output/ holds one run of upstream's ``InferencePipelinePointMap.run`` (PyPI
sam3d 0.1.2's vendored sam3d_objects, random weights, ~390 voxels: see meta.json and
scripts/sam3d_record_output.py): its Gaussians as upstream's getters return them, its GLB as
upstream exports it, its pose tensors and pointmap, and the splat centres placed in the camera
frame by upstream's own maths. Random weights make the geometry noise but every structure,
dtype, frame and shape real. The only stand-in here is the small object carrying the recorded
Gaussian arrays under upstream's attribute names (the Gaussian class needs CUDA to build).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from readers import Glb, read_ply, validate_gltf
from scipy.spatial import cKDTree

from jobs.frames import Z_UP_TO_Y_UP, Camera
from jobs.options import parse_options
from worker.backends import sam3d
from worker.pipeline import generate_assets

DATA = Path(__file__).parent / "data" / "sam3d_output"
VOXEL = 1 / 64  # stage 1's grid


class RecordedGaussian:
    """The recorded arrays under the names ``convert_gaussians`` reads from upstream's class."""

    def __init__(self, arrays) -> None:
        self.get_xyz = torch.from_numpy(arrays["gs_xyz"])
        self.get_rotation = torch.from_numpy(arrays["gs_rotation"])
        self.get_scaling = torch.from_numpy(arrays["gs_scaling"])
        self.get_opacity = torch.from_numpy(arrays["gs_opacity"])
        self._features_dc = torch.from_numpy(arrays["gs_features_dc"])


@pytest.fixture(scope="module")
def recorded():
    arrays = np.load(DATA / "arrays.npz")
    meta = json.loads((DATA / "meta.json").read_text())
    output = {
        "gs": RecordedGaussian(arrays),
        "glb": trimesh.load(DATA / "mesh.glb", force="mesh"),
        "rotation": torch.from_numpy(arrays["rotation"]),
        "translation": torch.from_numpy(arrays["translation"]),
        "scale": torch.from_numpy(arrays["scale"]),
        "pointmap": torch.from_numpy(arrays["pointmap"]),
    }
    return arrays, meta, output


class RecordedBackend:
    """Returns the recorded object for every mask: the real worker pipeline runs on it."""

    name, version = "sam3d", sam3d.VERSION

    def __init__(self, output) -> None:
        self.output = output

    def camera(self, image, options):
        return None

    def generate(self, image, mask, *, camera, seed, options):
        return sam3d.convert_output(self.output, image.shape[:2])


@pytest.fixture(scope="module")
def job_files(recorded, tmp_path_factory):
    arrays, _, output = recorded
    image = arrays["image"]
    masks = np.stack([arrays["mask"], arrays["mask"]])
    options = parse_options("sam3d", {})
    files = generate_assets(image, masks, RecordedBackend(output), options=options, job_id="rec")
    out = tmp_path_factory.mktemp("recorded")
    for path, data in files.files.items():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(data)
    return out, json.loads(files.files["manifest.json"])


def test_recording_is_upstreams_real_structure(recorded):
    arrays, meta, output = recorded
    assert {"gs", "glb", "rotation", "translation", "scale", "pointmap", "coords"} <= set(
        meta["output_keys"]
    )
    n = meta["splats"]
    assert n == 32 * meta["voxels"]  # the 32-per-voxel decoder
    assert arrays["gs_xyz"].shape == (n, 3) and arrays["gs_rotation"].shape == (n, 4)
    assert arrays["gs_features_dc"].shape == (n, 1, 3)
    assert [arrays[k].shape for k in ("rotation", "translation", "scale")] == [
        (1, 4),
        (1, 3),
        (1, 3),
    ]
    assert output["glb"].visual.kind == "vertex"  # use_vertex_color, no baking
    assert len(output["glb"].vertices) == meta["mesh_vertices"]


def test_splats_land_on_the_mesh_only_after_the_z_up_to_y_up_map(recorded):
    """Both decoders place their output on the same voxels: converted, the splat centres lie
    within a voxel of the mesh; unconverted (or mapped the other way) they do not."""
    arrays, _, output = recorded
    result = sam3d.convert_output(output, arrays["image"].shape[:2])
    mesh = cKDTree(result.mesh.vertices)
    near, _ = mesh.query(result.gaussians.positions)
    assert np.percentile(near, 99) < 1.5 * VOXEL
    for wrong in (np.eye(3), Z_UP_TO_Y_UP.T):
        far, _ = mesh.query(arrays["gs_xyz"] @ wrong.T)
        assert np.percentile(far, 50) > 3 * VOXEL
    lo, hi = result.mesh.vertices.min(0), result.mesh.vertices.max(0)
    assert np.allclose(result.gaussians.positions.min(0), lo, atol=VOXEL)
    assert np.allclose(result.gaussians.positions.max(0), hi, atol=VOXEL)


def test_scene_ply_is_upstreams_own_placement(recorded, job_files):
    """Upstream places splats with compose_transform(s, R(q), t) in PyTorch3D's camera frame;
    ours are in the OpenGL camera frame: (x, y, z) -> (-x, y, -z) of upstream's."""
    arrays, _, _ = recorded
    out, manifest = job_files
    names, table, _ = read_ply(out / "scene.ply")
    xyz = table[:, [names.index(c) for c in "xyz"]]
    expected = arrays["upstream_scene_xyz"] * np.array([-1.0, 1.0, -1.0])
    n = len(expected)
    assert len(xyz) == 2 * n
    assert np.allclose(xyz[:n], expected, atol=1e-4)
    assert np.allclose(xyz[n:], expected, atol=1e-4)
    meta = manifest["objects"][0]["metadata"]
    q = arrays["rotation"].reshape(4).astype(np.float64)
    assert np.allclose(meta["rotation"], q / np.linalg.norm(q), atol=1e-7)
    assert np.allclose(meta["translation"], arrays["translation"].reshape(3))


def test_glbs_pass_the_khronos_validator_and_nodes_carry_the_pose(job_files):
    out, manifest = job_files
    paths = [out / "scene.glb", out / "objects/0.glb"]
    reports = validate_gltf(*paths)
    for path in paths:
        report = reports[str(path)]
        assert report["numErrors"] == 0, report["messages"][:3]
        assert report["numWarnings"] == 0, report["messages"][:3]
        assert report["info"]["totalTriangleCount"] >= 58_000
    world = Glb((out / "scene.glb").read_bytes()).world_matrices()
    assert np.allclose(world["object_0"][0], manifest["objects"][0]["metadata"]["matrix"])


def test_a_pointmap_without_valid_points_gives_the_default_camera(recorded, job_files):
    """Random MoGe weights give an all-NaN pointmap (as a blank photo can): the pose still
    refers to the camera frame and the manifest states the documented default camera."""
    arrays, _, _ = recorded
    assert not np.isfinite(arrays["pointmap"]).any()
    _, manifest = job_files
    h, w = arrays["image"].shape[:2]
    assert manifest["camera"] == Camera.from_fov(w, h, sam3d.DEFAULT_FOV_DEG).to_dict()
