"""``inflate``: the embedded CPU generator. Silhouette inflation (Teddy; Monster Mash).

Each mask is sampled on a grid, its distance transform turned into a height with round
cross-sections (a disc becomes a sphere), mirrored front and back, and the closed surface
extracted with marching cubes, smoothed, and coloured from the image. Gaussians are sampled on
that surface, flattened along it. The object is posed against a pinhole camera so that its
silhouette at the nominal depth lands exactly on the mask. With a metric depth map the depth
comes from it instead: the object's visible surface meets the measured depths under its mask
(in the median). No weights, deterministic per seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import trimesh
from PIL import Image
from scipy import ndimage
from skimage.measure import marching_cubes

from jobs.depth import DepthInput
from jobs.errors import ErrorCode, Sam3dError
from jobs.frames import Camera, matrix_to_quat, pose_from_matrix
from worker.assets.texture import photo_appearance
from worker.backends.base import Gaussians, Mesh, ObjectResult

VERSION = "1.0"
_PAD_CELLS = 3
_OPACITY = 0.9
_NORMAL_FLATTEN = 0.15  # thickness of a splat relative to its in-plane size


class InflateBackend:
    """The embedded default backend (CPU, no weights)."""

    name = "inflate"
    version = VERSION

    def setup(self) -> None:
        """Nothing to load."""

    def camera(self, image: np.ndarray, options: Mapping[str, Any]) -> Camera:
        height, width = image.shape[:2]
        return Camera.from_fov(width, height, float(options["fov_deg"]))

    def generate(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        *,
        camera: Camera,
        seed: int,
        options: Mapping[str, Any],
        depth: DepthInput | None = None,
    ) -> ObjectResult:
        return inflate_object(
            image,
            mask,
            camera,
            seed=seed,
            resolution=int(options["resolution"]),
            splats=int(options["splats"]),
            depth=float(options["depth"]),
            depth_map=depth.z() if depth is not None else None,
        )


def inflate_object(
    image: np.ndarray,
    mask: np.ndarray,
    camera: Camera,
    *,
    seed: int,
    resolution: int = 96,
    splats: int = 20_000,
    depth: float = 3.0,
    depth_map: np.ndarray | None = None,
) -> ObjectResult:
    """Inflate one masked object into a posed, coloured, watertight mesh and its Gaussians.

    ``depth`` is the distance of the object's centre from the camera; a ``depth_map`` ((H, W)
    metres along the optical axis, NaN where unknown) replaces it with a measured one."""
    grid = _sample_grid(image, mask, resolution)
    vertices_px, faces = _inflated_surface(grid)
    mesh = trimesh.Trimesh(vertices_px, faces, process=False)
    trimesh.smoothing.filter_taubin(mesh, lamb=0.5, nu=-0.53, iterations=6)
    vertices_px = np.asarray(mesh.vertices)
    colors = _lookup_colors(grid, vertices_px)

    lo, hi = vertices_px.min(0), vertices_px.max(0)
    centre = (lo + hi) / 2
    extent = float((hi - lo).max())
    # Pixel space (u right, v down, z towards the camera) -> local glTF axes in the unit cube.
    local = (vertices_px - centre) / extent * np.array([1.0, -1.0, 1.0])
    mesh_local = trimesh.Trimesh(local, mesh.faces, process=False)
    if mesh_local.volume < 0:  # winding from marching cubes: make the normals point outward
        mesh_local.invert()

    if depth_map is not None:
        depth = _measured_depth(vertices_px, mask, depth_map, camera.fx)
    # At the nominal depth one pixel spans depth/f scene units; the silhouette then projects
    # back exactly onto the mask.
    unit = depth / camera.fx
    matrix = np.eye(4)
    matrix[:3, :3] *= extent * unit
    matrix[:3, 3] = [
        (centre[0] - camera.cx) * unit,
        -(centre[1] - camera.cy) * depth / camera.fy,
        -depth + centre[2] * unit,
    ]
    rng = np.random.default_rng(seed)
    gaussians = _surface_gaussians(mesh_local, colors, splats, rng)
    return ObjectResult(
        mesh=Mesh(
            vertices=local.astype(np.float32),
            faces=np.asarray(mesh_local.faces, dtype=np.int32),
            colors=np.concatenate([colors, np.full((len(colors), 1), 255, np.uint8)], 1),
        ),
        gaussians=gaussians,
        pose=pose_from_matrix(matrix),
        appearance=photo_appearance(image, mask, camera.project, matrix),
    )


def _measured_depth(
    vertices_px: np.ndarray, mask: np.ndarray, depth_map: np.ndarray, fx: float
) -> float:
    """The centre distance D at which the front surface meets the depth map, in the median.

    A front vertex at pixel (u, v), ``h`` pixels in front of the centre plane, lies at depth
    D * (1 - h / fx) (one pixel spans D / fx), so each vertex over a reading d votes for
    D = d / (1 - h / fx); the median vote is robust to mask edges that bleed onto background.
    """
    height, width = depth_map.shape
    front = vertices_px[:, 2] > 0
    u = np.clip(vertices_px[front, 0].astype(int), 0, width - 1)
    v = np.clip(vertices_px[front, 1].astype(int), 0, height - 1)
    d = depth_map[v, u]
    ok = np.isfinite(d) & mask[v, u]
    shrink = 1.0 - vertices_px[front, 2] / fx
    ok &= shrink > 0.05  # a surface nearer than the camera cannot be measured
    if ok.any():
        return float(np.median(d[ok] / shrink[ok]))
    under = depth_map[mask & np.isfinite(depth_map)]
    if under.size == 0:  # checked at submit; a direct caller may still get here
        raise Sam3dError(ErrorCode.INVALID_DEPTH, "no depth readings under the mask")
    return float(np.median(under))


class _Grid:
    """A mask and its image colours resampled on a square grid around the mask."""

    def __init__(self, coverage, colors, origin, cell):
        self.coverage = coverage  # (ny, nx) float fraction of each cell inside the mask
        self.colors = colors  # (ny, nx, 3) uint8, mask-weighted mean colour, filled outward
        self.origin = origin  # pixel coordinates (u, v) of the grid's top-left corner
        self.cell = cell  # pixels per cell


def _sample_grid(image: np.ndarray, mask: np.ndarray, resolution: int) -> _Grid:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        raise Sam3dError(ErrorCode.EMPTY_MASK, "mask has no pixels")
    x0, x1, y0, y1 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
    width, height = x1 - x0, y1 - y0
    cell = max(width, height) / resolution
    nx = int(np.ceil(width / cell)) + 2 * _PAD_CELLS
    ny = int(np.ceil(height / cell)) + 2 * _PAD_CELLS
    u0, v0 = x0 + width / 2 - nx * cell / 2, y0 + height / 2 - ny * cell / 2

    # Crop with a margin (zero outside the image) so the resampling box stays inside it.
    cx0, cy0 = int(np.floor(u0)) - 1, int(np.floor(v0)) - 1
    cx1, cy1 = int(np.ceil(u0 + nx * cell)) + 1, int(np.ceil(v0 + ny * cell)) + 1
    crop = np.zeros((cy1 - cy0, cx1 - cx0), np.float32)
    pixels = np.zeros((cy1 - cy0, cx1 - cx0, 3), np.float32)
    sy0, sx0 = max(cy0, 0), max(cx0, 0)
    sy1, sx1 = min(cy1, mask.shape[0]), min(cx1, mask.shape[1])
    crop[sy0 - cy0 : sy1 - cy0, sx0 - cx0 : sx1 - cx0] = mask[sy0:sy1, sx0:sx1]
    pixels[sy0 - cy0 : sy1 - cy0, sx0 - cx0 : sx1 - cx0] = image[sy0:sy1, sx0:sx1]
    box = (u0 - cx0, v0 - cy0, u0 - cx0 + nx * cell, v0 - cy0 + ny * cell)

    def resample(channel: np.ndarray) -> np.ndarray:
        img = Image.fromarray(channel, mode="F")
        return np.asarray(img.resize((nx, ny), Image.Resampling.BOX, box=box), np.float32)

    coverage = resample(crop)
    weighted = np.stack([resample(pixels[..., c] * crop) for c in range(3)], -1)
    known = coverage > 1e-3
    colors = np.zeros((ny, nx, 3), np.float32)
    colors[known] = weighted[known] / coverage[known, None]
    # Fill every cell with the colour of the nearest cell that saw the mask, so surface points
    # that fall just outside the silhouette never pick up the background.
    _, (iy, ix) = ndimage.distance_transform_edt(~known, return_indices=True)
    colors = colors[iy, ix]
    return _Grid(coverage, np.clip(np.rint(colors), 0, 255).astype(np.uint8), (u0, v0), cell)


def _inflated_surface(grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Closed surface of the inflated silhouette, vertices in pixel space (u, v, z)."""
    inside = grid.coverage >= 0.5
    if not inside.any():  # a mask thinner than half a cell: keep the cells it touches most
        inside = grid.coverage >= grid.coverage.max() * 0.5
    signed = np.where(
        inside,
        ndimage.distance_transform_edt(inside) - 0.5,
        -(ndimage.distance_transform_edt(~inside) - 0.5),
    )
    dmax = float(signed.max())
    # Round cross-sections: at distance d from the rim of a disc of radius R the sphere's
    # height is sqrt(d (2R - d)).
    height = np.sqrt(np.clip(signed, 0, None) * np.clip(2 * dmax - signed, 0, None))
    top = np.where(signed > 0, height, signed)
    nz = 2 * (int(np.ceil(dmax)) + _PAD_CELLS) + 1
    z = np.arange(nz, dtype=np.float32) - (nz - 1) / 2
    field = top[None, :, :] - np.abs(z)[:, None, None]
    verts, faces, _, _ = marching_cubes(field, level=0.0)
    # verts are (z, y, x) grid indices; cell centres sit at half-cell offsets in pixels.
    u = grid.origin[0] + (verts[:, 2] + 0.5) * grid.cell
    v = grid.origin[1] + (verts[:, 1] + 0.5) * grid.cell
    zpx = (verts[:, 0] - (nz - 1) / 2) * grid.cell
    return np.stack([u, v, zpx], 1), faces


def _lookup_colors(grid: _Grid, vertices_px: np.ndarray) -> np.ndarray:
    """Front and back take the colour of the image under them."""
    ix = np.floor((vertices_px[:, 0] - grid.origin[0]) / grid.cell).astype(int)
    iy = np.floor((vertices_px[:, 1] - grid.origin[1]) / grid.cell).astype(int)
    ny, nx = grid.coverage.shape
    return grid.colors[np.clip(iy, 0, ny - 1), np.clip(ix, 0, nx - 1)]


def _surface_gaussians(
    mesh: trimesh.Trimesh, vertex_colors: np.ndarray, count: int, rng: np.random.Generator
) -> Gaussians:
    """``count`` flat Gaussians on the surface, area-uniform, coloured like the mesh."""
    areas = mesh.area_faces
    cumulative = np.cumsum(areas)
    face = np.searchsorted(cumulative, rng.random(count) * cumulative[-1], side="right")
    face = np.minimum(face, len(areas) - 1)
    r1, r2 = np.sqrt(rng.random(count)), rng.random(count)
    bary = np.stack([1 - r1, r1 * (1 - r2), r1 * r2], 1)
    corners = mesh.faces[face]
    positions = np.einsum("nk,nkd->nd", bary, mesh.vertices[corners])
    colors = np.einsum("nk,nkd->nd", bary, vertex_colors[corners].astype(np.float64)) / 255.0

    normals = mesh.face_normals[face]
    helper = np.where(np.abs(normals[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    t1 = np.cross(normals, helper)
    t1 /= np.linalg.norm(t1, axis=1, keepdims=True)
    t2 = np.cross(normals, t1)
    rotations = matrix_to_quat(np.stack([t1, t2, normals], axis=2))  # columns: t1, t2, n

    size = np.sqrt(cumulative[-1] / count)
    scales = np.tile([size, size, size * _NORMAL_FLATTEN], (count, 1))
    return Gaussians(
        positions=positions.astype(np.float32),
        rotations=rotations.astype(np.float32),
        scales=scales.astype(np.float32),
        opacities=np.full(count, _OPACITY, np.float32),
        colors=colors.astype(np.float32),
    )
