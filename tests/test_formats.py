"""Asset formats (issue 15): the ``formats`` and ``mesh`` options, each file read back by an
independent reader: spz-js for SPZ, the Khronos validator for GLBs (KHR_gaussian_splatting,
meshopt, Draco), usd-core for USDZ, plyfile for PLY."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from readers import JS_TOOLS, Glb, read_ply, validate_gltf

from jobs.errors import Sam3dError
from jobs.options import parse_options
from worker.assets import mesh_ops
from worker.backends.base import Mesh
from worker.backends.inflate import InflateBackend
from worker.pipeline import artifact_paths, generate_assets

SH_C0 = 0.28209479177387814
ALL = ["glb", "ply", "spz", "usdz", "splats_glb"]
TARGET_FACES = 1500
needs_compression = pytest.mark.skipif(
    not mesh_ops.compression_available(), reason="make install builds worker/js"
)


def generate(image, masks, tmp: Path, **options) -> tuple[Path, dict]:
    opts = parse_options("inflate", {"splats": 2000, "resolution": 48, **options})
    artifacts = generate_assets(image, masks, InflateBackend(), options=opts, job_id="t")
    for path, data in artifacts.files.items():
        (tmp / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp / path).write_bytes(data)
    return tmp, artifacts.manifest


@pytest.fixture(scope="module")
def every_format(sample_image, sample_masks, tmp_path_factory):
    """Every format, decimated and meshopt-compressed."""
    if not mesh_ops.compression_available():
        pytest.skip("make install builds worker/js (mesh compression)")
    return generate(
        sample_image,
        sample_masks,
        tmp_path_factory.mktemp("formats"),
        formats=ALL,
        mesh={"target_faces": TARGET_FACES, "compression": "meshopt"},
    )


def read_spz(*paths: Path) -> dict[str, dict]:
    out = subprocess.run(
        ["node", str(JS_TOOLS / "read_spz.mjs"), *map(str, paths)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return json.loads(out.stdout)


# -- options
@pytest.mark.parametrize(
    "options",
    [
        {"formats": ["glb", "fbx"]},
        {"formats": "glb"},
        {"formats": []},
        {"formats": {"objects": ["ply"], "scenes": ["ply"]}},
        {"formats": {"objects": [], "scene": ["glb"]}},
        {"formats": {"objects": ["glb", 3]}},
        {"scene": "yes"},
        {"mesh": {"target_faces": 2}},
        {"mesh": {"target_faces": 100.5}},
        {"mesh": {"target_faces": True}},
        {"mesh": {"compression": "zip"}},
        {"mesh": {"faces": 100}},
        {"mesh": 100},
    ],
)
def test_bad_format_options_are_invalid_option(options):
    for backend in ("inflate", "sam3d"):  # the same options for every backend
        with pytest.raises(Sam3dError) as err:
            parse_options(backend, options)
        assert err.value.code == "invalid_option"


def test_format_options_defaults_and_forms():
    default = parse_options("inflate", {})
    assert default["formats"] == {"objects": ["glb", "ply"], "scene": ["glb", "ply"]}
    assert default["scene"] is True
    assert default["mesh"] == {"target_faces": None, "compression": "none"}
    one = parse_options("sam3d", {"formats": ["spz", "glb", "spz"]})
    assert one["formats"] == {"objects": ["glb", "spz"], "scene": ["glb", "spz"]}
    split = parse_options("inflate", {"formats": {"objects": ["usdz"], "scene": []}})
    assert split["formats"] == {"objects": ["usdz"], "scene": []}
    assert artifact_paths(1, split) == ["objects/0.usdz", "manifest.json"]
    assert artifact_paths(1, parse_options("inflate", {"scene": False})) == [
        "objects/0.glb",
        "objects/0.ply",
        "manifest.json",
    ]


# -- every format at once
def test_every_format_is_written_named_and_listed(every_format):
    out, manifest = every_format
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(artifact_paths(3, manifest["options"]))
    assert "objects/0.spz" in written and "scene.splats.glb" in written
    assert "objects/2.usdz" in written and "scene.usdz" in written
    obj = manifest["objects"][0]
    assert obj["gaussian_spz"]["path"] == "objects/0.spz"
    assert obj["splats_glb"]["path"] == "objects/0.splats.glb"
    assert obj["mesh_usdz"]["content_type"] == "model/vnd.usdz+zip"
    assert manifest["scene"]["mesh_glb"]["bytes"] == (out / "scene.glb").stat().st_size
    assert manifest["options"]["mesh"] == {"target_faces": TARGET_FACES, "compression": "meshopt"}


def test_spz_read_by_spz_js_matches_the_ply(every_format):
    out, _ = every_format
    decoded = read_spz(out / "objects/1.spz", out / "scene.spz")
    for spz_path, ply_path in (("objects/1.spz", "objects/1.ply"), ("scene.spz", "scene.ply")):
        cloud = decoded[str(out / spz_path)]
        names, rows, _ = read_ply(out / ply_path)
        col = {n: i for i, n in enumerate(names)}
        n = len(rows)
        assert cloud["numPoints"] == n and cloud["shDegree"] == 0
        pos = np.array(cloud["positions"]).reshape(n, 3)
        np.testing.assert_allclose(pos, rows[:, [col["x"], col["y"], col["z"]]], atol=2e-4)
        scales = np.array(cloud["scales"]).reshape(n, 3)  # log, as in the PLY
        log_scale = rows[:, [col[f"scale_{i}"] for i in range(3)]]
        np.testing.assert_allclose(scales, log_scale, atol=1 / 32 + 1e-6)
        alpha = 1 / (1 + np.exp(-np.array(cloud["alphas"])))
        opacity = 1 / (1 + np.exp(-rows[:, col["opacity"]]))
        np.testing.assert_allclose(alpha, opacity, atol=1 / 255)
        rgb = np.array(cloud["colors"]).reshape(n, 3) * SH_C0 + 0.5
        ply_rgb = rows[:, [col[f"f_dc_{i}"] for i in range(3)]] * SH_C0 + 0.5
        np.testing.assert_allclose(rgb, ply_rgb, atol=0.01)
        quat = np.array(cloud["rotations"]).reshape(n, 4)[:, [3, 0, 1, 2]]  # xyzw -> wxyz
        ply_q = rows[:, [col[f"rot_{i}"] for i in range(4)]]
        ply_q /= np.linalg.norm(ply_q, axis=1, keepdims=True)
        assert np.abs(np.abs((quat * ply_q).sum(axis=1)) - 1).max() < 0.02


def test_splats_glb_has_khr_gaussian_splatting_beside_the_mesh(every_format):
    out, manifest = every_format
    reports = validate_gltf(out / "objects/0.splats.glb", out / "scene.splats.glb")
    for report in reports.values():
        # gltf-validator 2.0.0-dev.3.10 (the newest) predates KHR_gaussian_splatting: it
        # reports the extension's attribute semantics as invalid; nothing else may be wrong.
        others = [
            m
            for m in report["messages"]
            if m["severity"] == 0
            and not (
                m["code"] == "MESH_PRIMITIVE_INVALID_ATTRIBUTE"
                and "/attributes/KHR_gaussian_splatting:" in m["pointer"]
            )
        ]
        assert others == [] and report["numWarnings"] == 0
        assert "KHR_gaussian_splatting" in report["info"]["extensionsUsed"]
    glb = Glb((out / "objects/0.splats.glb").read_bytes())
    triangles, points = glb.doc["meshes"][0]["primitives"]
    assert triangles["mode"] == 4 and points["mode"] == 0
    assert points["extensions"]["KHR_gaussian_splatting"]["kernel"] == "ellipse"
    names, rows, _ = read_ply(out / "objects/0.ply")
    col = {n: i for i, n in enumerate(names)}
    attrs = {k: glb.accessor(v) for k, v in points["attributes"].items()}
    np.testing.assert_allclose(attrs["POSITION"], rows[:, [col["x"], col["y"], col["z"]]])
    np.testing.assert_allclose(
        np.log(attrs["KHR_gaussian_splatting:SCALE"]),
        rows[:, [col[f"scale_{i}"] for i in range(3)]],
        atol=1e-5,
    )
    xyzw = attrs["KHR_gaussian_splatting:ROTATION"]
    np.testing.assert_allclose(np.linalg.norm(xyzw, axis=1), 1, atol=1e-5)
    scene = Glb((out / "scene.splats.glb").read_bytes())
    assert [n["name"] for n in scene.doc["nodes"]] == ["object_0", "object_1", "object_2"]
    for node, obj in zip(scene.doc["nodes"], manifest["objects"], strict=True):
        m = np.array(node["matrix"]).reshape(4, 4).T
        np.testing.assert_allclose(m, obj["metadata"]["matrix"], atol=1e-9)


def test_decimated_meshopt_glb_is_valid_and_under_the_face_budget(every_format):
    out, manifest = every_format
    reports = validate_gltf(out / "objects/0.glb", out / "scene.glb")
    for report in reports.values():
        assert report["numErrors"] == 0 and report["numWarnings"] == 0, report["messages"]
        assert "EXT_meshopt_compression" in report["info"]["extensionsRequired"]
    for obj in manifest["objects"]:
        assert obj["num_faces"] <= TARGET_FACES < obj["num_faces_generated"]
    # the compressed file holds what the validator decoded: at most the budget per object
    info = reports[str(out / "scene.glb")]["info"]
    assert info["totalTriangleCount"] <= 3 * TARGET_FACES


def test_usdz_read_back_by_usd_core(every_format):
    from pxr import Gf, Usd, UsdGeom

    out, manifest = every_format
    stage = Usd.Stage.Open(str(out / "objects/1.usdz"))
    assert UsdGeom.GetStageUpAxis(stage) == UsdGeom.Tokens.y
    mesh = UsdGeom.Mesh(stage.GetPrimAtPath("/root/object_0/mesh"))
    assert len(mesh.GetPointsAttr().Get()) == manifest["objects"][1]["num_vertices"]
    assert len(mesh.GetFaceVertexCountsAttr().Get()) == manifest["objects"][1]["num_faces"]
    colors = np.array(mesh.GetDisplayColorPrimvar().Get())
    assert colors.shape == (manifest["objects"][1]["num_vertices"], 3) and colors.max() <= 1
    scene = Usd.Stage.Open(str(out / "scene.usdz"))
    for obj in manifest["objects"]:
        prim = scene.GetPrimAtPath(f"/root/object_{obj['index']}")
        world = UsdGeom.Xformable(prim).ComputeLocalToWorldTransform(Usd.TimeCode.Default())
        ours = np.array(obj["metadata"]["matrix"])
        np.testing.assert_allclose(np.array(world).T, ours, atol=1e-6)
        assert isinstance(world, Gf.Matrix4d)


@needs_compression
def test_draco_glb_is_valid(sample_image, sample_masks, tmp_path):
    out, manifest = generate(
        sample_image, sample_masks[:1], tmp_path, formats=["glb"], mesh={"compression": "draco"}
    )
    report = validate_gltf(out / "objects/0.glb")[str(out / "objects/0.glb")]
    assert report["numErrors"] == 0 and report["numWarnings"] == 0, report["messages"]
    assert report["info"]["extensionsRequired"] == ["KHR_draco_mesh_compression"]
    assert sorted(manifest["scene"]) == ["mesh_glb", "num_splats"]


def test_scene_off_writes_objects_only(sample_image, sample_masks, tmp_path):
    out, manifest = generate(sample_image, sample_masks[:2], tmp_path, formats=["spz"], scene=False)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "manifest.json",
        "objects/0.spz",
        "objects/1.spz",
    ]
    assert manifest["scene"] == {}
    assert "mesh_glb" not in manifest["objects"][0]


def test_decimation_keeps_colours():
    # a sphere-ish grid mesh, left half red, right half blue
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=5)
    red = sphere.vertices[:, 0] < 0
    colors = np.where(red[:, None], [255, 0, 0, 255], [0, 0, 255, 255]).astype(np.uint8)
    mesh = Mesh(sphere.vertices.astype("f4"), sphere.faces.astype("i4"), colors)
    small = mesh_ops.decimate(mesh, 500)
    assert len(small.faces) <= 500 < len(mesh.faces)
    assert small.faces.max() < len(small.vertices) == len(small.colors)
    left = small.vertices[:, 0] < -0.2
    right = small.vertices[:, 0] > 0.2
    assert (small.colors[left, 0] > 200).all() and (small.colors[left, 2] < 55).all()
    assert (small.colors[right, 2] > 200).all() and (small.colors[right, 0] < 55).all()
    assert mesh_ops.decimate(mesh, 10**6) is mesh
