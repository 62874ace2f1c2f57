"""Frames, poses and cameras: the one convention every artifact follows.

Per-object files live in the object's local frame: glTF axes (+Y up, right-handed), centred,
inside the unit cube. Scene files live in the camera frame, OpenGL style: camera at the origin
looking down -Z, +X right, +Y up.

SAM 3D reports a pose as ``rotation`` (quaternion w,x,y,z), ``translation`` (3) and ``scale``
(3) in PyTorch3D's camera frame (+X left, +Y up, +Z forward), applied to row vectors of the
Z-up object frame: ``p_cam = (s * p_zup) @ R(q) + t``. ``pose_matrix`` turns that into the 4x4
column-vector matrix that maps the per-object GLB's local (Y-up) coordinates to the scene
frame; ``pose_from_matrix`` goes back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Y-up (glTF) local coordinates from Z-up (SAM 3D) ones: (x, y, z) -> (x, z, -y).
Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
# OpenGL camera coordinates from PyTorch3D camera ones: (x, y, z) -> (-x, y, -z).
PYTORCH3D_TO_OPENGL = np.diag([-1.0, 1.0, -1.0])


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) acting on column vectors from quaternions (..., 4) w,x,y,z."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    m = np.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        axis=-1,
    )  # fmt: skip
    return m.reshape(q.shape[:-1] + (3, 3))


def matrix_to_quat(m: np.ndarray) -> np.ndarray:
    """Quaternions (..., 4) w,x,y,z with w >= 0 from rotation matrices (..., 3, 3)."""
    m = np.asarray(m, dtype=np.float64)
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    # Four candidate magnitudes; pick the largest per matrix for numerical stability.
    cand = np.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1
    )
    best = np.argmax(cand, axis=-1)
    r = 0.5 * np.sqrt(np.maximum(np.take_along_axis(cand, best[..., None], -1)[..., 0], 1e-12))
    s = 0.25 / r
    d21, d02, d10 = (
        m[..., 2, 1] - m[..., 1, 2],
        m[..., 0, 2] - m[..., 2, 0],
        m[..., 1, 0] - m[..., 0, 1],
    )
    s21, s02, s10 = (
        m[..., 2, 1] + m[..., 1, 2],
        m[..., 0, 2] + m[..., 2, 0],
        m[..., 1, 0] + m[..., 0, 1],
    )
    options = np.stack(
        [
            np.stack([r, d21 * s, d02 * s, d10 * s], -1),
            np.stack([d21 * s, r, s10 * s, s02 * s], -1),
            np.stack([d02 * s, s10 * s, r, s21 * s], -1),
            np.stack([d10 * s, s02 * s, s21 * s, r], -1),
        ],
        -2,
    )
    q = np.take_along_axis(options, best[..., None, None], -2)[..., 0, :]
    q = q * np.where(q[..., :1] < 0, -1.0, 1.0)
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product a*b of quaternions (..., 4) w,x,y,z: rotation b first, then a."""
    aw, ax, ay, az = np.moveaxis(np.asarray(a, dtype=np.float64), -1, 0)
    bw, bx, by, bz = np.moveaxis(np.asarray(b, dtype=np.float64), -1, 0)
    return np.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        axis=-1,
    )


@dataclass(frozen=True)
class Pose:
    """An object's pose exactly as SAM 3D reports it (see the module docstring)."""

    rotation: tuple[float, float, float, float]  # w, x, y, z
    translation: tuple[float, float, float]
    scale: tuple[float, float, float]

    def matrix(self) -> np.ndarray:
        """4x4 column-vector matrix: per-object GLB local (Y-up) -> scene (OpenGL camera)."""
        return pose_matrix(self.rotation, self.translation, self.scale)

    def to_metadata(self) -> dict[str, list]:
        """The per-object ``metadata`` block: SAM 3D's fields plus ``matrix`` (row-major)."""
        return {
            "rotation": [float(v) for v in self.rotation],
            "translation": [float(v) for v in self.translation],
            "scale": [float(v) for v in self.scale],
            "matrix": self.matrix().tolist(),
        }


def pose_matrix(rotation, translation, scale) -> np.ndarray:
    """SAM 3D pose (row-vector, Z-up object, PyTorch3D camera) as a local-to-scene 4x4."""
    r = quat_to_matrix(np.asarray(rotation, dtype=np.float64).reshape(4))
    s = np.diag(np.asarray(scale, dtype=np.float64).reshape(3))
    t = np.asarray(translation, dtype=np.float64).reshape(3)
    m = np.eye(4)
    # Column-vector form of p_cam = (s * A^T p_yup) @ R + t, then into the OpenGL frame.
    m[:3, :3] = PYTORCH3D_TO_OPENGL @ r.T @ s @ Z_UP_TO_Y_UP.T
    m[:3, 3] = PYTORCH3D_TO_OPENGL @ t
    return m


def pose_from_matrix(matrix: np.ndarray) -> Pose:
    """Inverse of ``pose_matrix`` for a similarity transform (rotation, uniform scale, shift)."""
    s, rotation, shift = similarity_parts(matrix)
    # R^T = D @ rotation @ A  (D and A orthogonal, D symmetric)
    r_t = PYTORCH3D_TO_OPENGL @ rotation @ Z_UP_TO_Y_UP
    q = matrix_to_quat(r_t.T)
    t = PYTORCH3D_TO_OPENGL @ shift
    return Pose(tuple(map(float, q)), tuple(map(float, t)), (s, s, s))


def similarity_parts(matrix: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Split a similarity 4x4 into (uniform scale, 3x3 rotation, translation)."""
    m = np.asarray(matrix, dtype=np.float64)
    linear = m[:3, :3]
    det = np.linalg.det(linear)
    if det <= 0:
        raise ValueError("transform must preserve orientation")
    s = float(np.cbrt(det))
    rot = linear / s
    if not np.allclose(rot @ rot.T, np.eye(3), atol=1e-6):
        raise ValueError("transform is not a similarity (non-uniform scale or shear)")
    return s, rot, m[:3, 3].copy()


@dataclass(frozen=True)
class Camera:
    """Pinhole intrinsics in pixels. Scene point (X,Y,Z), Z<0, projects to
    u = cx + fx*X/(-Z), v = cy - fy*Y/(-Z); pixel (i, j) covers [i, i+1) x [j, j+1)."""

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float

    @classmethod
    def from_fov(cls, width: int, height: int, fov_deg: float) -> Camera:
        """Square pixels, principal point at the image centre, horizontal field of view."""
        f = 0.5 * width / np.tan(np.radians(fov_deg) / 2)
        return cls(width, height, float(f), float(f), width / 2.0, height / 2.0)

    def to_dict(self) -> dict[str, object]:
        return {
            "width": self.width,
            "height": self.height,
            "K": [[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Camera:
        """Inverse of ``to_dict``."""
        k = data["K"]
        return cls(int(data["width"]), int(data["height"]), k[0][0], k[1][1], k[0][2], k[1][2])

    def project(self, points: np.ndarray) -> np.ndarray:
        """(N,3) scene points in front of the camera -> (N,2) pixel coordinates (u, v)."""
        p = np.asarray(points, dtype=np.float64)
        depth = -p[:, 2]
        return np.stack(
            [self.cx + self.fx * p[:, 0] / depth, self.cy - self.fy * p[:, 1] / depth], 1
        )
