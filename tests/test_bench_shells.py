"""bench/gpu.py's realistic geometry for random weights: voxel shells and their surface.

``--shell-voxels`` puts each object's stage-1 voxels on a spherical shell; ``--shell-surface``
gives the mesh decoder the SDF of the sphere inside that shell, so FlexiCubes extracts one
closed surface of a real object's size. These run on the CPU with torch; the corner order is
upstream's (``utils_cube.cube_corners``, repeated here because upstream is not installed
where the tests run; bench/gpu.py reads upstream's own at run time).

Also bench/gpu.py's other helpers that run without the GPU: the profile's labels
(``flow_parts``), on stand-ins of upstream's layout.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from bench import gpu  # noqa: E402

CORNERS = torch.tensor(
    [[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1]]
)
STAGE1, MESH = 64, 256  # stage 1's grid; the mesh decoder's, 4x


def _crossed(sdf):
    """Which cubes the zero set passes through: corners of both signs."""
    return (sdf.min(dim=1).values < 0) & (sdf.max(dim=1).values > 0)


def _subdivided(voxels, factor: int):
    """Each stage-1 voxel as its factor^3 cubes of the finer grid (the decoder's upsampling)."""
    axis = torch.arange(factor)
    offsets = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    return (voxels[:, None, :] * factor + offsets[None]).reshape(-1, 3)


def test_the_shell_lies_around_its_radius():
    voxels = gpu.shell_coords(20_000, STAGE1)
    assert voxels.shape == (20_000, 3)
    assert len(torch.unique(voxels, dim=0)) == 20_000
    r = (voxels.float() - (STAGE1 - 1) / 2).norm(dim=1) / STAGE1
    assert abs(r.mean().item() - gpu.SHELL_RADIUS) < 0.01
    assert (r - gpu.SHELL_RADIUS).abs().max().item() < 3 / STAGE1  # a few voxels thick


def test_the_sdf_is_the_distance_to_the_sphere_at_each_corner():
    cubes = torch.tensor([[128, 128, 128], [0, 0, 0], [225, 128, 128]])
    sdf = gpu.shell_sdf(cubes, CORNERS, MESH)
    assert sdf.shape == (3, 8)
    # The centre cube's corner (128, 128, 128) is the grid's centre: -radius.
    assert sdf[0, 0].item() == pytest.approx(-gpu.SHELL_RADIUS)
    # Corner 7 is (+1, +1, +1) from the cube's origin.
    far = torch.tensor([1.0, 1.0, 1.0]) / MESH - 0.5
    assert sdf[1, 7].item() == pytest.approx(far.norm().item() - gpu.SHELL_RADIUS, abs=1e-6)
    # x = 225..226 of 256 straddles 0.38 from the centre (225/256 - 0.5 = 0.3789).
    assert sdf[2, 0].item() < 0 < sdf[2, 1].item()


def test_the_surface_is_closed_inside_the_shells_voxels():
    """Every cube the sphere crosses in the whole grid is one the decoder gets (a voxel of the
    shell, subdivided), so no cube the sphere leaves is open; their count is a sphere's area."""
    covered = _subdivided(gpu.shell_coords(20_000, STAGE1), MESH // STAGE1)
    crossed = _crossed(gpu.shell_sdf(covered, CORNERS, MESH))

    # The whole grid, by its corner points: a cube is crossed where its 8 corners differ.
    axis = torch.arange(MESH + 1, dtype=torch.float32) / MESH - 0.5
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    field = torch.sqrt(x**2 + y**2 + z**2) - gpu.SHELL_RADIUS
    views = [field[a : a + MESH, b : b + MESH, c : c + MESH] for a, b, c in CORNERS.tolist()]
    everywhere = _crossed(torch.stack(views).reshape(8, -1).T).sum().item()

    assert crossed.sum().item() == everywhere
    area = 4 * math.pi * (gpu.SHELL_RADIUS * MESH) ** 2  # in cube faces
    assert area < everywhere < 2 * area  # ~1.5x: a staircase of cubes crossing a sphere


def test_the_profile_labels_reach_inside_stage_2_and_the_mesh_tail():
    """bench/gpu.py's ``flow_parts`` on a stand-in of upstream's layout (names as upstream's
    SLatFlowModel and SLatMeshDecoder have them; the weights are not here)."""
    import types

    def block():
        return types.SimpleNamespace(self_attn=object(), cross_attn=object(), mlp=object())

    backbone = types.SimpleNamespace(
        input_blocks=[object(), object()], blocks=[block(), block()], out_blocks=[object()]
    )
    slat = types.SimpleNamespace(reverse_fn=types.SimpleNamespace(backbone=backbone))
    mesh = types.SimpleNamespace(upsample=[object(), object()])
    pipeline = types.SimpleNamespace(models={"slat_generator": slat, "slat_decoder_mesh": mesh})
    names = [name for name, _ in gpu.flow_parts(pipeline)]
    assert names.count("slat:input_blocks") == 2 and names.count("slat:out_blocks") == 1
    assert names.count("slat:block") == 2 and names.count("slat:self_attn") == 2
    assert names.count("slat:mlp") == 2 and names.count("mesh:upsample") == 2
    assert gpu.flow_parts(types.SimpleNamespace(models={})) == []
