"""Scene composition: per-object splats moved into the camera frame."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jobs.frames import matrix_to_quat, similarity_parts
from worker.assets import ply
from worker.backends.base import Gaussians


def _left_multiplier(q: np.ndarray) -> np.ndarray:
    """The 4x4 matrix L with L @ b == q * b (Hamilton product, w,x,y,z) for every b."""
    w, x, y, z = (float(v) for v in q)
    return np.array(
        [[w, -x, -y, -z], [x, w, -z, y], [y, z, w, -x], [z, -y, x, w]], dtype=np.float32
    )


def transform_gaussians(gaussians: Gaussians, matrix: np.ndarray) -> Gaussians:
    """Gaussians under a similarity transform: positions, orientations and scales (float32
    throughout: the matrix is cast once, no float64 copy of the splats is made)."""
    scale, rotation, shift = similarity_parts(matrix)
    q = matrix_to_quat(rotation)
    linear = (scale * rotation).T.astype(np.float32)
    positions = np.asarray(gaussians.positions, dtype=np.float32) @ linear
    positions += shift.astype(np.float32)
    rotations = np.asarray(gaussians.rotations, dtype=np.float32) @ _left_multiplier(q).T
    return Gaussians(
        positions=positions,
        rotations=rotations,
        scales=np.asarray(gaussians.scales, dtype=np.float32) * np.float32(scale),
        opacities=gaussians.opacities,
        colors=gaussians.colors,
    )


def transform_splat_rows(rows: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """PLY rows (``ply.splat_rows``) under a similarity transform, computed from the rows as
    they are: positions moved, orientations turned, log-scales shifted by log(scale); colours
    and opacities, already encoded for the object's PLY, are copied, not encoded again."""
    scale, rotation, shift = similarity_parts(matrix)
    q = matrix_to_quat(rotation)
    out = np.array(rows, dtype="<f4", copy=True)
    linear = (scale * rotation).T.astype(np.float32)
    out[:, ply.POSITION_COLUMNS] = rows[:, ply.POSITION_COLUMNS] @ linear
    out[:, ply.POSITION_COLUMNS] += shift.astype(np.float32)
    out[:, ply.SCALE_COLUMNS] += np.float32(np.log(scale))
    out[:, ply.ROTATION_COLUMNS] = rows[:, ply.ROTATION_COLUMNS] @ _left_multiplier(q).T
    return out


def compose_scene_gaussians(
    objects: Sequence[Gaussians], matrices: Sequence[np.ndarray]
) -> Gaussians:
    """Every object's splats in the scene frame, concatenated in object order."""
    moved = [transform_gaussians(g, m) for g, m in zip(objects, matrices, strict=True)]
    return Gaussians(
        *(np.concatenate([getattr(g, f) for g in moved]) for f in Gaussians.__dataclass_fields__)
    )
