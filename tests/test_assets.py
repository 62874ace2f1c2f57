"""The output contract, checked on real files with independent readers.

Every check here follows docs/api.md, "Outputs and their frames": per-object GLB and PLY coincide,
scene.ply is objects/{i}.ply mapped by ``matrix``, scene.glb nodes carry ``matrix``, the posed
splats project onto the masks with the recorded camera, and one object uses the same frames
as many.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from readers import Glb, read_ply, validate_gltf
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from jobs.frames import pose_from_matrix
from jobs.options import parse_options
from worker.backends.inflate import InflateBackend
from worker.pipeline import artifact_paths, generate_assets

PLY_HEADER = (
    "x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 opacity scale_0 scale_1 scale_2 rot_0 rot_1 rot_2 rot_3"
).split()
SH_C0 = 0.28209479177387814


def write(files: dict[str, bytes], out: Path) -> Path:
    for path, data in files.items():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(data)
    return out


class TiltedBackend(InflateBackend):
    """A hand-written stand-in for SAM 3D's arbitrary poses (no weights can run here): inflate's
    objects, each turned by a different rotation about its own centre, so the frame checks
    below also see rotations that are not the identity."""

    name = "tilted"

    def generate(self, image, mask, **kwargs):
        result = super().generate(image, mask, **kwargs)
        turn = np.eye(4)
        turn[:3, :3] = Rotation.from_rotvec(
            mask.sum() % 997 / 997 * np.array([1.3, -2.1, 0.7])
        ).as_matrix()
        return replace(result, pose=pose_from_matrix(result.pose.matrix() @ turn))


def run(image, masks, backend=None, **options) -> dict[str, bytes]:
    opts = parse_options("inflate", options)
    backend = backend or InflateBackend()
    return generate_assets(image, masks, backend, options=opts, job_id="test").files


@pytest.fixture(scope="module")
def inflate_assets(sample_image, sample_masks, tmp_path_factory) -> Path:
    return write(run(sample_image, sample_masks), tmp_path_factory.mktemp("inflate"))


@pytest.fixture(scope="module")
def tilted_assets(sample_image, sample_masks, tmp_path_factory) -> Path:
    files = run(sample_image, sample_masks, TiltedBackend())
    return write(files, tmp_path_factory.mktemp("tilted"))


@pytest.fixture(scope="module", params=["inflate", "tilted"])
def assets(request) -> Path:
    """Frame checks run on both: identity rotations (inflate) and arbitrary ones (tilted)."""
    return request.getfixturevalue(f"{request.param}_assets")


@pytest.fixture(scope="module")
def manifest(assets) -> dict:
    return json.loads((assets / "manifest.json").read_text())


@pytest.fixture(scope="module")
def inflate_manifest(inflate_assets) -> dict:
    return json.loads((inflate_assets / "manifest.json").read_text())


def splats(path: Path) -> dict[str, np.ndarray]:
    """Linear-unit splat attributes read with plyfile, rotations as scipy Rotations."""
    names, table, _ = read_ply(path)
    col = {n: table[:, i].astype(np.float64) for i, n in enumerate(names)}
    wxyz = np.stack([col["rot_0"], col["rot_1"], col["rot_2"], col["rot_3"]], 1)
    return {
        "xyz": np.stack([col["x"], col["y"], col["z"]], 1),
        "rot": Rotation.from_quat(wxyz[:, [1, 2, 3, 0]]),  # scipy wants x,y,z,w
        "scale": np.exp(np.stack([col["scale_0"], col["scale_1"], col["scale_2"]], 1)),
        "opacity": 1 / (1 + np.exp(-col["opacity"])),
        "rgb": np.stack([col["f_dc_0"], col["f_dc_1"], col["f_dc_2"]], 1) * SH_C0 + 0.5,
    }


def apply(matrix, points: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    return points @ m[:3, :3].T + m[:3, 3]


def test_every_artifact_is_written(assets, manifest, sample_masks):
    expected = artifact_paths(len(sample_masks))
    written = sorted(str(p.relative_to(assets)) for p in assets.rglob("*") if p.is_file())
    assert written == sorted(expected)
    for i, obj in enumerate(manifest["objects"]):
        assert obj["index"] == i
        for key in ("mesh_glb", "gaussian_ply"):
            entry = obj[key]
            assert (assets / entry["path"]).stat().st_size == entry["bytes"]
        assert obj["mesh_glb"]["content_type"] == "model/gltf-binary"


def test_glbs_have_zero_validator_errors(assets, sample_masks):
    paths = [assets / "scene.glb"] + [assets / f"objects/{i}.glb" for i in range(len(sample_masks))]
    reports = validate_gltf(*paths)
    for path in paths:
        report = reports[str(path)]
        assert report["numErrors"] == 0, report["messages"]
        assert report["numWarnings"] == 0, report["messages"]
        assert report["info"]["totalTriangleCount"] > 1000


def test_ply_is_standard_3dgs_layout(assets):
    data = (assets / "objects/0.ply").read_bytes()
    header = data[: data.index(b"end_header\n")].decode().splitlines()
    assert header[1] == "format binary_little_endian 1.0"
    props = [line.split() for line in header if line.startswith("property")]
    assert [p[2] for p in props] == PLY_HEADER
    assert all(p[1] == "float" for p in props)
    s = splats(assets / "objects/0.ply")
    assert np.allclose(np.linalg.norm(s["rot"].as_quat(), axis=1), 1, atol=1e-5)
    assert ((s["opacity"] > 0) & (s["opacity"] < 1)).all()
    assert ((s["rgb"] >= -1e-5) & (s["rgb"] <= 1 + 1e-5)).all()


def test_object_meshes_are_watertight_local_and_centred(assets, sample_masks):
    import trimesh

    for i in range(len(sample_masks)):
        glb = Glb((assets / f"objects/{i}.glb").read_bytes())
        arrays = glb.mesh_arrays(0)
        mesh = trimesh.Trimesh(arrays["POSITION"], arrays["indices"], process=False)
        assert mesh.is_watertight and mesh.volume > 0  # closed and wound outward
        lo, hi = arrays["POSITION"].min(0), arrays["POSITION"].max(0)
        assert (lo >= -0.5 - 1e-6).all() and (hi <= 0.5 + 1e-6).all()
        assert np.allclose((lo + hi) / 2, 0, atol=1e-5)
        assert np.isclose((hi - lo).max(), 1.0, atol=1e-5)


def test_object_glb_and_ply_coincide(assets, sample_masks):
    for i in range(len(sample_masks)):
        arrays = Glb((assets / f"objects/{i}.glb").read_bytes()).mesh_arrays(0)
        verts, normals = arrays["POSITION"].astype(np.float64), arrays["NORMAL"]
        s = splats(assets / f"objects/{i}.ply")
        assert np.allclose(s["xyz"].min(0), verts.min(0), atol=0.02)
        assert np.allclose(s["xyz"].max(0), verts.max(0), atol=0.02)
        edges = np.linalg.norm(
            verts[arrays["indices"][:, 0]] - verts[arrays["indices"][:, 1]], axis=1
        )
        dist, nearest = cKDTree(verts).query(s["xyz"])
        assert dist.max() < 2 * edges.max()
        # Splats lie flat on the surface: their thin axis follows the mesh normal.
        thin_axis = s["rot"].as_matrix()[np.arange(len(s["scale"])), :, s["scale"].argmin(1)]
        assert np.median(np.abs(np.sum(thin_axis * normals[nearest], 1))) > 0.9


def test_scene_ply_is_object_ply_mapped_by_matrix(assets, manifest):
    scene = splats(assets / "scene.ply")
    start = 0
    for obj in manifest["objects"]:
        local = splats(assets / obj["gaussian_ply"]["path"])
        n = len(local["xyz"])
        part = {k: v[start : start + n] for k, v in scene.items()}
        start += n
        m = np.array(obj["metadata"]["matrix"])
        linear = m[:3, :3]
        scale = np.cbrt(np.linalg.det(linear))
        assert np.allclose(part["xyz"], apply(m, local["xyz"]), atol=1e-4)
        assert np.allclose(part["scale"], local["scale"] * scale, rtol=1e-4)
        # Orientations: scene rotation == matrix rotation applied after the local rotation.
        expected = (linear / scale) @ local["rot"].as_matrix()
        assert np.allclose(part["rot"].as_matrix(), expected, atol=1e-4)
        assert np.allclose(part["rgb"], local["rgb"], atol=1e-5)
        assert np.allclose(part["opacity"], local["opacity"], atol=1e-5)
    assert start == len(scene["xyz"])


def test_scene_glb_nodes_carry_matrix(assets, manifest):
    glb = Glb((assets / "scene.glb").read_bytes())
    world = glb.world_matrices()
    for obj in manifest["objects"]:
        matrix, mesh = world[f"object_{obj['index']}"]
        assert mesh is not None
        assert np.allclose(matrix, np.array(obj["metadata"]["matrix"]), atol=1e-9)
        # The mesh under the node is the per-object mesh, still in local coordinates.
        local = Glb((assets / obj["mesh_glb"]["path"]).read_bytes()).mesh_arrays(0)["POSITION"]
        assert np.array_equal(glb.mesh_arrays(mesh)["POSITION"], local)


def test_scene_glb_and_scene_ply_coincide(assets, manifest):
    glb = Glb((assets / "scene.glb").read_bytes())
    world = glb.world_matrices()
    scene = splats(assets / "scene.ply")["xyz"]
    posed = np.concatenate(
        [
            apply(
                world[f"object_{o['index']}"][0],
                glb.mesh_arrays(world[f"object_{o['index']}"][1])["POSITION"],
            )
            for o in manifest["objects"]
        ]
    )
    dist, _ = cKDTree(posed).query(scene)
    assert np.percentile(dist, 99) < 0.02 * np.ptp(posed, 0).max()


def test_metadata_follows_sam3d_convention(manifest):
    """matrix == the documented SAM 3D pose: p_cam = (s p_zup) @ R(q) + t, then OpenGL."""
    rng = np.random.default_rng(1)
    local_yup = rng.uniform(-0.5, 0.5, (50, 3))
    p_zup = np.stack([local_yup[:, 0], -local_yup[:, 2], local_yup[:, 1]], 1)  # inverse of (x,z,-y)
    for obj in manifest["objects"]:
        meta = obj["metadata"]
        w, x, y, z = meta["rotation"]
        r = Rotation.from_quat([x, y, z, w]).as_matrix()
        p_cam = (np.array(meta["scale"]) * p_zup) @ r + np.array(meta["translation"])
        p_gl = p_cam * [-1, 1, -1]
        assert np.allclose(apply(meta["matrix"], local_yup), p_gl, atol=1e-9)
        assert np.allclose(np.array(meta["matrix"])[3], [0, 0, 0, 1])


def covered(camera: dict, xyz: np.ndarray, radius_px: np.ndarray) -> np.ndarray:
    """Pixels covered by splats drawn as discs of their projected size."""
    (fx, _, cx), (_, fy, cy), _ = camera["K"]
    depth = -xyz[:, 2]
    assert (depth > 0).all(), "every splat must be in front of the camera"
    u = cx + fx * xyz[:, 0] / depth
    v = cy - fy * xyz[:, 1] / depth
    hit = np.zeros((camera["height"], camera["width"]), bool)
    inside = (u >= 0) & (u < camera["width"]) & (v >= 0) & (v < camera["height"])
    hit[v[inside].astype(int), u[inside].astype(int)] = True
    r = max(1, int(round(np.median(radius_px))))
    disc = np.hypot(*np.mgrid[-r : r + 1, -r : r + 1]) <= r
    return ndimage.binary_dilation(hit, disc)


def test_posed_splats_project_onto_masks(inflate_assets, inflate_manifest, sample_masks):
    assets, manifest = inflate_assets, inflate_manifest
    scene = splats(assets / "scene.ply")
    fx = manifest["camera"]["K"][0][0]
    start = 0
    for obj, mask in zip(manifest["objects"], sample_masks, strict=True):
        n = obj["num_splats"]
        xyz, scale = scene["xyz"][start : start + n], scene["scale"][start : start + n]
        start += n
        pixels = covered(manifest["camera"], xyz, fx * scale.max(1) / -xyz[:, 2])
        iou = (pixels & mask).sum() / (pixels | mask).sum()
        assert iou >= 0.8, f"object {obj['index']}: IoU {iou:.3f}"


def test_camera_is_the_stated_pinhole(inflate_manifest, sample_image):
    manifest = inflate_manifest
    cam = manifest["camera"]
    h, w = sample_image.shape[:2]
    assert (cam["width"], cam["height"]) == (w, h)
    (fx, s, cx), (zero, fy, cy), last = cam["K"]
    assert (s, zero, last) == (0.0, 0.0, [0.0, 0.0, 1.0])
    assert fx == fy and (cx, cy) == (w / 2, h / 2)
    assert np.isclose(2 * np.degrees(np.arctan(w / 2 / fx)), manifest["options"]["fov_deg"])


def test_colours_come_from_the_image(inflate_assets, sample_image, sample_masks):
    assets = inflate_assets
    for i, mask in enumerate(sample_masks):
        expected = sample_image[mask].mean(0)
        colors = Glb((assets / f"objects/{i}.glb").read_bytes()).mesh_arrays(0)["COLOR_0"]
        # glTF's COLOR_0 is linear: encode back to sRGB (the photo's space) to compare.
        linear = colors[:, :3] / 255.0
        srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
        assert np.abs(srgb.mean(0) * 255 - expected).max() < 25
        assert np.abs(colors[:, :3].mean(0) - expected).max() > 25  # not the photo's values
        rgb = splats(assets / f"objects/{i}.ply")["rgb"] * 255
        assert np.abs(rgb.mean(0) - expected).max() < 25


def test_one_object_uses_the_same_frames_as_many(sample_image, sample_masks, manifest, assets):
    backend = InflateBackend() if manifest["backend"]["name"] == "inflate" else TiltedBackend()
    alone = run(sample_image, sample_masks[1:2], backend)
    alone_manifest = json.loads(alone["manifest.json"])
    many = manifest["objects"][1]
    assert alone_manifest["objects"][0]["metadata"] == many["metadata"]
    assert alone_manifest["camera"] == manifest["camera"]
    assert alone["objects/0.ply"] == (assets / "objects/1.ply").read_bytes()
    scene_alone = splats(alone["scene.ply"])
    scene_many = splats(assets / "scene.ply")
    start = manifest["objects"][0]["num_splats"]
    n = many["num_splats"]
    assert np.allclose(scene_alone["xyz"], scene_many["xyz"][start : start + n])


def test_deterministic_per_seed(sample_image, sample_masks):
    masks = sample_masks[:1]
    a, b = (
        run(sample_image, masks, seed=7, splats=2000),
        run(sample_image, masks, seed=7, splats=2000),
    )
    c = run(sample_image, masks, seed=8, splats=2000)
    for path in ("objects/0.glb", "objects/0.ply", "scene.glb", "scene.ply"):
        assert a[path] == b[path]
    assert a["objects/0.ply"] != c["objects/0.ply"]


def test_field_of_view_is_overridable(sample_image, sample_masks):
    files = run(sample_image, sample_masks[:1], fov_deg=40.0, splats=2000)
    cam = json.loads(files["manifest.json"])["camera"]
    assert np.isclose(cam["K"][0][0], cam["width"] / 2 / np.tan(np.radians(20)))


class _CountingMasks(list):
    """Masks that record which positions were decoded (read), from which thread."""

    def __init__(self, items):
        super().__init__(items)
        self.reads: list[tuple[int, str]] = []

    def __getitem__(self, pos):
        import threading

        self.reads.append((pos, threading.current_thread().name))
        return super().__getitem__(pos)


def test_masks_are_read_one_ahead_on_a_helper_thread_in_any_access_order():
    from concurrent.futures import ThreadPoolExecutor

    from worker.pipeline import _ReadAhead

    masks = _CountingMasks([np.full((2, 2), i) for i in range(4)])
    with ThreadPoolExecutor(1, thread_name_prefix="ahead") as pool:
        ahead = _ReadAhead(masks, pool)
        assert [int(ahead[i][0, 0]) for i in range(4)] == [0, 1, 2, 3]
        assert int(ahead[-1][0, 0]) == 3 and int(ahead[1][0, 0]) == 1  # out of order too
        assert [int(m[0, 0]) for m in ahead[1:3]] == [1, 2]
        with pytest.raises(IndexError):
            ahead[4]
    # Positions 1-3 were first decoded on the helper thread, while 0, 1, 2 were in use.
    helper = [pos for pos, thread in masks.reads if thread.startswith("ahead")]
    assert helper[:3] == [1, 2, 3]
