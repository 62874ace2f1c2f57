"""Cost of textured meshes (option ``texture``): seconds to unwrap and bake one object, and its
GLB's size against vertex colours. Prints a table; asserts nothing.

    .venv/bin/python bench/texture.py [--size 1024] [--repeat 2]

Pinned to one CPU core (and one BLAS/OpenMP thread). Rows: an ``inflate`` object of the sample
photo (resolution 96, baked from the photo), and a SAM 3D-sized object on the CPU: a 200k-face
closed surface baked from 640k Gaussians (the GPU worker's case; the GPU run is
``scripts/gpu_session.sh``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from worker.assets import glb, mesh_ops, texture  # noqa: E402
from worker.backends.base import Gaussians, Mesh  # noqa: E402


def inflate_case():
    import json

    from jobs.frames import Camera
    from jobs.images import decode_image
    from jobs.masks import decode_masks
    from worker.backends.inflate import inflate_object

    image = decode_image((ROOT / "samples" / "shapes.jpg").read_bytes())
    masks = decode_masks(json.loads((ROOT / "samples" / "shapes.coco.json").read_text()),
                         image.shape[:2])  # fmt: skip
    camera = Camera.from_fov(image.shape[1], image.shape[0], 60.0)
    result = inflate_object(image, masks[0], camera, seed=0, resolution=96)
    return "inflate object (photo)", result.mesh, result.appearance


def sam3d_sized_case(faces: int = 200_000, splats: int = 640_000):
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=7)  # 327,680 faces
    bumps = 1 + 0.05 * np.sin(8 * sphere.vertices[:, :1]) * np.cos(6 * sphere.vertices[:, 1:2])
    vertices = (sphere.vertices * bumps * 0.5).astype(np.float32)
    colors = np.full((len(vertices), 4), 200, np.uint8)
    mesh = mesh_ops.decimate(Mesh(vertices, sphere.faces.astype(np.int32), colors), faces)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(vertices), splats)
    gaussians = Gaussians(
        positions=vertices[picks] + rng.normal(0, 0.002, (splats, 3)).astype(np.float32),
        rotations=np.tile(np.float32([1, 0, 0, 0]), (splats, 1)),
        scales=np.full((splats, 3), 0.004, np.float32),
        opacities=rng.uniform(0.3, 1.0, splats).astype(np.float32),
        colors=rng.uniform(0, 1, (splats, 3)).astype(np.float32),
    )
    return (
        f"{len(mesh.faces) // 1000}k faces, {splats // 1000}k Gaussians",
        mesh,
        (texture.gaussian_appearance(gaussians)),
    )


def measure(mesh: Mesh, appearance, size: int, repeat: int) -> dict:
    unwrap_s, bake_s, baked = [], [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        texture.unwrap(mesh.vertices, mesh.faces, size)
        t1 = time.perf_counter()
        baked = texture.bake(mesh, size, appearance)  # unwraps again: total = its time
        t2 = time.perf_counter()
        unwrap_s.append(t1 - t0)
        bake_s.append(t2 - t1)
    png = glb.png_bytes(baked.image)
    return {
        "faces": len(mesh.faces),
        "unwrap_s": min(unwrap_s),
        "total_s": min(bake_s),
        "glb_vertex_colours": len(glb.export_mesh_glb(mesh)),
        "glb_textured": len(glb.export_mesh_glb(mesh, baked, png)),
        "png": len(png),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--cases", default="inflate,sam3d")
    args = parser.parse_args()
    cases = {"inflate": inflate_case, "sam3d": sam3d_sized_case}
    print(f"texture {args.size} px, one CPU core, best of {args.repeat}")
    head = ("object", "faces", "unwrap s", "unwrap+bake s", "GLB colours MB", "GLB tex MB")
    head += ("PNG MB",)
    print("  ".join(f"{h:>16}" for h in head))
    for name in args.cases.split(","):
        label, mesh, appearance = cases[name]()
        row = measure(mesh, appearance, args.size, args.repeat)
        cells = (
            label[:16], row["faces"], f"{row['unwrap_s']:.2f}", f"{row['total_s']:.2f}",
            f"{row['glb_vertex_colours'] / 1e6:.2f}", f"{row['glb_textured'] / 1e6:.2f}",
            f"{row['png'] / 1e6:.2f}",
        )  # fmt: skip
        print("  ".join(f"{c:>16}" for c in cells), flush=True)
        print(f"    ({label})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
