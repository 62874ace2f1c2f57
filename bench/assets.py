"""Benchmark of the asset core. Prints a table; it is not a test and asserts nothing.

    .venv/bin/python bench/assets.py [--repeat N]

Runs pinned to one CPU core (and one BLAS/OpenMP thread), as a worker would on a small box.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

import numpy as np  # noqa: E402
import trimesh  # noqa: E402

from jobs.frames import Camera  # noqa: E402
from jobs.masks import decode_masks, encode_masks_rle  # noqa: E402
from jobs.options import parse_options  # noqa: E402
from worker.assets.glb import export_mesh_glb  # noqa: E402
from worker.assets.ply import export_splat_ply  # noqa: E402
from worker.backends.base import Gaussians, Mesh  # noqa: E402
from worker.backends.inflate import inflate_object  # noqa: E402

RNG = np.random.default_rng(0)


def best(fn, repeat: int) -> float:
    """Best wall time of ``repeat`` runs, seconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def blob_masks(height: int, width: int, count: int) -> np.ndarray:
    """``count`` ellipses of assorted sizes, as (N, H, W) bool."""
    yy, xx = np.ogrid[:height, :width]
    masks = np.zeros((count, height, width), bool)
    for i in range(count):
        cy, cx = RNG.uniform(0.2, 0.8) * height, RNG.uniform(0.2, 0.8) * width
        ry, rx = RNG.uniform(0.03, 0.2) * height, RNG.uniform(0.03, 0.2) * width
        masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return masks


def bench_inflate(repeat: int) -> float:
    h, w = 768, 1024
    image = RNG.integers(0, 255, (h, w, 3), dtype=np.uint8)
    mask = blob_masks(h, w, 1)[0]
    opts = parse_options("inflate", {})
    cam = Camera.from_fov(w, h, opts["fov_deg"])
    return best(
        lambda: inflate_object(
            image, mask, cam, seed=0, resolution=opts["resolution"], splats=opts["splats"]
        ),
        repeat,
    )


def bench_ply(repeat: int) -> float:
    n = 1_000_000
    q = RNG.normal(size=(n, 4)).astype(np.float32)
    g = Gaussians(
        positions=RNG.normal(size=(n, 3)).astype(np.float32),
        rotations=q / np.linalg.norm(q, axis=1, keepdims=True),
        scales=RNG.uniform(0.001, 0.01, (n, 3)).astype(np.float32),
        opacities=RNG.uniform(0.1, 0.9, n).astype(np.float32),
        colors=RNG.uniform(0, 1, (n, 3)).astype(np.float32),
    )
    return best(lambda: export_splat_ply(g), repeat), best(lambda: plyfile_write(g), repeat)


def plyfile_write(g: Gaussians) -> bytes:
    """The reference: plyfile writing the same rows, already laid out (no conversion)."""
    import io

    from plyfile import PlyData, PlyElement

    from worker.assets.ply import PROPERTIES, splat_rows

    rows = splat_rows(g).view([(name, "<f4") for name in PROPERTIES]).reshape(-1)
    out = io.BytesIO()
    PlyData([PlyElement.describe(rows, "vertex")], byte_order="<").write(out)
    return out.getvalue()


def bench_glb(repeat: int) -> tuple[float, int]:
    sphere = trimesh.creation.icosphere(subdivisions=7)  # 327,680 faces
    faces = np.asarray(sphere.faces[:250_000], dtype=np.int32)
    colors = RNG.integers(0, 255, (len(sphere.vertices), 4), dtype=np.uint8)
    mesh = Mesh(np.asarray(sphere.vertices, np.float32), faces, colors)

    def with_trimesh() -> bytes:  # the reference: the same data (normals included)
        reference = trimesh.Trimesh(mesh.vertices, faces, vertex_colors=colors, process=False)
        return trimesh.Scene(reference).export(file_type="glb", include_normals=True)

    return best(lambda: export_mesh_glb(mesh), repeat), len(faces), best(with_trimesh, repeat)


def bench_rle(repeat: int) -> float:
    mask = blob_masks(2048, 2048, 1)
    rle = encode_masks_rle(mask)
    return best(lambda: decode_masks(rle, (2048, 2048), mask_format="rle"), repeat * 10)


def peak_rss_child() -> None:
    """Whole job in memory: 4096x3072 image, 20 masks given as RLE, every artifact exported."""
    from worker.backends.inflate import InflateBackend
    from worker.pipeline import generate_assets

    h, w = 3072, 4096
    image = RNG.integers(0, 255, (h, w, 3), dtype=np.uint8)
    rle = encode_masks_rle(blob_masks(h, w, 20))
    masks = decode_masks(rle, (h, w), mask_format="rle")
    opts = parse_options("inflate", {})
    t0 = time.perf_counter()
    files = generate_assets(image, masks, InflateBackend(), options=opts, job_id="bench").files
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{peak:.0f} {elapsed:.2f} {sum(map(len, files.values()))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peak_rss_child()
        return

    rows = []
    rows.append(("inflate, one object, default resolution", bench_inflate(args.repeat), 1.0, "s"))
    ply_time, plyfile_time = bench_ply(args.repeat)
    rows.append(("PLY export, 1M splats", ply_time, 0.25, "s"))
    rows.append(("  ... / plyfile writing the same rows", ply_time / plyfile_time, 1.5, "x"))
    glb_time, tris, trimesh_time = bench_glb(args.repeat)
    rows.append((f"GLB export, {tris // 1000}k coloured triangles", glb_time, 0.15, "s"))
    rows.append(("  ... / trimesh exporting the same mesh", glb_time / trimesh_time, 1.5, "x"))
    rows.append(("RLE decode, 2048x2048 mask", bench_rle(args.repeat) * 1000, 5.0, "ms"))
    child = subprocess.run(
        [sys.executable, __file__, "--child"], capture_output=True, text=True, check=True
    )
    peak_mb, job_s, total_bytes = child.stdout.split()
    rows.append(("peak RSS, 4096x3072 image, 20 masks (whole job)", float(peak_mb), 1536.0, "MB"))

    print(f"{'benchmark':<50} {'value':>10} {'target':>10}  ok")
    print("-" * 76)
    for name, value, target, unit in rows:
        ok = "yes" if value < target else "NO"
        print(f"{name:<50} {value:>8.3f}{unit:>2} {'<' + format(target, 'g'):>8}{unit:>2}  {ok}")
    print(f"(20-mask job: {float(job_s):.1f} s, {int(total_bytes) / 1e6:.0f} MB of artifacts)")


if __name__ == "__main__":
    main()
