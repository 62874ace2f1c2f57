"""Where a job's files live in storage, and how the result block names them."""

from __future__ import annotations

INPUT_IMAGE = "input/image"
INPUT_MASKS = "input/masks.json"
INPUT_DEPTH = "input/depth.npz"  # only when the job has a depth map or pointmap


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def job_key(job_id: str, path: str) -> str:
    """Storage key of ``path`` (e.g. ``objects/0.glb``) of job ``job_id``."""
    return f"{job_prefix(job_id)}{path}"


def download_name(job_id: str, path: str) -> str:
    """File name offered to browsers: ``job_x-objects-0.glb``."""
    return f"{job_id}-{path.replace('/', '-')}"
