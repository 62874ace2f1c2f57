"""Metric geometry for an image: a depth map or a pointmap, with the camera's intrinsics.

Inputs, checked at submit time (every failure is ``invalid_depth`` or ``invalid_intrinsics``):

- ``depth``: a 16-bit greyscale PNG in millimetres, or a float ``.npy`` (H, W) in metres;
  the distance along the optical axis (z), the convention of depth cameras and datasets.
- ``pointmap``: a float ``.npy`` (H, W, 3) in metres, in the OpenCV camera frame
  (+X right, +Y down, +Z forward), the convention of MoGe, Open3D and depth-camera SDKs.
- ``intrinsics``: ``{"fx", "fy", "cx", "cy"}`` in pixels (or ``[fx, fy, cx, cy]`` or a 3x3
  K), in the manifest's convention: pixel (i, j) covers [i, i+1) x [j, j+1), so the centre
  of pixel (i, j) is (i + 0.5, j + 0.5). Required with either input.

Both must have the upright image's size. 0 (depth) or z = 0 (pointmap) marks a pixel with no
reading, as depth cameras write it; NaN, infinities and negative values are refused, and so is
a map where some object has no reading under its mask.

``DepthInput.pointmap_pytorch3d`` gives SAM 3D's ``pointmap`` argument: (H, W, 3) in PyTorch3D's
camera frame (+X left, +Y up, +Z forward), NaN where there is no reading.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib import format as npformat
from PIL import Image

from jobs.errors import ErrorCode, Sam3dError
from jobs.frames import Camera

KINDS = ("depth", "pointmap")
_NPY_MAGIC = b"\x93NUMPY"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Fields of view a pinhole camera can have in practice (a 1 mm sensor behind a 1 m lens to a
# fisheye's 175): focal lengths outside give degenerate geometry, such as 1e308 overflowing.
FOV_RANGE_DEG = (0.05, 175.0)
# Finite but absurd distances (1e30 m) overflow float32 geometry downstream: refused at submit.
MAX_DISTANCE_M = 1e5
# OpenCV camera coordinates -> PyTorch3D camera coordinates: (x, y, z) -> (-x, -y, z).
OPENCV_TO_PYTORCH3D = np.array([-1.0, -1.0, 1.0], dtype=np.float32)


def _bad_depth(message: str) -> Sam3dError:
    return Sam3dError(ErrorCode.INVALID_DEPTH, message)


def _bad_intrinsics(message: str) -> Sam3dError:
    return Sam3dError(ErrorCode.INVALID_INTRINSICS, message)


def parse_intrinsics(value: Any, size: tuple[int, int]) -> Camera:
    """The pinhole camera of an (H, W) image from ``{"fx", "fy", "cx", "cy"}``,
    ``[fx, fy, cx, cy]`` or a 3x3 K matrix."""
    height, width = size
    if isinstance(value, Mapping):
        missing = [k for k in ("fx", "fy", "cx", "cy") if k not in value]
        if missing:
            raise _bad_intrinsics(f"intrinsics lack {', '.join(missing)}")
        unknown = sorted(set(value) - {"fx", "fy", "cx", "cy"})
        if unknown:
            raise _bad_intrinsics(f"unknown intrinsics field(s): {', '.join(unknown)}")
        numbers = [value["fx"], value["fy"], value["cx"], value["cy"]]
    elif isinstance(value, Sequence) and not isinstance(value, str | bytes):
        if len(value) == 3 and all(isinstance(r, Sequence) and len(r) == 3 for r in value):
            k = value
            numbers = [k[0][0], k[1][1], k[0][2], k[1][2]]
            rest = [k[0][1], k[1][0], k[2][0], k[2][1], k[2][2]]
            if not all(_is_number(v) for v in rest) or [float(v) for v in rest] != [0, 0, 0, 0, 1]:
                raise _bad_intrinsics("a 3x3 K must be [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]")
        elif len(value) == 4:
            numbers = list(value)
        else:
            raise _bad_intrinsics("intrinsics must be [fx, fy, cx, cy] or a 3x3 K matrix")
    else:
        raise _bad_intrinsics('intrinsics must be {"fx", "fy", "cx", "cy"} (pixels)')
    if not all(_is_number(v) for v in numbers):
        raise _bad_intrinsics("intrinsics must be numbers")
    fx, fy, cx, cy = (float(v) for v in numbers)
    if not all(np.isfinite([fx, fy, cx, cy])):
        raise _bad_intrinsics("intrinsics must be finite")
    if fx <= 0 or fy <= 0:
        raise _bad_intrinsics(f"fx and fy must be positive, got fx={fx:g}, fy={fy:g}")
    for name, focal, extent in (("fx", fx, width), ("fy", fy, height)):
        fov = math.degrees(2 * math.atan2(extent / 2, focal))
        if not FOV_RANGE_DEG[0] <= fov <= FOV_RANGE_DEG[1]:
            raise _bad_intrinsics(
                f"{name}={focal:g} gives a {fov:.3g} degree field of view over {extent} pixels; "
                f"between {FOV_RANGE_DEG[0]:g} and {FOV_RANGE_DEG[1]:g} degrees is accepted"
            )
    if not (-width <= cx <= 2 * width and -height <= cy <= 2 * height):
        raise _bad_intrinsics(
            f"principal point ({cx:g}, {cy:g}) is far outside the {width}x{height} image"
        )
    return Camera(int(width), int(height), fx, fy, cx, cy)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _load_npy(data: bytes, what: str, shapes: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """A float ``.npy`` of one of ``shapes`` (returned in the first), its header checked
    before any array is made: a header that declares more (or fewer) bytes than the file
    holds, or a shape other than the image's, is refused without allocating."""
    stream = io.BytesIO(data)
    try:
        version = npformat.read_magic(stream)
        read_header = {
            (1, 0): npformat.read_array_header_1_0,
            (2, 0): npformat.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy version {version}")
        declared, fortran_order, dtype = read_header(stream, max_header_size=10_000)
    except Exception as exc:  # numpy raises ValueError, SyntaxError, TypeError, ...
        raise _bad_depth(f"{what} is not a readable .npy file: {exc}") from None
    if dtype.hasobject or dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        raise _bad_depth(f"{what} .npy must hold floats (metres), not {dtype}")
    if tuple(declared) not in shapes:
        raise _bad_depth(
            f"{what} .npy has shape {tuple(declared)} but the (upright) image needs "
            f"{shapes[0]}; they must match pixel for pixel"
        )
    expected = math.prod(declared) * dtype.itemsize
    if len(data) - stream.tell() != expected:
        raise _bad_depth(
            f"{what} .npy declares {expected} bytes of data but holds {len(data) - stream.tell()}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=stream.tell())
    return arr.reshape(declared, order="F" if fortran_order else "C").reshape(shapes[0])


def decode_depth(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """A depth map for an (H, W) image as (H, W) float32 metres: a 16-bit PNG in millimetres
    or a float ``.npy``. Headers are checked against ``size`` before pixels are decoded."""
    if data.startswith(_PNG_MAGIC):
        try:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
                mode = im.mode
                if mode not in ("I;16", "I;16B", "I;16L", "I"):
                    raise _bad_depth(
                        f"a depth PNG must be 16-bit greyscale in millimetres, not mode {mode}"
                    )
                width, height = im.size
                if (height, width) != tuple(size):
                    raise _bad_depth(
                        f"depth is {height}x{width} but the (upright) image is "
                        f"{size[0]}x{size[1]}; they must match pixel for pixel"
                    )
                arr = np.asarray(im)
        except Sam3dError:
            raise
        except Exception as exc:  # a truncated or corrupt PNG
            raise _bad_depth(f"depth PNG cannot be read: {exc}") from None
        if arr.min() < 0:
            raise _bad_depth("depth PNG holds negative values")
        return arr.astype(np.float32) / 1000.0
    if data.startswith(_NPY_MAGIC):
        return _load_npy(data, "depth", (tuple(size), (*size, 1))).astype(np.float32)
    raise _bad_depth("depth must be a 16-bit PNG (millimetres) or a float .npy (metres)")


def decode_pointmap(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """A pointmap for an (H, W) image as (H, W, 3) float32 metres (OpenCV camera frame) from a
    ``.npy`` file, its header checked against ``size`` before the array is read."""
    if not data.startswith(_NPY_MAGIC):
        raise _bad_depth("pointmap must be a float .npy file (H, W, 3), metres")
    return _load_npy(data, "pointmap", ((*size, 3),)).astype(np.float32)


@dataclass(frozen=True)
class DepthInput:
    """A checked depth map or pointmap (metres) and the camera it was taken with."""

    kind: str  # "depth" or "pointmap"
    values: np.ndarray  # (H, W) z, or (H, W, 3) OpenCV camera frame; 0 / z = 0: no reading
    camera: Camera

    @property
    def size(self) -> tuple[int, int]:
        return int(self.values.shape[0]), int(self.values.shape[1])

    def z(self) -> np.ndarray:
        """(H, W) float32 distance along the optical axis, NaN where there is no reading."""
        z = self.values if self.kind == "depth" else self.values[..., 2]
        return np.where(z > 0, z, np.nan).astype(np.float32)

    def pointmap_opencv(self) -> np.ndarray:
        """(H, W, 3) float32 points in the OpenCV camera frame, NaN where there is no reading."""
        if self.kind == "pointmap":
            points = self.values.astype(np.float32, copy=True)
            points[~(points[..., 2] > 0)] = np.nan
            return points
        return backproject(self.z(), self.camera)

    def pointmap_pytorch3d(self) -> np.ndarray:
        """SAM 3D's ``pointmap``: (H, W, 3) float32 in PyTorch3D's camera frame (+X left,
        +Y up, +Z forward), metres, NaN where there is no reading."""
        return self.pointmap_opencv() * OPENCV_TO_PYTORCH3D

    def to_bytes(self) -> bytes:
        """The stored form (``input/depth.npz``): arrays only, no pickles."""
        buf = io.BytesIO()
        c = self.camera
        np.savez(
            buf,
            kind=np.array(self.kind),
            values=self.values,
            camera=np.array([c.width, c.height, c.fx, c.fy, c.cx, c.cy], dtype=np.float64),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> DepthInput:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            width, height, fx, fy, cx, cy = (float(v) for v in npz["camera"])
            return cls(
                str(npz["kind"]),
                npz["values"].astype(np.float32),
                Camera(int(width), int(height), fx, fy, cx, cy),
            )


def backproject(z: np.ndarray, camera: Camera) -> np.ndarray:
    """(H, W) depth along the optical axis -> (H, W, 3) OpenCV-frame points; pixel centres
    at (i + 0.5, j + 0.5). NaN depths give NaN points."""
    height, width = z.shape
    u = (np.arange(width, dtype=np.float32) + 0.5 - camera.cx) / camera.fx
    v = (np.arange(height, dtype=np.float32) + 0.5 - camera.cy) / camera.fy
    z = z.astype(np.float32)
    return np.stack([u[None, :] * z, v[:, None] * z, z], axis=-1)


def read_depth_input(
    kind: str, data: bytes, intrinsics: Any, size: tuple[int, int], masks: np.ndarray
) -> DepthInput:
    """Decode and check a depth map or pointmap for an (H, W) image and its (N, H, W) masks."""
    if kind not in KINDS:
        raise _bad_depth(f"unknown geometry input {kind!r}; one of {', '.join(KINDS)}")
    if intrinsics is None:
        raise _bad_intrinsics(
            f"{kind} needs the camera's intrinsics: send intrinsics {{fx, fy, cx, cy}} (pixels)"
        )
    camera = parse_intrinsics(intrinsics, size)
    size = (int(size[0]), int(size[1]))
    # Both decoders refuse a size other than the image's from the file's header.
    values = decode_depth(data, size) if kind == "depth" else decode_pointmap(data, size)
    if not np.isfinite(values).all():
        raise _bad_depth(f"{kind} holds NaN or infinite values; mark missing readings with 0")
    if np.abs(values).max() > MAX_DISTANCE_M:
        raise _bad_depth(
            f"{kind} holds values over {MAX_DISTANCE_M:g} m; send metres (.npy) or millimetres "
            "(16-bit PNG)"
        )
    z = values if kind == "depth" else values[..., 2]
    if (z < 0).any():
        raise _bad_depth(
            f"{kind} holds negative depths"
            + ("" if kind == "depth" else " (z must point forward: OpenCV camera frame)")
        )
    valid = z > 0
    if not valid.any():
        raise _bad_depth(f"{kind} has no readings (every value is 0)")
    for i, mask in enumerate(masks):
        if not (valid & mask).any():
            raise _bad_depth(f"object {i} has no {kind} readings under its mask")
    return DepthInput(kind, values, camera)
