"""Upstream's per-mask output in our conventions (docs/api.md, "Outputs and their frames"):

- upstream splats live in a Z-up object frame; ours in glTF's Y-up frame: positions map
  (x, y, z) -> (x, z, -y) and every orientation is pre-multiplied by that rotation;
- upstream's GLB is already Y-up (its exporter applies the same map), so the mesh is kept;
- the pose (rotation w,x,y,z, translation, scale) is kept exactly; ``Pose.matrix`` gives the
  local-to-scene matrix, and the scene splats are rotated by it (see worker/assets/scene.py);
- the camera is fitted to upstream's pointmap (``camera_from_pointmap``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from jobs.errors import ErrorCode, Sam3dError
from jobs.frames import Z_UP_TO_Y_UP, Camera, Pose, matrix_to_quat, quat_multiply
from worker.assets.texture import gaussian_appearance
from worker.backends.base import SH_C0, Gaussians, Mesh, ObjectResult

log = logging.getLogger("sam3d.worker")
NO_COLOUR = (200, 200, 200, 255)  # upstream's GLB has no colour with post-processing on
DEFAULT_FOV_DEG = 60.0  # the camera when the pointmap has no valid point (inflate's default)


# -- conversion --------------------------------------------------------------------------------

_Q_Z_UP_TO_Y_UP = matrix_to_quat(Z_UP_TO_Y_UP)
# q -> _Q_Z_UP_TO_Y_UP * q (the frame's rotation applied after the splat's) as a 4x4 matrix:
# column j is the product with the j-th unit quaternion.
_Q_LEFT = quat_multiply(_Q_Z_UP_TO_Y_UP, np.eye(4)).T


def _array(value: Any) -> np.ndarray:
    """A tensor (any device) or array as float64 numpy."""
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def host_copy(tensor, pinned: bool = True) -> np.ndarray:
    """``tensor`` on the host as numpy: from the GPU through a page-locked buffer of torch's
    caching host allocator (reused from object to object), on the calling thread's stream,
    complete when this returns. The array shares that buffer: it stays page-locked until the
    array is freed (the callers here keep it for one object's conversion). ``pinned``
    false: ``tensor.cpu()`` (``Tuning.pinned_copies``)."""
    import torch

    tensor = tensor.detach()
    if not (pinned and tensor.is_cuda):
        return tensor.cpu().numpy()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host.numpy()


def _linear(x, matrix: np.ndarray):
    """``x @ matrix.T`` for the rows of ``x`` (a tensor) as float32 products and sums over
    the matrix's nonzero entries: no matrix kernel, so no TF32 rounding on GPUs that allow it
    (the matrices here are a signed permutation, exact, and the frame's quaternion: two
    terms an entry, within an ulp of float64)."""
    import torch

    columns = []
    for row in matrix:
        terms = [x[:, j] * float(c) for j, c in enumerate(row) if c != 0]
        columns.append(sum(terms[1:], terms[0]) if terms else torch.zeros_like(x[:, 0]))
    return torch.stack(columns, dim=1)


def convert_gaussians(gs: Any, pinned: bool = True) -> Gaussians:
    """Upstream ``Gaussian`` (Z-up object frame, activated through its getters) -> ours (Y-up).

    Computed where upstream's tensors are (the GPU), then copied to the host as one block:
    the host-side part of a job's last objects is what its GPU waits behind."""
    import torch

    def tensor(value):
        value = value.detach() if hasattr(value, "detach") else torch.as_tensor(value)
        return value.float()

    xyz = tensor(gs.get_xyz)
    rotation = tensor(gs.get_rotation)  # normalised, w,x,y,z
    count = len(xyz)
    dc = tensor(gs._features_dc).reshape(count, -1)[:, :3]
    with torch.no_grad():
        packed = torch.cat(
            [
                _linear(xyz, Z_UP_TO_Y_UP),
                _linear(rotation, _Q_LEFT),
                tensor(gs.get_scaling).reshape(count, 3),
                tensor(gs.get_opacity).reshape(count, 1),
                dc * SH_C0 + 0.5,
            ],
            dim=1,
        )
        host = host_copy(packed, pinned)
    columns = np.split(host, [3, 7, 10, 11], axis=1)
    positions, rotations, scales, opacity, colors = (np.ascontiguousarray(c) for c in columns)
    return Gaussians(
        positions=positions,
        rotations=rotations,
        scales=scales,
        opacities=opacity.reshape(-1),
        colors=colors,
    )


def convert_mesh(glb: Any) -> Mesh:
    """Upstream's ``trimesh.Trimesh`` (already Y-up) -> our mesh with vertex colours."""
    if glb is None:
        raise Sam3dError(ErrorCode.BACKEND_FAILED, "SAM 3D returned no mesh")
    vertices = np.asarray(glb.vertices, dtype=np.float32)
    faces = np.asarray(glb.faces, dtype=np.int32)
    visual = getattr(glb, "visual", None)
    colors = None
    if visual is not None and getattr(visual, "kind", None) == "texture":
        visual = visual.to_color()  # baked texture sampled at the vertices
    if visual is not None and getattr(visual, "kind", None) == "vertex":
        colors = np.asarray(visual.vertex_colors, dtype=np.uint8)
    if colors is None or len(colors) != len(vertices):
        colors = np.tile(np.array(NO_COLOUR, np.uint8), (len(vertices), 1))
    return Mesh(vertices=vertices, faces=faces, colors=colors)


def convert_pose(output: Mapping[str, Any]) -> Pose:
    rotation = _array(output["rotation"]).reshape(4)
    rotation = rotation / np.linalg.norm(rotation)
    translation = _array(output["translation"]).reshape(3)
    scale = _array(output["scale"]).reshape(3)
    return Pose(
        tuple(map(float, rotation)), tuple(map(float, translation)), tuple(map(float, scale))
    )


def camera_from_pointmap(pointmap: Any, image_size: tuple[int, int]) -> Camera | None:
    """Pinhole intrinsics (pixels of the full image) fitted to upstream's pointmap, which is
    in PyTorch3D's camera frame (+X left, +Y up, +Z forward) and may be downsampled."""
    points = _array(pointmap)
    if points.ndim != 3 or points.shape[-1] != 3:
        return None
    height, width = image_size
    rows, cols = points.shape[:2]
    u = ((np.arange(cols) + 0.5) * width / cols)[None, :]  # pixel centres, full-image pixels
    v = ((np.arange(rows) + 0.5) * height / rows)[:, None]
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    ok = np.isfinite(points).all(-1) & (z > 1e-6)
    if ok.sum() < 16:
        return None
    # u = cx + fx * (-x / z),  v = cy - fy * (y / z)   (the manifest's OpenGL convention)
    a = -x[ok] / z[ok]
    b = y[ok] / z[ok]
    fits = (
        _line_fit(a, np.broadcast_to(u, ok.shape)[ok]),
        _line_fit(b, np.broadcast_to(v, ok.shape)[ok]),
    )
    if None in fits:
        return None  # every valid point on one line of sight: no focal length to fit
    (fx, cx), (neg_fy, cy) = fits
    return Camera(width, height, fx, -neg_fy, cx, cy)


def _line_fit(a: np.ndarray, b: np.ndarray) -> tuple[float, float] | None:
    """Least squares ``b ~ slope * a + intercept`` (``np.polyfit(a, b, 1)``, in closed form:
    about 10x faster on a megapixel pointmap). None where ``a`` does not vary."""
    mean_a, mean_b = a.mean(), b.mean()
    da = a - mean_a
    spread = float(np.dot(da, da))
    if not spread > 1e-12 * max(1.0, float(np.dot(a, a))):
        return None
    slope = float(np.dot(da, b - mean_b)) / spread
    return slope, float(mean_b - slope * mean_a)


def output_camera(output: Mapping[str, Any], image_size: tuple[int, int]) -> Camera:
    """The camera an upstream output's pose refers to: fitted to its pointmap."""
    pointmap = output.get("pointmap")
    camera = camera_from_pointmap(pointmap, image_size) if pointmap is not None else None
    if camera is None:
        # The depth model found no valid point (a blank photo; random weights): the pose
        # still refers to the camera frame, but nothing measured the intrinsics.
        log.warning("no valid pointmap: the manifest camera is the %g deg default", DEFAULT_FOV_DEG)
        camera = Camera.from_fov(image_size[1], image_size[0], DEFAULT_FOV_DEG)
    return camera


class ImageOutputs:
    """``convert_output`` for the objects of one image, whose outputs share one pointmap (the
    batched path's): its camera is fitted once, by the first object to need it."""

    def __init__(
        self, image_size: tuple[int, int], splats_per_voxel: int = 32, pinned: bool = True
    ) -> None:
        self.image_size, self.splats_per_voxel, self.pinned = image_size, splats_per_voxel, pinned
        self.lock = threading.Lock()
        self.fitted: tuple[Any, Camera] | None = None  # (pointmap, its camera)

    def __call__(self, output: Mapping[str, Any]) -> ObjectResult:
        pointmap = output.get("pointmap")
        with self.lock:  # the post threads convert side by side
            if self.fitted is None or self.fitted[0] is not pointmap:
                self.fitted = (pointmap, output_camera(output, self.image_size))
            camera = self.fitted[1]
        return convert_output(
            output,
            self.image_size,
            splats_per_voxel=self.splats_per_voxel,
            camera=camera,
            pinned=self.pinned,
        )


def convert_output(
    output: Mapping[str, Any],
    image_size: tuple[int, int],
    *,
    splats_per_voxel: int = 32,
    camera: Camera | None = None,
    pinned: bool = True,
) -> ObjectResult:
    """One upstream per-mask output dict -> our ObjectResult (frames converted exactly).
    ``camera``: the one ``output_camera`` gives, where the caller has it already."""
    key = "gs_4" if splats_per_voxel == 4 and output.get("gs_4") is not None else "gs"
    gs = output.get(key)
    if gs is None and output.get("gaussian"):
        gs = output["gaussian"][0]
    if gs is None:
        raise Sam3dError(ErrorCode.BACKEND_FAILED, "SAM 3D returned no Gaussians")
    if camera is None:
        camera = output_camera(output, image_size)
    gaussians = convert_gaussians(gs, pinned)
    device = getattr(getattr(gs, "get_xyz", None), "device", None)
    on_card = device is not None and getattr(device, "type", "") == "cuda"
    return ObjectResult(
        mesh=convert_mesh(output.get("glb")),
        gaussians=gaussians,
        pose=convert_pose(output),
        camera=camera,
        # A texture (option "texture") is baked from the Gaussians, their nearest found on
        # the card the model runs on (nothing is done unless a texture is asked for).
        appearance=gaussian_appearance(gaussians, device=str(device)) if on_card else None,
    )
