"""One job, start to finish in memory: image + masks in, every artifact's bytes out."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jobs.depth import DepthInput
from jobs.masks import mask_stats
from worker.assets import glb, ply
from worker.assets.scene import compose_scene_gaussians
from worker.backends.base import Backend, ObjectResult, iter_objects

MANIFEST_FORMAT = "sam3d-jobs/manifest@1"
FRAMES = {
    "object": "glTF axes: right-handed, +Y up; centred in the unit cube [-0.5, 0.5]^3",
    "scene": "OpenGL camera frame: camera at the origin looking down -Z, +X right, +Y up",
    "matrix": "4x4, row-major JSON, column vectors: per-object local -> scene",
    "rotation": "quaternion w,x,y,z as SAM 3D reports it: p_cam = (s * p_zup) @ R(q) + t in "
    "the PyTorch3D camera frame (+X left, +Y up, +Z forward), object frame Z-up",
    "camera": "u = cx + fx*X/(-Z), v = cy - fy*Y/(-Z) for a scene point (X, Y, Z), Z < 0",
    "units": "metres when a depth map or pointmap was given, else relative (unknown scale)",
}


class Canceled(Exception):
    """Raised between objects when the caller asked to stop."""


@dataclass
class Artifacts:
    """Every file of a job by its relative path, plus the manifest (also in ``files``)."""

    files: dict[str, bytes] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


def artifact_paths(count: int) -> list[str]:
    """Relative paths of every artifact of a job with ``count`` objects."""
    per_object = [f"objects/{i}.{ext}" for i in range(count) for ext in ("glb", "ply")]
    return ["scene.glb", "scene.ply", *per_object, "manifest.json"]


def generate_assets(
    image: np.ndarray,
    masks: np.ndarray,
    backend: Backend,
    *,
    options: Mapping[str, Any],
    job_id: str,
    on_object: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    depth: DepthInput | None = None,
) -> Artifacts:
    """Generate every object, export it, compose the scene and write the manifest.

    With ``depth`` (a metric depth map or pointmap), its intrinsics are the camera and the
    backend gets it as ``depth=``; poses and sizes are then in metres."""
    started = time.perf_counter()
    camera = depth.camera if depth is not None else backend.camera(image, options)
    metric = {"depth": depth} if depth is not None else {}  # backends without depth still work
    seed = int(options["seed"])
    results: list[ObjectResult] = []
    object_times: list[float] = []
    if should_cancel is not None and should_cancel():
        raise Canceled("canceled before object 0")
    seeds = [seed] * len(masks)
    objects = iter_objects(
        backend, image, masks, camera=camera, seeds=seeds, options=options, **metric
    )
    t0 = time.perf_counter()
    for i, result in enumerate(objects):
        # Batched backends yield a batch's objects together: the first carries its time.
        object_times.append(time.perf_counter() - t0)
        camera = camera or result.camera
        results.append(result)
        if on_object is not None:
            on_object(i + 1, len(masks))
        if i + 1 < len(masks) and should_cancel is not None and should_cancel():
            raise Canceled(f"canceled before object {i + 1}")
        t0 = time.perf_counter()
    generated = time.perf_counter()

    out = Artifacts()
    matrices = [r.pose.matrix() for r in results]
    for i, r in enumerate(results):
        out.files[f"objects/{i}.glb"] = glb.export_mesh_glb(r.mesh)
        out.files[f"objects/{i}.ply"] = ply.export_splat_ply(r.gaussians)
    out.files["scene.glb"] = glb.export_scene_glb([r.mesh for r in results], matrices)
    scene_splats = compose_scene_gaussians([r.gaussians for r in results], matrices)
    out.files["scene.ply"] = ply.export_splat_ply(scene_splats)
    exported = time.perf_counter()

    def entry(path: str) -> dict[str, Any]:
        kind = glb.CONTENT_TYPE if path.endswith(".glb") else ply.CONTENT_TYPE
        return {"path": path, "bytes": len(out.files[path]), "content_type": kind}

    out.manifest = {
        "format": MANIFEST_FORMAT,
        "job_id": job_id,
        "backend": {"name": backend.name, "version": backend.version},
        "seed": seed,
        "options": dict(options),
        "frames": FRAMES,
        "camera": camera.to_dict() if camera else None,
        "units": "metres" if depth is not None else "relative",
        "depth_input": depth.kind if depth is not None else None,
        "image": {"width": int(image.shape[1]), "height": int(image.shape[0])},
        "timings": {
            "generate_s": round(generated - started, 4),
            "export_s": round(exported - generated, 4),
            "total_s": round(exported - started, 4),
        },
        "scene": {
            "mesh_glb": entry("scene.glb"),
            "gaussian_ply": entry("scene.ply"),
            "num_splats": len(scene_splats),
        },
        "objects": [
            {
                "index": i,
                "mask": mask_stats(masks[i]),
                "metadata": r.pose.to_metadata(),
                "mesh_glb": entry(f"objects/{i}.glb"),
                "gaussian_ply": entry(f"objects/{i}.ply"),
                "num_vertices": len(r.mesh.vertices),
                "num_faces": len(r.mesh.faces),
                "num_splats": len(r.gaussians),
                "time_s": round(object_times[i], 4),
            }
            for i, r in enumerate(results)
        ],
    }
    out.files["manifest.json"] = json.dumps(out.manifest, indent=2).encode()
    return out
