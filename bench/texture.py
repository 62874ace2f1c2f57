"""Cost of textured meshes (option ``texture``): seconds to unwrap and bake one object, and its
GLB's size against vertex colours. Prints a table; asserts nothing.

    .venv/bin/python bench/texture.py [--size 1024] [--repeat 2]
    .venv/bin/python bench/texture.py --held-out   # colour error on held-out photos
    python3 bench/texture.py --all-cores --device cuda --cases sam3d,sam3d-device   # GPU host

Pinned to one CPU core (and one BLAS/OpenMP thread) unless ``--all-cores``. The time counts
everything a worker does per object: preparing the appearance (the Gaussians' k-d tree),
unwrapping, baking, the PNG. "beside Python": the same bake beside a thread running pure
Python (it holds the GIL, as the GPU worker's generating thread does while it launches
kernels), and that thread's speed meanwhile against its speed alone (pinned to one core,
the two share it: 0.5 is an even share). Rows: an ``inflate`` object of the sample
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

if __name__ == "__main__" and "--all-cores" not in sys.argv:  # (tests import its measures)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

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
    return "inflate object (photo)", result.mesh, lambda: result.appearance


def sam3d_sized_case(faces: int = 200_000, splats: int = 640_000, device: str | None = None):
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
    where = f", nearest on {device}" if device else ", k-d tree"
    return (
        f"{len(mesh.faces) // 1000}k faces, {splats // 1000}k Gaussians{where}",
        mesh,
        lambda: texture.gaussian_appearance(gaussians, device=device),
    )


def front_colour_errors(image, mask, camera, result, baked, size: int) -> tuple[float, float]:
    """Median colour error (mean over RGB, 0-1) against the photo over the object's front
    surface points inside its mask: (texture, vertex colours). The points are the texture's
    own texels' surface points; the vertex colours are interpolated at the same points."""
    matrix = result.pose.matrix()
    rows, cols, tri, bary = texture.rasterize(baked.uvs, baked.faces, size, size)
    corners = baked.faces[tri]
    points = np.einsum("nk,nkj->nj", bary, baked.vertices[corners])
    world = points @ matrix[:3, :3].T + matrix[:3, 3]
    normals = glb.vertex_normals(baked.vertices, baked.faces)
    n = np.einsum("nk,nkj->nj", bary, normals[corners]) @ np.linalg.inv(matrix[:3, :3])
    cosine = np.einsum("ij,ij->i", n, -world) / np.maximum(
        np.linalg.norm(n, axis=1) * np.linalg.norm(world, axis=1), 1e-12
    )
    uv = camera.project(world)
    px = np.floor(uv).astype(int)
    h, w = mask.shape
    ok = (cosine > 0.3) & (px[:, 0] >= 0) & (px[:, 0] < w) & (px[:, 1] >= 0) & (px[:, 1] < h)
    ok[ok] = mask[px[ok, 1], px[ok, 0]]
    photo = texture.sample_image(image, uv[ok, 0], uv[ok, 1])
    tex_uv = np.einsum("nk,nkj->nj", bary[ok], baked.uvs[corners[ok]]) * size
    from_texture = texture.sample_image(baked.image, tex_uv[:, 0], tex_uv[:, 1])
    colours = result.mesh.colors[baked.source][:, :3].astype(np.float64) / 255
    from_vertices = np.einsum("nk,nkj->nj", bary[ok], colours[corners[ok]])
    return (
        float(np.median(np.abs(from_texture - photo).mean(1))),
        float(np.median(np.abs(from_vertices - photo).mean(1))),
    )


def held_out(size: int) -> None:
    """The hand-masked photos scikit-image ships (bench/data/hand_masks.json): per object,
    the texture's colour error against the photo beside the vertex colours'."""
    import json

    from grabcut import load_photo, polygons_mask

    from jobs.frames import Camera
    from worker.backends.inflate import inflate_object

    objects = json.loads((ROOT / "bench" / "data" / "hand_masks.json").read_text())["objects"]
    print(f"\ncolour error against the photo, front surface inside the mask, texture {size} px")
    print(f"{'photo':>10}  {'object':>34}  {'texture':>8}  {'vertex colours':>14}  {'ratio':>6}")
    for obj in objects:
        image = load_photo(obj["image"])
        mask = polygons_mask(obj["polygons"], image.shape[:2])
        camera = Camera.from_fov(image.shape[1], image.shape[0], 60.0)
        result = inflate_object(image, mask, camera, seed=0, resolution=96)
        baked = texture.bake(result.mesh, size, result.appearance)
        tex, vertex = front_colour_errors(image, mask, camera, result, baked, size)
        print(f"{obj['image']:>10}  {obj['name'][:34]:>34}  {tex:8.4f}  {vertex:14.4f}  "
              f"{tex / vertex:6.2f}", flush=True)  # fmt: skip


def _ticker(stop, rates: list) -> None:
    """Pure Python work (the GIL held, as a thread launching GPU kernels holds it)."""
    count, t0 = 0, time.perf_counter()
    while not stop.is_set():
        for _ in range(1000):
            count += 1
    rates.append(count / (time.perf_counter() - t0))


def beside_python(work) -> tuple[float, float]:
    """(seconds ``work`` takes beside a thread that holds the GIL, that thread's speed then
    against its speed alone): what a bake in an export thread costs the GPU worker's
    generating thread, and what it costs the bake."""
    import threading

    def ticking(run) -> tuple[float, float]:
        stop, rates = threading.Event(), []
        thread = threading.Thread(target=_ticker, args=(stop, rates))
        thread.start()
        t0 = time.perf_counter()
        run()
        elapsed = time.perf_counter() - t0
        stop.set()
        thread.join()
        return elapsed, rates[0]

    _, alone = ticking(lambda: time.sleep(1.0))
    elapsed, rate = ticking(work)
    return elapsed, rate / alone


def measure(mesh: Mesh, make_appearance, size: int, repeat: int) -> dict:
    unwrap_s, bake_s, baked, png = [], [], None, b""
    for _ in range(repeat):
        t0 = time.perf_counter()
        texture.unwrap(mesh.vertices, mesh.faces, size)
        t1 = time.perf_counter()
        appearance = make_appearance()
        baked = texture.bake(mesh, size, appearance)  # unwraps again: total = its time
        png = glb.png_bytes(baked.image)
        t2 = time.perf_counter()
        unwrap_s.append(t1 - t0)
        bake_s.append(t2 - t1)
    beside_s, share = beside_python(lambda: texture.bake(mesh, size, make_appearance()))
    return {
        "faces": len(mesh.faces),
        "unwrap_s": min(unwrap_s),
        "total_s": min(bake_s),
        "beside_s": beside_s,
        "source": getattr(appearance, "source", "appearance"),  # the route that ran
        "python_speed": share,
        "glb_vertex_colours": len(glb.export_mesh_glb(mesh)),
        "glb_textured": len(glb.export_mesh_glb(mesh, baked, png)),
        "png": len(png),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--cases", default="inflate,sam3d")
    parser.add_argument("--held-out", action="store_true", help="only the colour errors")
    parser.add_argument("--all-cores", action="store_true", help="not pinned to one core")
    parser.add_argument("--device", help="a torch device for the Gaussians' nearest (cuda)")
    args = parser.parse_args()
    if args.held_out:
        held_out(args.size)
        return 0
    cases = {
        "inflate": inflate_case,
        "sam3d": sam3d_sized_case,
        "sam3d-device": lambda: sam3d_sized_case(device=args.device),
    }
    cores = f"{os.cpu_count()} CPU cores" if args.all_cores else "one CPU core"
    print(f"texture {args.size} px, {cores}, best of {args.repeat}")
    head = ("object", "faces", "unwrap s", "whole bake s", "beside Python s", "Python's speed")
    head += ("GLB colours MB", "GLB tex MB", "PNG MB")
    print("  ".join(f"{h:>16}" for h in head))
    for name in args.cases.split(","):
        label, mesh, make_appearance = cases[name]()
        row = measure(mesh, make_appearance, args.size, args.repeat)
        cells = (
            label[:16], row["faces"], f"{row['unwrap_s']:.2f}", f"{row['total_s']:.2f}",
            f"{row['beside_s']:.2f}", f"{row['python_speed']:.2f}",
            f"{row['glb_vertex_colours'] / 1e6:.2f}", f"{row['glb_textured'] / 1e6:.2f}",
            f"{row['png'] / 1e6:.2f}",
        )  # fmt: skip
        print("  ".join(f"{c:>16}" for c in cells), flush=True)
        print(f"    ({label}; {row['source']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
