"""Sizes of every asset format per object. Prints a table; it is not a test.

    .venv/bin/python bench/formats.py [--resolution R] [--splats N]

The bundled sample (samples/shapes.jpg, three objects) through the embedded ``inflate``
backend; per object: splats as PLY and SPZ, the mesh as GLB as generated, decimated to a face
budget, and compressed (meshopt, Draco); USDZ; the GLB carrying meshes and splats.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.images import load_image  # noqa: E402
from jobs.masks import load_mask_files  # noqa: E402
from jobs.options import parse_options  # noqa: E402
from worker.backends.inflate import InflateBackend  # noqa: E402
from worker.pipeline import generate_assets  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "samples"


def kb(n: int) -> str:
    return f"{n / 1024:,.0f} KB"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=96)
    parser.add_argument("--splats", type=int, default=20_000)
    args = parser.parse_args()
    image = load_image(SAMPLE / "shapes.jpg")
    masks = load_mask_files([str(SAMPLE / "shapes.coco.json")], image.shape[:2])
    base = {"resolution": args.resolution, "splats": args.splats, "scene": False}
    runs = {
        "as generated": {"formats": ["glb", "ply", "spz", "usdz", "splats_glb"]},
        "decimated 5000": {"formats": ["glb"], "mesh": {"target_faces": 5000}},
        "decimated 1000": {"formats": ["glb"], "mesh": {"target_faces": 1000}},
        "meshopt": {"formats": ["glb"], "mesh": {"compression": "meshopt"}},
        "draco": {"formats": ["glb"], "mesh": {"compression": "draco"}},
        "decimated 5000 + meshopt": {
            "formats": ["glb"],
            "mesh": {"target_faces": 5000, "compression": "meshopt"},
        },
        "decimated 5000 + draco": {
            "formats": ["glb"],
            "mesh": {"target_faces": 5000, "compression": "draco"},
        },
    }
    manifests, seconds = {}, {}
    for name, extra in runs.items():
        t0 = time.perf_counter()
        opts = parse_options("inflate", {**base, **extra})
        manifests[name] = generate_assets(
            image, masks, InflateBackend(), options=opts, job_id="bench"
        ).manifest
        seconds[name] = time.perf_counter() - t0
    first = manifests["as generated"]["objects"]
    print(f"inflate, resolution {args.resolution}, {args.splats} splats per object\n")
    print("| object | faces | splats | PLY | SPZ | GLB | USDZ | GLB + splats |")
    print("|---|---|---|---|---|---|---|---|")
    for o in first:
        print(
            f"| {o['index']} | {o['num_faces']:,} | {o['num_splats']:,} | "
            f"{kb(o['gaussian_ply']['bytes'])} | {kb(o['gaussian_spz']['bytes'])} | "
            f"{kb(o['mesh_glb']['bytes'])} | {kb(o['mesh_usdz']['bytes'])} | "
            f"{kb(o['splats_glb']['bytes'])} |"
        )
    print("\n| mesh (GLB) | " + " | ".join(f"object {o['index']}" for o in first) + " | job s |")
    print("|---|" + "---|" * (len(first) + 1))
    for name, manifest in manifests.items():
        cells = [
            f"{kb(o['mesh_glb']['bytes'])} ({o['num_faces']:,} faces)" for o in manifest["objects"]
        ]
        print(f"| {name} | " + " | ".join(cells) + f" | {seconds[name]:.2f} |")


if __name__ == "__main__":
    main()
