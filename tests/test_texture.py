"""UV unwrapping and baking (worker/assets/texture.py) on an inflate object: the texture
read back at each vertex's UV gives the appearance there; no texel is left unfilled."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.frames import Camera
from worker.assets import texture
from worker.backends.inflate import inflate_object


@pytest.fixture(scope="module")
def mesh(sample_image, sample_masks):
    camera = Camera.from_fov(sample_image.shape[1], sample_image.shape[0], 60.0)
    return inflate_object(sample_image, sample_masks[0], camera, seed=0, resolution=48).mesh


def gradient(points, normals):
    return np.stack([points[:, 0] + 0.5, points[:, 1] + 0.5, np.full(len(points), 0.25)], 1)


def test_the_baked_texture_gives_the_appearance_back_at_every_vertex(mesh):
    baked = texture.bake(mesh, 512, gradient)
    assert baked.image.shape == (512, 512, 3) and baked.image.dtype == np.uint8
    assert baked.uvs.min() >= 0 and baked.uvs.max() <= 1
    # Seams split vertices: each new vertex is an original one, the surface unchanged.
    assert np.array_equal(baked.vertices, mesh.vertices[baked.source])
    assert len(baked.faces) == len(mesh.faces) and baked.faces.max() < len(baked.vertices)
    got = texture.sample_image(baked.image, baked.uvs[:, 0] * 512, baked.uvs[:, 1] * 512)
    error = np.abs(got - gradient(baked.vertices, None))
    assert np.median(error) < 0.01 and np.percentile(error, 99) < 0.03


def test_gutters_fill_every_texel_with_a_colour_of_the_surface(mesh):
    red = lambda points, normals: np.tile([1.0, 0.0, 0.0], (len(points), 1))  # noqa: E731
    baked = texture.bake(mesh, 256, red)
    # No texel keeps the atlas's empty black: the gutters took their charts' colour.
    assert (baked.image.reshape(-1, 3) == [255, 0, 0]).all()


def test_rasterize_covers_a_triangle_s_texels_once_with_barycentric_weights():
    uvs = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
    faces = np.array([[0, 1, 2], [1, 3, 2]], np.int32)
    rows, cols, tri, bary = texture.rasterize(uvs, faces, 8, 8)
    cells = set(zip(rows.tolist(), cols.tolist(), strict=True))
    assert len(cells) == len(rows) == 64  # every texel of the square, once (the diagonal's too)
    assert set(tri.tolist()) == {0, 1}
    assert np.allclose(bary.sum(1), 1) and (bary >= 0).all()
    centre = (np.stack([cols, rows], 1) + 0.5) / 8
    recon = np.einsum("nk,nkj->nj", bary, uvs[faces[tri]])
    assert np.allclose(recon, centre, atol=1e-6)


def test_textured_glbs_and_their_scene_pass_the_khronos_validator(mesh, tmp_path):
    from readers import Glb, validate_gltf

    from worker.assets import glb

    baked = texture.bake(mesh, 256, gradient)
    one = glb.export_mesh_glb(mesh, baked)
    plain = glb.export_mesh_glb(mesh)
    scene = glb.merge_glbs([one, plain, one], [np.eye(4)] * 3)
    paths = {"object.glb": one, "scene.glb": scene}
    for name, data in paths.items():
        (tmp_path / name).write_bytes(data)
    reports = validate_gltf(*(tmp_path / name for name in paths))
    for name in paths:
        report = reports[str(tmp_path / name)]
        assert report["numErrors"] == 0, report["messages"]
        assert report["numWarnings"] == 0, report["messages"]
    doc = Glb(scene).doc
    # Each textured object keeps its own texture; the vertex-coloured one has none.
    assert len(doc["images"]) == 2 and len(doc["textures"]) == 2
    prims = [m["primitives"][0] for m in doc["meshes"]]
    assert [p.get("material") for p in prims] == [0, None, 1]
    assert [doc["materials"][p["material"]]["pbrMetallicRoughness"]["baseColorTexture"]["index"]
            for p in (prims[0], prims[2])] == [0, 1]  # fmt: skip
    assert "COLOR_0" in prims[1]["attributes"] and "TEXCOORD_0" in prims[0]["attributes"]


@pytest.fixture(scope="module")
def textured(sample_image, sample_masks, tmp_path_factory):
    """Two objects with every format, decimated, meshopt-compressed, textured at 256."""
    from worker.assets import mesh_ops

    if not mesh_ops.compression_available():
        pytest.skip("make install builds worker/js (mesh compression)")
    from jobs.options import parse_options
    from worker.backends.inflate import InflateBackend
    from worker.pipeline import generate_assets

    opts = parse_options(
        "inflate",
        {
            "splats": 2000,
            "resolution": 48,
            "texture": 256,
            "formats": ["glb", "ply", "usdz", "splats_glb"],
            "mesh": {"target_faces": 3000, "compression": "meshopt"},
        },
    )
    out = tmp_path_factory.mktemp("textured")
    artifacts = generate_assets(
        sample_image, sample_masks[:2], InflateBackend(), options=opts, job_id="t"
    )
    for path, data in artifacts.files.items():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(data)
    return out, artifacts.manifest


def test_every_mesh_file_carries_the_texture(textured):
    import zipfile

    from readers import Glb, validate_gltf

    out, manifest = textured
    assert manifest["options"]["texture"] == 256
    for obj in manifest["objects"]:
        assert obj["texture"]["size"] == 256 and obj["texture"]["bytes"] > 0
        assert obj["texture"]["from"] == "photo"
    glbs = [out / "scene.glb", out / "objects/0.glb"]
    # The validator predates KHR_gaussian_splatting (tests/test_formats.py): not for .splats.glb.
    reports = validate_gltf(*glbs)
    for path in glbs:
        report = reports[str(path)]
        assert report["numErrors"] == 0, (path, report["messages"])
    for path in [*glbs, out / "scene.splats.glb", out / "objects/0.splats.glb"]:
        doc = Glb(path.read_bytes()).doc
        assert doc["images"] and doc["textures"], path
        prims = [p for m in doc["meshes"] for p in m["primitives"] if p.get("mode", 4) == 4]
        assert all("TEXCOORD_0" in p["attributes"] for p in prims), path
    from pxr import Usd, UsdShade

    for usdz, count in ((out / "objects/1.usdz", 1), (out / "scene.usdz", 2)):
        stage = Usd.Stage.Open(str(usdz))
        for i in range(count):
            shader = UsdShade.Shader(stage.GetPrimAtPath(f"/root/object_{i}/Material/BaseColor"))
            file = shader.GetInput("file").Get()
            assert file.resolvedPath.startswith(f"{usdz}["), file  # inside the package
        assert len([n for n in zipfile.ZipFile(usdz).namelist() if n.endswith(".png")]) == count


def test_the_texture_reads_the_photo_better_than_vertex_colours(sample_image, sample_masks):
    """Front surface points inside the mask: the texture's colour against the photo's pixel
    there, beside the vertex colours' (interpolated) error (bench/texture.py --held-out runs
    the same on the hand-masked photos)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    try:
        from texture import front_colour_errors
    finally:
        sys.path.pop(0)
    from worker.backends.inflate import inflate_object

    camera = Camera.from_fov(sample_image.shape[1], sample_image.shape[0], 60.0)
    for mask in sample_masks:
        result = inflate_object(sample_image, mask, camera, seed=0, resolution=96)
        baked = texture.bake(result.mesh, 1024, result.appearance)
        tex, vertex = front_colour_errors(sample_image, mask, camera, result, baked, 1024)
        assert tex <= 0.04 and tex <= vertex / 2, (tex, vertex)


def test_box_charts_unwrap_a_large_mesh_without_overlaps(monkeypatch):
    """Meshes over XATLAS_MAX_FACES get box charts: every texel read back at a vertex's UV
    gives that vertex's colour (charts overlapping would mix them), UVs inside the square."""
    import trimesh

    from worker.backends.base import Mesh

    sphere = trimesh.creation.icosphere(subdivisions=5)  # 20,480 faces
    bumps = 1 + 0.1 * np.sin(5 * sphere.vertices[:, :1])
    mesh = Mesh(
        (sphere.vertices * bumps * 0.5).astype(np.float32),
        sphere.faces.astype(np.int32),
        np.full((len(sphere.vertices), 4), 200, np.uint8),
    )
    monkeypatch.setattr(texture, "XATLAS_MAX_FACES", 1000)
    baked = texture.bake(mesh, 512, gradient)
    assert baked.uvs.min() >= 0 and baked.uvs.max() <= 1
    assert np.array_equal(baked.vertices, mesh.vertices[baked.source])
    got = texture.sample_image(baked.image, baked.uvs[:, 0] * 512, baked.uvs[:, 1] * 512)
    error = np.abs(got - gradient(baked.vertices, None))
    assert np.median(error) < 0.01 and np.percentile(error, 99) < 0.05


def test_a_mesh_baked_from_gaussians_takes_the_colours_they_carry():
    """The sam3d route (``gaussian_appearance``): Gaussians scattered over a sphere, each
    coloured by where it sits; the texture read back at every vertex gives that colour."""
    import trimesh

    from worker.backends.base import Gaussians, Mesh

    sphere = trimesh.creation.icosphere(subdivisions=4)
    mesh = Mesh(
        (sphere.vertices * 0.5).astype(np.float32),
        sphere.faces.astype(np.int32),
        np.full((len(sphere.vertices), 4), 200, np.uint8),
    )
    rng = np.random.default_rng(0)
    on_sphere = rng.normal(size=(60_000, 3))
    on_sphere = 0.5 * on_sphere / np.linalg.norm(on_sphere, axis=1, keepdims=True)
    gaussians = Gaussians(
        positions=on_sphere.astype(np.float32),
        rotations=np.tile(np.float32([1, 0, 0, 0]), (len(on_sphere), 1)),
        scales=np.full((len(on_sphere), 3), 0.01, np.float32),
        opacities=rng.uniform(0.2, 1.0, len(on_sphere)).astype(np.float32),
        colors=gradient(on_sphere, None).astype(np.float32),
    )
    baked = texture.bake(mesh, 512, texture.gaussian_appearance(gaussians))
    got = texture.sample_image(baked.image, baked.uvs[:, 0] * 512, baked.uvs[:, 1] * 512)
    error = np.abs(got - gradient(baked.vertices, None))
    assert np.median(error) < 0.01 and np.percentile(error, 99) < 0.03
    # Fewer Gaussians than neighbours asked for: every one of them counts.
    import dataclasses

    few = Gaussians(
        **{f.name: getattr(gaussians, f.name)[:3] for f in dataclasses.fields(gaussians)}
    )
    colours = texture.gaussian_appearance(few)(mesh.vertices[:5], mesh.vertices[:5])
    assert colours.shape == (5, 3) and np.isfinite(colours).all()


@pytest.mark.parametrize("shape", ["sphere", "scattered"])
def test_the_grid_finds_the_same_nearest_gaussians_as_a_k_d_tree(shape):
    """worker/assets/nearest.py (the GPU worker's route, run here on torch's CPU device)
    against scipy's k-d tree: the same k nearest, in order, for queries on the set, off it,
    and far outside it (the ones the grid asks again, coarser)."""
    from scipy.spatial import cKDTree

    from worker.assets.nearest import nearest

    rng = np.random.default_rng(1)
    if shape == "sphere":  # a surface, as SAM 3D's Gaussians are
        points = rng.normal(size=(10_000, 3))
        points /= np.linalg.norm(points, axis=1, keepdims=True)
    else:  # clusters of very different density
        points = np.concatenate([rng.normal(0, 0.01, (5_000, 3)), rng.uniform(-1, 1, (300, 3))])
    queries = np.concatenate(
        [points[:2000] + rng.normal(0, 0.02, (2000, 3)), rng.uniform(-3, 3, (100, 3))]
    )
    dist, idx = nearest(points, queries, 8, "cpu", budget=1 << 20)
    want_dist, want_idx = cKDTree(points).query(queries, k=8)
    assert np.allclose(dist, want_dist, atol=1e-5)
    assert (idx == want_idx).mean() > 0.999  # (ties may order differently)
    one_dist, _ = nearest(points[:5], queries, 5, "cpu")  # k = every point
    assert np.allclose(one_dist, cKDTree(points[:5]).query(queries, k=5)[0], atol=1e-5)
    with pytest.raises(ValueError):
        nearest(points[:5], queries, 6, "cpu")


def test_the_gpu_worker_s_route_bakes_the_same_texture_as_the_k_d_tree(mesh):
    from worker.backends.base import Gaussians

    rng = np.random.default_rng(2)
    picks = rng.integers(0, len(mesh.vertices), 30_000)
    positions = (mesh.vertices[picks] + rng.normal(0, 0.003, (30_000, 3))).astype(np.float32)
    gaussians = Gaussians(
        positions=positions,
        rotations=np.tile(np.float32([1, 0, 0, 0]), (30_000, 1)),
        scales=np.full((30_000, 3), 0.005, np.float32),
        opacities=rng.uniform(0.2, 1.0, 30_000).astype(np.float32),
        colors=rng.uniform(0, 1, (30_000, 3)).astype(np.float32),
    )
    tree = texture.bake(mesh, 256, texture.gaussian_appearance(gaussians))
    grid = texture.bake(mesh, 256, texture.gaussian_appearance(gaussians, device="cpu"))
    differ = np.abs(tree.image.astype(int) - grid.image.astype(int))
    assert differ.max() <= 1, differ.max()  # float rounding only


def test_a_card_that_fails_leaves_the_k_d_tree_and_says_so(caplog):
    """The card's route failing (here: a CUDA device asked of a CPU-only torch; on a worker,
    out of memory) bakes through the k-d tree, with a warning and the source saying so."""
    import torch

    from worker.backends.base import Gaussians

    if torch.cuda.is_available():
        pytest.skip("needs a torch without CUDA to make the card fail")
    rng = np.random.default_rng(3)
    gaussians = Gaussians(
        positions=rng.normal(size=(500, 3)).astype(np.float32),
        rotations=np.tile(np.float32([1, 0, 0, 0]), (500, 1)),
        scales=np.full((500, 3), 0.05, np.float32),
        opacities=np.full(500, 0.5, np.float32),
        colors=rng.uniform(0, 1, (500, 3)).astype(np.float32),
    )
    points = rng.normal(size=(200, 3))
    on_card = texture.gaussian_appearance(gaussians, device="cuda:0")
    assert on_card.source == "gaussians, nearest by grid on cuda:0"
    with caplog.at_level("WARNING", logger="sam3d.worker"):
        got = on_card(points, points)
    assert "k-d tree" in caplog.text
    assert on_card.source == "gaussians, nearest by k-d tree (the grid on cuda:0 failed)"
    assert np.allclose(got, texture.gaussian_appearance(gaussians)(points, points), atol=1e-6)


def test_a_set_too_clustered_for_the_grid_is_refused_and_baked_by_the_tree():
    """Most Gaussians on one spot (a grid cell would hold them all for every query): the
    grid refuses the set rather than read it whole per query; the appearance then uses the
    k-d tree and says so."""
    from worker.assets.nearest import Clustered, nearest
    from worker.backends.base import Gaussians

    rng = np.random.default_rng(4)
    points = np.concatenate([np.zeros((30_000, 3)), rng.uniform(-1, 1, (50, 3))])
    queries = rng.uniform(-1, 1, (5000, 3))
    with pytest.raises(Clustered):
        nearest(points, queries, 8, "cpu")
    gaussians = Gaussians(
        positions=points.astype(np.float32),
        rotations=np.tile(np.float32([1, 0, 0, 0]), (len(points), 1)),
        scales=np.full((len(points), 3), 0.05, np.float32),
        opacities=np.full(len(points), 0.5, np.float32),
        colors=rng.uniform(0, 1, (len(points), 3)).astype(np.float32),
    )
    appearance = texture.gaussian_appearance(gaussians, device="cpu")
    got = appearance(queries, queries)
    assert appearance.source == "gaussians, nearest by k-d tree (the grid on cpu failed)"
    assert np.allclose(got, texture.gaussian_appearance(gaussians)(queries, queries), atol=1e-6)
