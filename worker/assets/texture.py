"""UV-textured meshes: a mesh unwrapped (xatlas, MIT) and its base colour baked into a square
sRGB texture from an *appearance*, a function of surface points and normals in the object's
local frame (the photo for ``inflate``, the object's own Gaussians for ``sam3d``).

Steps, each a plain array operation:

1. **Unwrap**: small meshes with xatlas, its charts bounded in area (unbounded charts took
   12 s for an 86k-face inflate object here; at 0.5 % of the surface each, 2 s); larger ones
   (SAM 3D's) with box charts (``box_unwrap``: 0.3 s for 200k faces, against xatlas's 16 s).
   Charts are packed with ``PADDING`` texels between them. Vertices on chart seams are split
   (``TexturedMesh.source`` maps each new vertex to the original).
2. **Rasterise** every triangle in UV space (whole-array scanlines): each covered texel's
   triangle and barycentric weights, so every texel knows its surface point and
   (interpolated) normal.
3. **Colour** the texels through the appearance, in one call.
4. **Gutters**: every texel no triangle covers takes its nearest covered texel's colour
   (a distance transform over the whole atlas), so mip-mapping and bilinear filtering never
   mix in a background colour at chart borders, at any level.
5. The atlas (xatlas's size is close to, not exactly, the asked one) is resampled to the asked
   square edge.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from worker.backends.base import Mesh

log = logging.getLogger("sam3d.worker")

# (points (N, 3), normals (N, 3)) in the object's local frame -> sRGB colours (N, 3) in [0, 1]
Appearance = Callable[[np.ndarray, np.ndarray], np.ndarray]

PADDING = 4  # texels between charts; the gutters fill them
XATLAS_MAX_FACES = 50_000  # above: box charts (xatlas took 15.7 s for 200k faces on one core)
MAX_CHART_AREA = 0.005  # of the mesh's surface: bounds xatlas's chart growing (its cost)


@dataclass(frozen=True)
class TexturedMesh:
    """A mesh with UVs and its base-colour texture (glTF conventions: UV (0, 0) is the
    image's top-left corner)."""

    vertices: np.ndarray  # (V, 3) float32, seams split
    faces: np.ndarray  # (F, 3) int32
    uvs: np.ndarray  # (V, 2) float32 in [0, 1]
    normals: np.ndarray  # (V, 3) float32: the original mesh's (smooth across chart seams)
    image: np.ndarray  # (S, S, 3) uint8 sRGB
    source: np.ndarray  # (V,) int: the original mesh's vertex each vertex came from


def unwrap(vertices: np.ndarray, faces: np.ndarray, size: int) -> tuple[np.ndarray, ...]:
    """(source vertex per new vertex, new faces, UVs in [0, 1], atlas width, atlas height):
    xatlas up to ``XATLAS_MAX_FACES`` faces, box charts above (``box_unwrap``)."""
    if len(faces) > XATLAS_MAX_FACES:
        return box_unwrap(vertices, faces, size)
    return xatlas_unwrap(vertices, faces, size)


def xatlas_unwrap(vertices: np.ndarray, faces: np.ndarray, size: int) -> tuple[np.ndarray, ...]:
    """xatlas's charts (bounded in area: its cost) and packing."""
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(vertices, np.float32), np.ascontiguousarray(faces))
    charts = xatlas.ChartOptions()
    charts.max_chart_area = MAX_CHART_AREA * _area(vertices, faces)
    pack = xatlas.PackOptions()
    pack.resolution = size
    pack.padding = PADDING
    pack.bilinear = True
    atlas.generate(charts, pack)
    source, new_faces, uvs = atlas[0]
    return source, new_faces.astype(np.int32), uvs.astype(np.float32), atlas.width, atlas.height


def box_unwrap(vertices: np.ndarray, faces: np.ndarray, size: int) -> tuple[np.ndarray, ...]:
    """Box charts, in linear time: faces grouped by the axis direction their normal is
    closest to (six groups), each group's edge-connected pieces a chart, each chart projected
    onto the plane across its axis (so no face is foreshortened by more than 1/sqrt(3)), the
    charts' boxes packed in shelves with ``PADDING`` texels around each, the scale lowered
    until they fit the square. For large meshes (SAM 3D's), where xatlas takes seconds."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    v = np.asarray(vertices, np.float64)
    faces = np.asarray(faces, np.int64)
    corners = v[faces]
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    axis = np.abs(normals).argmax(axis=1)
    group = axis * 2 + (normals[np.arange(len(faces)), axis] < 0)
    # Faces of one group sharing an edge are one chart.
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), 1)
    owner = np.tile(np.arange(len(faces)), 3)
    order = np.argsort(edges[:, 0] * (len(v) + 1) + edges[:, 1], kind="stable")
    e, o = edges[order], owner[order]
    join = (e[1:] == e[:-1]).all(axis=1) & (group[o[1:]] == group[o[:-1]])
    pairs = sparse.coo_matrix(
        (np.ones(int(join.sum())), (o[:-1][join], o[1:][join])), shape=(len(faces),) * 2
    )
    count, chart = connected_components(pairs, directed=False)
    chart_axis = np.zeros(count, np.int64)
    chart_axis[chart] = axis
    # A vertex on a chart border becomes one vertex per chart.
    ids, inverse = np.unique(np.repeat(chart, 3) * len(v) + faces.reshape(-1), return_inverse=True)
    source, vchart = ids % len(v), ids // len(v)
    rows = np.arange(len(ids))
    a = chart_axis[vchart]
    plane = np.stack([v[source][rows, (a + 1) % 3], v[source][rows, (a + 2) % 3]], axis=1)
    lo = np.full((count, 2), np.inf)
    hi = np.full((count, 2), -np.inf)
    np.minimum.at(lo, vchart, plane)
    np.maximum.at(hi, vchart, plane)
    extent = hi - lo
    area = float(np.linalg.norm(normals, axis=1).sum() / 2)
    scale = np.sqrt(0.6 * size * size / max(area, 1e-12))  # texels per unit: ~60 % filled
    while True:
        boxes = np.ceil(extent * scale) + 2 * PADDING
        offsets = _shelves(boxes, size)
        if offsets is not None:
            break
        scale *= 0.9
    uvs = (offsets[vchart] + PADDING + (plane - lo[vchart]) * scale) / size
    new_faces = inverse.reshape(-1, 3).astype(np.int32)
    return source, new_faces, uvs.astype(np.float32), size, size


def _shelves(boxes: np.ndarray, size: int) -> np.ndarray | None:
    """Each box's corner when packed into a ``size`` square in shelves (tallest first), or
    None when they do not fit."""
    if len(boxes) and boxes[:, 0].max() > size:
        return None
    offsets = np.zeros_like(boxes)
    x = y = shelf = 0.0
    for c in np.argsort(-boxes[:, 1], kind="stable"):
        w, h = boxes[c]
        if x + w > size:
            x, y, shelf = 0.0, y + shelf, 0.0
        offsets[c] = (x, y)
        x += w
        shelf = max(shelf, h)
    return offsets if y + shelf <= size else None


def _area(vertices: np.ndarray, faces: np.ndarray) -> float:
    v = vertices[faces]
    return float(np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=1).sum() / 2)


def rasterize(
    uvs: np.ndarray, faces: np.ndarray, width: int, height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Texels of the UV triangles: (rows, columns, triangle, barycentric weights (N, 3)).

    A texel belongs to a triangle when its centre (texel centres on integer coordinates) lies
    inside or on it: each triangle's rows of texel centres, each row's span between the
    edges it crosses, all as whole-array steps (no Python loop over the triangles: a loop of
    200k OpenCV fills took 0.4 s alone and 3-6 s beside a thread that holds the GIL, as the
    GPU worker's does; this takes 0.25 s and 1.1 s). A texel on an edge two triangles share
    goes to one of them; a triangle too thin to hold a texel centre gets none (the texels
    around it, and the gutters, carry its surface). Barycentric weights are computed at each
    texel's centre, clipped to the triangle."""
    corners = uvs[faces].astype(np.float64) * (width, height) - 0.5
    ys = corners[..., 1]
    top = np.maximum(np.ceil(ys.min(axis=1)), 0).astype(np.int64)
    bottom = np.minimum(np.floor(ys.max(axis=1)), height - 1).astype(np.int64)
    tri, y = _runs(np.arange(len(faces)), top, bottom)
    row_y = y.astype(np.float64)
    left = np.full(len(tri), np.inf)
    right = np.full(len(tri), -np.inf)
    c = corners[tri]
    for i, j in ((0, 1), (1, 2), (2, 0)):  # where each edge crosses the row
        (x0, y0), (x1, y1) = c[:, i].T, c[:, j].T
        crosses = (row_y >= np.minimum(y0, y1)) & (row_y <= np.maximum(y0, y1))
        flat = np.abs(y1 - y0) < 1e-12  # along the row: its two ends
        t = np.where(flat, 0.0, (row_y - y0) / np.where(flat, 1.0, y1 - y0))
        x = x0 + t * (x1 - x0)
        low, high = np.where(flat, np.minimum(x0, x1), x), np.where(flat, np.maximum(x0, x1), x)
        left = np.where(crosses, np.minimum(left, low), left)
        right = np.where(crosses, np.maximum(right, high), right)
    first = np.maximum(np.ceil(left - 1e-9), 0).astype(np.int64)
    last = np.minimum(np.floor(right + 1e-9), width - 1).astype(np.int64)
    span, cols = _runs(np.arange(len(tri)), first, last)
    rows, face = y[span], tri[span]
    owner = np.full(height * width, -1, np.int64)
    owner[rows * width + cols] = np.arange(len(face))  # each covered texel once
    keep = owner[owner >= 0]
    rows, cols, face = rows[keep], cols[keep], face[keep]
    a, b, c = corners[face, 0], corners[face, 1], corners[face, 2]
    v0, v1 = b - a, c - a
    px, py = cols - a[:, 0], rows - a[:, 1]
    det = v0[:, 0] * v1[:, 1] - v0[:, 1] * v1[:, 0]
    det = np.where(np.abs(det) > 1e-12, det, 1e-12)
    w1 = (px * v1[:, 1] - py * v1[:, 0]) / det
    w2 = (v0[:, 0] * py - v0[:, 1] * px) / det
    bary = np.clip(np.stack([1.0 - w1 - w2, w1, w2], axis=1), 0.0, 1.0)
    bary /= np.maximum(bary.sum(axis=1, keepdims=True), 1e-12)
    return rows, cols, face, bary


def _runs(owners: np.ndarray, first: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every integer from ``first[i]`` to ``last[i]`` (none where last < first), with its
    ``owners[i]``: (owner, value) per integer."""
    count = np.maximum(last - first + 1, 0)
    owner = np.repeat(owners, count)
    offset = np.arange(len(owner)) - np.repeat(np.cumsum(count) - count, count)
    return owner, offset + np.repeat(first, count)


def bake(mesh: Mesh, size: int, appearance: Appearance) -> TexturedMesh:
    """``mesh`` unwrapped and its base colour (``appearance``) baked into a ``size`` texture."""
    from scipy import ndimage

    from worker.assets.glb import vertex_normals

    source, faces, uvs, width, height = unwrap(mesh.vertices, mesh.faces, size)
    vertices = np.ascontiguousarray(mesh.vertices[source], np.float32)
    normals = np.ascontiguousarray(vertex_normals(mesh.vertices, mesh.faces)[source], np.float32)
    rows, cols, tri, bary = rasterize(uvs, faces, width, height)
    corners = faces[tri]
    points = np.einsum("nk,nkj->nj", bary, vertices[corners])
    texel_normals = np.einsum("nk,nkj->nj", bary, normals[corners])
    texel_normals /= np.maximum(np.linalg.norm(texel_normals, axis=1, keepdims=True), 1e-12)
    colors = np.clip(appearance(points, texel_normals), 0.0, 1.0)
    atlas = np.zeros((height, width, 3), np.float32)
    covered = np.zeros((height, width), bool)
    atlas[rows, cols] = colors
    covered[rows, cols] = True
    if covered.any() and not covered.all():  # gutters: the nearest covered texel's colour
        _, (near_r, near_c) = ndimage.distance_transform_edt(~covered, return_indices=True)
        atlas = atlas[near_r, near_c]
    image = _resample(atlas, size)
    return TexturedMesh(vertices, faces, uvs, normals, image, source)


def _resample(atlas: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray(np.round(atlas * 255).astype(np.uint8))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image)


def sample_image(image: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear samples of an (H, W, 3) uint8 image at pixel coordinates (centres at .5),
    clamped to its edges; colours in [0, 1]."""
    height, width = image.shape[:2]
    x = np.clip(u - 0.5, 0, width - 1)
    y = np.clip(v - 0.5, 0, height - 1)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    img = image.astype(np.float32) / 255.0
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def photo_appearance(
    image: np.ndarray, mask: np.ndarray, project: Callable[[np.ndarray], np.ndarray], matrix
) -> Appearance:
    """The photo as an appearance: a surface point takes the colour of the pixel it projects
    to (``project``: camera-frame points -> pixels; ``matrix``: the object's pose, local ->
    camera frame). Only the object's own pixels are used: outside the mask a pixel takes its
    nearest masked pixel's colour, so silhouettes never pick up the background. Where the
    surface faces away from the camera (its hidden side) the same projection reads a blurred
    copy: the hidden side gets the colours of the part in front of it, without copying its
    detail, and grazing regions do not stretch sharp edges across the surface. The images
    are prepared on the first call (only jobs that bake pay for them), from the object's box
    in the photo."""
    matrix = np.asarray(matrix, np.float64)
    linear = matrix[:3, :3]
    prepared: list = []

    def images() -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        if not prepared:
            prepared.append(_object_pixels(image, np.asarray(mask, bool)))
        return prepared[0]

    def appearance(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
        own, hidden, (top, left) = images()
        world = points @ linear.T + matrix[:3, 3]
        facing = np.einsum("ij,ij->i", normals @ np.linalg.inv(linear), -world) > 0
        uv = project(world) - (left, top)
        front = sample_image(own, uv[:, 0], uv[:, 1])
        back = sample_image(hidden, uv[:, 0], uv[:, 1])
        return np.where(facing[:, None], front, back)

    appearance.source = "photo"  # type: ignore[attr-defined]  # (the manifest says it)
    return appearance


def _object_pixels(image: np.ndarray, mask: np.ndarray):
    """(the object's pixels with the background replaced by the nearest object pixel, the
    same blurred, (top, left) of the box they cover): the mask's box with a margin."""
    from scipy import ndimage

    if not mask.any():
        return image[..., :3], image[..., :3], (0, 0)
    ys, xs = np.nonzero(mask)
    size = max(int(ys.max() - ys.min()), int(xs.max() - xs.min()), 1)
    margin = max(4, size // 8)
    top, left = max(0, int(ys.min()) - margin), max(0, int(xs.min()) - margin)
    bottom = min(mask.shape[0], int(ys.max()) + margin + 1)
    right = min(mask.shape[1], int(xs.max()) + margin + 1)
    box, pixels = mask[top:bottom, left:right], image[top:bottom, left:right, :3]
    _, (rows, cols) = ndimage.distance_transform_edt(~box, return_indices=True)
    own = np.ascontiguousarray(pixels[rows, cols])
    sigma = 0.03 * size
    hidden = ndimage.gaussian_filter(own.astype(np.float32), (sigma, sigma, 0))
    return own, np.clip(np.round(hidden), 0, 255).astype(np.uint8), (top, left)


def gaussian_appearance(gaussians, neighbours: int = 8, device: str | None = None) -> Appearance:
    """An object's Gaussians as its appearance (``GaussianAppearance``)."""
    return GaussianAppearance(gaussians, neighbours, device)


class GaussianAppearance:
    """An object's Gaussians as its appearance: each surface point takes the colours of the
    Gaussians nearest it, weighted by opacity and by each one's falloff at that distance
    (its mean scale as the spread). What SAM 3D's own Gaussians show is what the mesh gets.

    The nearest Gaussians come from a grid on ``device`` (a torch device: the GPU worker's
    card, ``worker/assets/nearest.py``), or without one from a k-d tree queried on every core
    (it runs without the GIL, beside the thread that holds the GPU); where the card fails
    (out of memory), the tree, with a warning, and ``source`` says so. Nothing is prepared
    until the first call: only objects that are baked pay for it."""

    def __init__(self, gaussians, neighbours: int = 8, device: str | None = None) -> None:
        self.positions = np.asarray(gaussians.positions, np.float32)
        self.colors = np.clip(np.asarray(gaussians.colors, np.float32), 0.0, 1.0)
        self.opacity = np.asarray(gaussians.opacities, np.float32)
        scales = np.asarray(gaussians.scales, np.float32)
        self.spread = np.maximum(scales.mean(axis=1), 1e-6)
        self.k = min(neighbours, len(self.positions))
        self.device = device
        self.route = f"grid on {device}" if device is not None else "k-d tree"
        self._tree = None

    @property
    def source(self) -> str:
        """How the colours were found (the manifest's ``texture.from``)."""
        return f"gaussians, nearest by {self.route}"

    def _nearest(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.route.startswith("grid"):
            from worker.assets.nearest import nearest as on_device

            try:
                return on_device(self.positions, points, self.k, self.device)
            except Exception as exc:  # noqa: BLE001 - out of memory on the card, a lost card
                log.warning(
                    "texture: the nearest Gaussians on %s failed (%s): k-d tree", self.device, exc
                )
                self.route = f"k-d tree (the grid on {self.device} failed)"
        if self._tree is None:
            from scipy.spatial import cKDTree

            self._tree = cKDTree(self.positions)
        dist, idx = self._tree.query(points, k=self.k, workers=-1)
        return dist.astype(np.float32).reshape(len(points), self.k), idx.reshape(
            len(points), self.k
        )

    def __call__(self, points: np.ndarray, normals: np.ndarray) -> np.ndarray:
        dist, idx = self._nearest(points)
        ratio = dist / np.maximum(self.spread[idx], dist[:, :1])
        weight = self.opacity[idx] * np.exp(-0.5 * ratio * ratio)
        np.maximum(weight, 1e-12, out=weight)
        total = np.einsum("nk,nkc->nc", weight, self.colors[idx])
        return total / weight.sum(axis=1, keepdims=True)
