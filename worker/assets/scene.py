"""Scene composition: per-object splats moved into the camera frame."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jobs.frames import matrix_to_quat, quat_multiply, similarity_parts
from worker.backends.base import Gaussians


def transform_gaussians(gaussians: Gaussians, matrix: np.ndarray) -> Gaussians:
    """Gaussians under a similarity transform: positions, orientations and scales."""
    scale, rotation, shift = similarity_parts(matrix)
    q = matrix_to_quat(rotation)
    return Gaussians(
        positions=(gaussians.positions @ (scale * rotation).T + shift).astype(np.float32),
        rotations=quat_multiply(q, gaussians.rotations).astype(np.float32),
        scales=(gaussians.scales * scale).astype(np.float32),
        opacities=gaussians.opacities,
        colors=gaussians.colors,
    )


def compose_scene_gaussians(
    objects: Sequence[Gaussians], matrices: Sequence[np.ndarray]
) -> Gaussians:
    """Every object's splats in the scene frame, concatenated in object order."""
    moved = [transform_gaussians(g, m) for g, m in zip(objects, matrices, strict=True)]
    return Gaussians(
        *(np.concatenate([getattr(g, f) for g in moved]) for f in Gaussians.__dataclass_fields__)
    )
