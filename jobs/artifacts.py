"""Where a job's files live in storage, and how the result block names them."""

from __future__ import annotations

INPUT_IMAGE = "input/image"
INPUT_MASKS = "input/masks.json"
INPUT_DEPTH = "input/depth.npz"  # only when the job has a depth map or pointmap
# A job with prompts instead of masks: the API stores the prompts; the worker's segmenter
# writes input/masks.json and, beside it, each mask's prompt and score before any 3D work.
INPUT_PROMPTS = "input/prompts.json"
INPUT_SEGMENTS = "input/segments.json"


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def job_key(job_id: str, path: str) -> str:
    """Storage key of ``path`` (e.g. ``objects/0.glb``) of job ``job_id``."""
    return f"{job_prefix(job_id)}{path}"


def download_name(job_id: str, path: str) -> str:
    """File name offered to browsers: ``job_x-objects-0.glb``."""
    return f"{job_id}-{path.replace('/', '-')}"


# Asset formats (the ``formats`` option): the key each file has in the manifest, the result
# and GET /v1/jobs/{id}, the end of its file name, and its content type.
FORMAT_KEYS = {
    "glb": "mesh_glb",
    "ply": "gaussian_ply",
    "spz": "gaussian_spz",
    "usdz": "mesh_usdz",
    "splats_glb": "splats_glb",
}
FORMAT_SUFFIXES = {
    "glb": ".glb",
    "ply": ".ply",
    "spz": ".spz",
    "usdz": ".usdz",
    "splats_glb": ".splats.glb",
}
CONTENT_TYPES = {
    "glb": "model/gltf-binary",
    "ply": "application/octet-stream",
    "spz": "application/octet-stream",
    "usdz": "model/vnd.usdz+zip",
    "splats_glb": "model/gltf-binary",
}
ARTIFACT_KEYS = tuple(FORMAT_KEYS.values())


def object_path(index: int, fmt: str) -> str:
    """``objects/3.glb``, ``objects/3.splats.glb``, ...: object ``index``'s file in ``fmt``."""
    return f"objects/{index}{FORMAT_SUFFIXES[fmt]}"


def scene_path(fmt: str) -> str:
    """``scene.glb``, ``scene.spz``, ...: the scene's file in ``fmt``."""
    return f"scene{FORMAT_SUFFIXES[fmt]}"
