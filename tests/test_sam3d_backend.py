"""The sam3d backend without weights: conversion of upstream-shaped outputs to our artifacts,
option mapping, preflight. CI has no GPU and the weights are gated, so upstream's output is
rebuilt here as upstream lays it out: real torch tensors in a Gaussian object with upstream's
storage and getters, a trimesh.Trimesh already mapped to Y-up, pose tensors of shape (1, k).
The geometry comes from the real inflate backend, so the same consistency checks apply."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from readers import Glb, read_ply
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from jobs.errors import Sam3dError
from jobs.frames import Camera, quat_multiply
from jobs.options import parse_options
from jobs.settings import Settings
from worker.backends import sam3d
from worker.backends.inflate import InflateBackend
from worker.backends.sam3d import convert, preflight
from worker.pipeline import generate_assets

Z_UP_FROM_Y_UP = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])  # inverse of (x,y,z)->(x,z,-y)
SH_C0 = 0.28209479177387814
TRUE_CAMERA = Camera(640, 480, 560.0, 560.0, 322.0, 236.5)


class UpstreamGaussian:
    """Upstream's storage: positions normalised into an AABB, pre-activation scales, opacity
    and rotation offsets by biases, SH DC colours; read through the same getters."""

    def __init__(self, xyz, rotation_wxyz, scales, opacity, rgb, kernel=1e-4):
        self.aabb = torch.tensor([-0.5, -0.5, -0.5, 1.0, 1.0, 1.0], dtype=torch.float64)
        self.mininum_kernel_size = kernel
        self.rots_bias = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)
        self.opacity_bias = 0.1
        self.scale_bias = np.log(0.01)
        self._xyz = (torch.from_numpy(xyz) - self.aabb[:3]) / self.aabb[3:]
        # exp(raw + bias)^2 + kernel^2 == scales^2  ->  raw = log(sqrt(s^2 - k^2)) - bias
        self._scaling = (
            torch.log(torch.sqrt(torch.from_numpy(scales) ** 2 - kernel**2)) - self.scale_bias
        )
        self._rotation = torch.from_numpy(rotation_wxyz) * 2.5 - self.rots_bias  # unnormalised
        logit = np.log(opacity / (1 - opacity))
        self._opacity = torch.from_numpy(logit[:, None]) - self.opacity_bias
        self._features_dc = torch.from_numpy((rgb - 0.5) / SH_C0)[:, None, :]

    @property
    def get_xyz(self):
        return self._xyz * self.aabb[3:] + self.aabb[:3]

    @property
    def get_rotation(self):
        q = self._rotation + self.rots_bias
        return q / q.norm(dim=-1, keepdim=True)

    @property
    def get_scaling(self):
        s = torch.exp(self._scaling + self.scale_bias)
        return torch.sqrt(s**2 + self.mininum_kernel_size**2)

    @property
    def get_opacity(self):
        return torch.sigmoid(self._opacity + self.opacity_bias)


def pointmap_for(camera: Camera, depth: float, step: int = 2) -> torch.Tensor:
    """A pointmap as upstream returns it: downsampled, PyTorch3D camera frame."""
    rows, cols = camera.height // step, camera.width // step
    v, u = np.mgrid[:rows, :cols]
    u = (u + 0.5) * step
    v = (v + 0.5) * step
    z = np.full(u.shape, depth) + 0.01 * np.sin(u / 50)
    x = -(u - camera.cx) * z / camera.fx
    y = -(v - camera.cy) * z / camera.fy
    return torch.from_numpy(np.stack([x, y, z], -1))


def upstream_output(image, mask, seed: int, *, colours: bool = True) -> dict:
    """Real inflate geometry laid out exactly as SAM 3D's pipeline.run returns it."""
    camera = Camera.from_fov(image.shape[1], image.shape[0], 60)
    ours = InflateBackend().generate(
        image, mask, camera=camera, seed=seed, options=parse_options("inflate", {"splats": 3000})
    )
    g = ours.gaussians
    rot_yup = Rotation.from_quat(g.rotations[:, [1, 2, 3, 0]].astype(np.float64)).as_matrix()
    rot_zup = Rotation.from_matrix(Z_UP_FROM_Y_UP @ rot_yup).as_quat()[:, [3, 0, 1, 2]]
    gs = UpstreamGaussian(
        xyz=g.positions.astype(np.float64) @ Z_UP_FROM_Y_UP.T,
        rotation_wxyz=rot_zup,
        scales=g.scales.astype(np.float64),
        opacity=g.opacities.astype(np.float64),
        rgb=g.colors.astype(np.float64),
    )
    glb = trimesh.Trimesh(ours.mesh.vertices, ours.mesh.faces, process=False)
    if colours:
        glb.visual.vertex_colors = ours.mesh.colors
    rng = np.random.default_rng(seed)
    q = Rotation.random(random_state=seed).as_quat()[[3, 0, 1, 2]]
    return {
        "gs": gs,
        "gaussian": [gs],
        "glb": glb,
        "rotation": torch.tensor(q[None], dtype=torch.float32),
        "translation": torch.tensor([[rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), 3.0]]),
        "scale": torch.tensor([[0.8, 0.8, 0.8]]),
        "pointmap": pointmap_for(TRUE_CAMERA, 3.0),
        "pointmap_colors": torch.zeros(240, 320, 3),
    }


class UpstreamShapedBackend:
    """Stands in for Sam3dBackend.generate: upstream-shaped output through convert_output."""

    name = "sam3d"
    version = "test"

    def __init__(self):
        self.outputs = []

    def camera(self, image, options):
        return None

    def generate(self, image, mask, *, camera, seed, options):
        output = upstream_output(image, mask, seed=int(mask.sum()) % 1000)
        self.outputs.append(output)
        return convert.convert_output(output, image.shape[:2])


@pytest.fixture(scope="module")
def converted(sample_image, sample_masks, tmp_path_factory):
    backend = UpstreamShapedBackend()
    options = parse_options("sam3d", {})
    artifacts = generate_assets(sample_image, sample_masks, backend, options=options, job_id="t")
    out = tmp_path_factory.mktemp("sam3d")
    for path, data in artifacts.files.items():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(data)
    return out, backend.outputs, json.loads(artifacts.files["manifest.json"])


def ply_table(path: Path) -> dict[str, np.ndarray]:
    names, table, _ = read_ply(path)
    col = {n: table[:, i].astype(np.float64) for i, n in enumerate(names)}
    q = np.stack([col["rot_0"], col["rot_1"], col["rot_2"], col["rot_3"]], 1)
    return {
        "xyz": np.stack([col["x"], col["y"], col["z"]], 1),
        "rot": Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix(),
        "scale": np.exp(np.stack([col["scale_0"], col["scale_1"], col["scale_2"]], 1)),
    }


def test_pose_metadata_is_upstream_pose_exactly(converted):
    _, outputs, manifest = converted
    for obj, output in zip(manifest["objects"], outputs, strict=True):
        meta = obj["metadata"]
        q = output["rotation"].numpy().reshape(4).astype(np.float64)
        assert np.allclose(meta["rotation"], q / np.linalg.norm(q), atol=1e-7)
        assert np.allclose(meta["translation"], output["translation"].numpy().reshape(3))
        assert np.allclose(meta["scale"], output["scale"].numpy().reshape(3))


def test_scene_ply_matches_upstreams_own_scene_formula(converted):
    """Upstream composes a scene with row vectors, p_cam = (s p) @ R(q) + t in the Z-up object
    frame, and turns each splat by R(q) the same way. Our scene.ply, mapped back from the
    OpenGL camera to PyTorch3D's (x -> -x, z -> -z), must be exactly that."""
    out, outputs, manifest = converted
    scene = ply_table(out / "scene.ply")
    start = 0
    assert len(outputs) == len(manifest["objects"])
    for output in outputs:
        gs = output["gs"]
        xyz = gs.get_xyz.numpy()
        rot = Rotation.from_quat(gs.get_rotation.numpy()[:, [1, 2, 3, 0]]).as_matrix()
        q = output["rotation"].numpy().reshape(4).astype(np.float64)
        r = Rotation.from_quat(q[[1, 2, 3, 0]]).as_matrix()
        s = float(output["scale"][0, 0])
        t = output["translation"].numpy().reshape(3)
        expected_xyz = (s * xyz) @ r + t
        expected_rot = r.T @ rot  # the row-vector rotation in column form, applied to each splat
        n = len(xyz)
        flip = np.diag([-1.0, 1.0, -1.0])
        got_xyz = scene["xyz"][start : start + n] @ flip
        got_rot = flip @ scene["rot"][start : start + n]
        assert np.allclose(got_xyz, expected_xyz, atol=1e-4)
        # Axes of each Gaussian (columns) up to sign: compare the covariance's shape.
        s_up = gs.get_scaling.numpy()
        cov_expected = np.einsum("nij,nj,nkj->nik", expected_rot, (s * s_up) ** 2, expected_rot)
        cov_got = np.einsum(
            "nij,nj,nkj->nik", got_rot, scene["scale"][start : start + n] ** 2, got_rot
        )
        assert np.allclose(cov_got, cov_expected, atol=1e-8)
        start += n
    assert start == len(scene["xyz"])


def test_per_object_glb_and_ply_coincide_and_are_y_up(converted):
    out, outputs, manifest = converted
    for obj, output in zip(manifest["objects"], outputs, strict=True):
        glb = Glb((out / obj["mesh_glb"]["path"]).read_bytes()).mesh_arrays(0)
        ply = ply_table(out / obj["gaussian_ply"]["path"])
        assert np.allclose(ply["xyz"].min(0), glb["POSITION"].min(0), atol=0.02)
        assert np.allclose(ply["xyz"].max(0), glb["POSITION"].max(0), atol=0.02)
        dist, _ = cKDTree(glb["POSITION"]).query(ply["xyz"])
        assert np.percentile(dist, 99) < 0.03
        # Y-up: the upstream Z-up positions map (x, y, z) -> (x, z, -y).
        zup = output["gs"].get_xyz.numpy()
        assert np.allclose(ply["xyz"], np.stack([zup[:, 0], zup[:, 2], -zup[:, 1]], 1), atol=1e-6)


def test_scene_glb_nodes_carry_the_pose_matrix(converted):
    out, _, manifest = converted
    world = Glb((out / "scene.glb").read_bytes()).world_matrices()
    for obj in manifest["objects"]:
        assert np.allclose(world[f"object_{obj['index']}"][0], obj["metadata"]["matrix"])


def test_camera_is_fitted_from_the_pointmap(converted):
    _, _, manifest = converted
    (fx, _, cx), (_, fy, cy), _ = manifest["camera"]["K"]
    assert np.allclose([fx, fy, cx, cy], [560.0, 560.0, 322.0, 236.5], rtol=1e-6, atol=1e-6)


def test_mesh_without_colour_gets_a_neutral_one(sample_image, sample_masks):
    output = upstream_output(sample_image, sample_masks[0], seed=1, colours=False)
    output["glb"].visual = trimesh.visual.ColorVisuals()  # what post-processing leaves
    result = convert.convert_output(output, sample_image.shape[:2])
    assert (result.mesh.colors == np.array(convert.NO_COLOUR, np.uint8)).all()


def test_missing_outputs_are_backend_failures(sample_image, sample_masks):
    output = upstream_output(sample_image, sample_masks[0], seed=1)
    for key in ("gs", "gaussian"):
        output.pop(key)
    with pytest.raises(Sam3dError) as info:
        convert.convert_output(output, sample_image.shape[:2])
    assert info.value.code == "backend_failed"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            {},
            {
                "stage1_inference_steps": 25,
                "stage2_inference_steps": 25,
                "use_stage1_distillation": False,
                "use_stage2_distillation": False,
                "with_texture_baking": False,
                "with_mesh_postprocess": False,
                "use_vertex_color": True,
                "decode_formats": ["gaussian", "mesh"],
                "seed": 0,
            },
        ),
        (
            {"fast": True, "seed": 9},
            {
                "stage1_inference_steps": 4,
                "stage2_inference_steps": 4,
                "use_stage1_distillation": True,
                "use_stage2_distillation": True,
                "seed": 9,
            },
        ),
        (
            {"fast": True, "stage1_steps": 8},
            {"stage1_inference_steps": 8, "stage2_inference_steps": 4},
        ),
        ({"stage2_steps": 12}, {"stage1_inference_steps": 25, "stage2_inference_steps": 12}),
        ({"splats_per_voxel": 4}, {"decode_formats": ["gaussian", "mesh", "gaussian_4"]}),
        (
            {"texture_baking": True, "mesh_postprocess": True},
            {"with_texture_baking": True, "with_mesh_postprocess": True, "use_vertex_color": False},
        ),
    ],
)
def test_options_map_to_upstream_run_arguments(options, expected):
    kwargs = sam3d.run_kwargs(parse_options("sam3d", options))
    assert {k: kwargs[k] for k in expected} == expected


@pytest.mark.parametrize("bad", [{"splats_per_voxel": 8}, {"fast": "yes"}, {"stage1_steps": -1}])
def test_bad_sam3d_options_are_refused(bad):
    with pytest.raises(Sam3dError) as info:
        parse_options("sam3d", bad)
    assert info.value.code == "invalid_option"


def complete_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in preflight.REQUIRED_FILES:
        (folder / name).write_text("x")
    return folder


def test_preflight_names_missing_checkpoint_files(tmp_path):
    folder = complete_checkpoint(tmp_path / "ckpt")
    (folder / "slat_generator.ckpt").unlink()
    (folder / "ss_decoder.yaml").unlink()
    with pytest.raises(preflight.PreflightError) as info:
        preflight.preflight(Settings(checkpoint_dir=str(folder)))
    problem = info.value.problems[0]
    assert (
        "incomplete" in problem
        and "slat_generator.ckpt" in problem
        and "ss_decoder.yaml" in problem
    )
    assert "pipeline.yaml" not in problem


def test_preflight_names_the_requirements_file_and_the_gpu(tmp_path):
    folder = complete_checkpoint(tmp_path / "ckpt")
    with pytest.raises(preflight.PreflightError) as info:
        preflight.preflight(Settings(checkpoint_dir=str(folder)))
    text = "\n".join(info.value.problems)
    assert "sam3d_objects" in text and "requirements/gpu.txt" in text
    assert "no CUDA device" in text  # this machine has no NVIDIA GPU
    assert "checkpoint" not in text


def test_preflight_refuses_too_little_free_gpu_memory(tmp_path, monkeypatch):
    """No GPU here: NVML's answer is replaced by a hand-written one for a 24 GB card."""
    folder = complete_checkpoint(tmp_path / "ckpt")
    card = {"index": 0, "name": "Fake 24GB", "memory_total_mb": 24576, "memory_free_mb": 23000}
    monkeypatch.setattr(preflight, "_nvml_gpu", lambda index: card)
    monkeypatch.setattr(preflight.importlib.util, "find_spec", lambda name: object())
    with pytest.raises(preflight.PreflightError) as info:
        preflight.preflight(Settings(checkpoint_dir=str(folder)))
    assert info.value.problems == [
        "GPU 0 (Fake 24GB) has 22.5 GB free; SAM 3D needs 32 GB (SAM3D_MIN_FREE_GPU_GB overrides)"
    ]
    assert preflight.preflight(Settings(checkpoint_dir=str(folder), min_free_gpu_gb=20)) == card


def test_worker_command_without_weights_exits_nonzero_naming_them(tmp_path):
    cli = str(Path(sys.executable).parent / "sam3d-jobs")
    env = {"PATH": "/usr/bin:/bin", "SAM3D_CHECKPOINT_DIR": str(tmp_path / "none")}
    result = subprocess.run(
        [cli, "worker", "--backend", "sam3d"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    assert f"checkpoint folder {tmp_path / 'none'} does not exist" in result.stderr
    assert "requirements/gpu.txt" in result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(
    not Settings.from_env().checkpoint_dir,
    reason="needs the SAM 3D weights (SAM3D_CHECKPOINT_DIR) and a 32 GB GPU; not in CI",
)
def test_real_model_generates_one_object(sample_image, sample_masks):
    backend = sam3d.Sam3dBackend()
    backend.setup()
    options = parse_options("sam3d", {"fast": True})
    files = generate_assets(
        sample_image, sample_masks[:1], backend, options=options, job_id="gpu"
    ).files
    manifest = json.loads(files["manifest.json"])
    assert manifest["objects"][0]["num_splats"] > 1000


def test_splats_convert_on_their_device_as_the_float64_formula_gives(sample_image, sample_masks):
    gs = upstream_output(sample_image, sample_masks[0], seed=3)["gs"]
    ours = convert.convert_gaussians(gs)
    xyz = gs.get_xyz.numpy()
    assert np.array_equal(ours.positions, (xyz @ convert.Z_UP_TO_Y_UP.T).astype(np.float32))
    q = quat_multiply(convert._Q_Z_UP_TO_Y_UP, gs.get_rotation.numpy())
    assert np.abs(ours.rotations - q).max() < 3e-7  # float32 arithmetic: within an ulp or two
    assert np.allclose(ours.scales, gs.get_scaling.numpy(), rtol=1e-6, atol=0)
    assert np.allclose(ours.opacities, gs.get_opacity.numpy().reshape(-1), rtol=1e-6, atol=0)
    rgb = gs._features_dc.numpy()[:, 0] * SH_C0 + 0.5
    assert np.allclose(ours.colors, rgb, atol=1e-6)
    for field in (ours.positions, ours.rotations, ours.scales, ours.opacities, ours.colors):
        assert field.dtype == np.float32 and field.flags.c_contiguous


def test_the_line_fit_is_numpys_least_squares():
    rng = np.random.default_rng(0)
    a = rng.normal(size=5000)
    b = 3.5 * a - 2.0 + rng.normal(scale=0.1, size=a.size)
    assert np.allclose(convert._line_fit(a, b), np.polyfit(a, b, 1), rtol=1e-9, atol=1e-9)
    assert convert._line_fit(np.full(100, 0.25), b[:100]) is None  # no spread: nothing to fit
    points = torch.zeros(40, 50, 3, dtype=torch.float64)
    points[..., 2] = 2.0  # every point on the optical axis
    assert convert.camera_from_pointmap(points, (400, 500)) is None


def test_a_pointmap_shared_by_an_images_objects_is_fitted_once(
    sample_image, sample_masks, monkeypatch
):
    fits = []
    own = convert.camera_from_pointmap

    def counted(pointmap, image_size):
        fits.append(id(pointmap))
        return own(pointmap, image_size)

    monkeypatch.setattr(convert, "camera_from_pointmap", counted)
    outputs = [upstream_output(sample_image, m, seed=i) for i, m in enumerate(sample_masks[:3])]
    shared = outputs[0]["pointmap"]
    for output in outputs[:2]:
        output["pointmap"] = shared
    per_image = convert.ImageOutputs(sample_image.shape[:2])
    results = [per_image(output) for output in outputs]
    assert fits == [id(shared), id(outputs[2]["pointmap"])]  # once per pointmap
    fits.clear()
    for output, result in zip(outputs, results, strict=True):
        alone = convert.convert_output(output, sample_image.shape[:2])
        assert result.camera == alone.camera
        assert np.allclose(result.camera.fx, TRUE_CAMERA.fx) and np.allclose(
            result.camera.cy, TRUE_CAMERA.cy
        )
        assert np.array_equal(result.gaussians.positions, alone.gaussians.positions)
        assert result.pose == alone.pose


def test_jobs_share_batched_passes_only_with_the_same_generation_options():
    """``batch_key`` (worker/batching.py): equal for options that change only the seed or the
    export; different for another mode, other steps, or other splats per voxel."""
    key = sam3d.Sam3dBackend(Settings()).batch_key

    def opts(**o):
        return parse_options("sam3d", o)

    base = key(opts(fast=True))
    assert key(opts(fast=True, seed=5)) == base
    assert key(opts(fast=True, formats=["glb"], scene=False)) == base
    assert key(opts()) != base
    assert key(opts(fast=True, stage1_steps=8)) != base
    assert key(opts(fast=True, splats_per_voxel=4)) != base
