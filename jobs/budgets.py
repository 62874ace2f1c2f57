"""Budgets of a job, known at submit: its time limit (a fixed part plus a per-object budget
of its backend) and the bytes it will write (checked against ``max_job_output_bytes``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jobs.errors import ErrorCode, Sam3dError
from jobs.settings import Settings

# Seconds each object may take, per backend, on top of SAM3D_JOB_TIME_LIMIT_S. inflate takes
# well under a second; SAM 3D 8-17 s on an H100 at 25+25 steps, more with 50+ steps or
# texture baking. SAM3D_OBJECT_TIME_LIMIT_S overrides these.
OBJECT_TIME_BUDGET_S = {"inflate": 10.0, "sam3d": 60.0}
DEFAULT_OBJECT_TIME_BUDGET_S = 60.0

SPLAT_BYTES = 17 * 4  # one 3DGS PLY row
VERTEX_BYTES = 12 + 12 + 4  # position, normal, RGBA colour
FACE_BYTES = 12
# SAM 3D's outputs per object (REFERENCE-SAM3D.md): ~20k occupied voxels, 32 (or 4)
# Gaussians each; a mesh of about 1M faces (500k vertices) before post-processing.
SAM3D_VOXELS = 20_000
SAM3D_MESH_VERTICES = 500_000


def object_time_budget_s(settings: Settings, backend: str) -> float:
    """Seconds one object of ``backend`` may take."""
    if settings.object_time_limit_s > 0:
        return float(settings.object_time_limit_s)
    return OBJECT_TIME_BUDGET_S.get(backend, DEFAULT_OBJECT_TIME_BUDGET_S)


def time_limits(settings: Settings, backend: str, objects: int) -> tuple[int, int]:
    """(soft, hard) time limit in seconds of a job of ``objects`` objects: the soft limit
    stops it between objects (keeping those done), the hard one kills it."""
    hard = int(settings.job_time_limit_s + object_time_budget_s(settings, backend) * objects)
    soft = max(1, hard - max(1, min(30, hard // 10)))
    return soft, hard


def max_time_limit_s(settings: Settings) -> int:
    """The longest hard limit any job can get (``max_masks`` objects)."""
    return time_limits(settings, settings.backend, settings.max_masks)[1]


def object_output_bytes(backend: str, options: Mapping[str, Any]) -> int:
    """Bytes one object adds to a job's output: its GLB (and texture) and PLY, and its share
    of the scene's (the same data again, moved into the scene frame)."""
    if backend == "inflate":
        resolution = int(options.get("resolution", 96))
        vertices = 6 * resolution * resolution  # marching cubes gives ~4.6 R^2; margin
        mesh = vertices * VERTEX_BYTES + 2 * vertices * FACE_BYTES
        splats = int(options.get("splats", 20_000)) * SPLAT_BYTES
    else:
        splats = SAM3D_VOXELS * int(options.get("splats_per_voxel", 32)) * SPLAT_BYTES
        mesh = SAM3D_MESH_VERTICES * VERTEX_BYTES + 2 * SAM3D_MESH_VERTICES * FACE_BYTES
    # A baked texture: its PNG, at most the raw pixels (photos compress to a third or so).
    size = int(options.get("texture") or 0)
    texture = 3 * size * size
    return 2 * (splats + mesh + texture)


def check_output_budget(
    settings: Settings, backend: str, options: Mapping[str, Any], objects: int
) -> int:
    """The job's estimated output in bytes; ``job_too_large`` when over the limit."""
    per_object = object_output_bytes(backend, options)
    estimate = per_object * objects
    limit = settings.max_job_output_bytes
    if limit and estimate > limit:
        raise Sam3dError(
            ErrorCode.JOB_TOO_LARGE,
            f"the job would write about {_size(estimate)} ({objects} objects x "
            f"{_size(per_object)} with these options); the limit is {_size(limit)} "
            "(SAM3D_MAX_JOB_OUTPUT_BYTES): send fewer objects or lower the splats/resolution",
        )
    return estimate


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"
