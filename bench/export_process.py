"""Experiment: the heavy part of an object's export (decimate, bake a texture, the GLB) in an
export thread or in a process of its own, beside a thread that holds the GIL as the GPU
worker's generating thread does. Prints a table; asserts nothing; changes nothing in the
service (``worker/pipeline.py`` exports in threads).

    .venv/bin/python bench/export_process.py [--objects 4] [--texture 1024] [--faces 200000]

Each object is the stand-in's (``bench/sleeping_backend.py``: ~1M faces, 640k Gaussians).
Columns: wall time for all objects, one at a time on one export worker, and the pure-Python
thread's speed meanwhile against its speed alone (1.0: the export took none of its time).
In "process" the export runs in a spawned process (``concurrent.futures``); the object goes
there pickled and the GLB comes back the same way, both counted.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from texture import beside_python  # noqa: E402


def export_one(mesh, gaussians, faces: int, size: int) -> int:
    """Decimate, bake from the Gaussians (k-d tree), write the GLB: its size in bytes."""
    from worker.assets import glb, mesh_ops, texture

    small = mesh_ops.decimate(mesh, faces)
    baked = png = None
    if size:
        baked = texture.bake(small, size, texture.gaussian_appearance(gaussians))
        png = glb.png_bytes(baked.image)
    return len(glb.export_mesh_glb(small, baked, png))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=4)
    parser.add_argument("--texture", type=int, default=1024)
    parser.add_argument("--faces", type=int, default=200_000)
    args = parser.parse_args()
    import sleeping_backend

    stand_in = sleeping_backend.SleepingSam3d()
    stand_in.setup()
    mesh, gaussians = stand_in.mesh, stand_in.gaussians
    print(f"{args.objects} objects of {len(mesh.faces):,} faces, {len(gaussians):,} Gaussians: "
          f"decimate to {args.faces:,}, texture {args.texture}, GLB")  # fmt: skip
    print(f"{'export in':>12}  {'wall s':>8}  {'per object s':>12}  {'Python speed':>12}")
    pools = {
        "a thread": ThreadPoolExecutor(1),
        "a process": ProcessPoolExecutor(1, mp_context=get_context("spawn")),
    }
    for name, pool in pools.items():
        with pool:
            pool.submit(export_one, mesh, gaussians, args.faces, 0).result()  # warm: imports
            wall, speed = beside_python(
                lambda pool=pool: [
                    pool.submit(export_one, mesh, gaussians, args.faces, args.texture).result()
                    for _ in range(args.objects)
                ]
            )
        print(f"{name:>12}  {wall:8.2f}  {wall / args.objects:12.2f}  {speed:12.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
