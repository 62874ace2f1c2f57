"""The real model on a GPU: seconds per stage and peak memory, default and fast mode.

    python bench/gpu.py --checkpoint DIR [--image samples/shapes.jpg] [--repeat 2] [--json OUT]

Builds the ``sam3d`` backend exactly as the worker does (preflight, offline config, attention
choice, warm-up), then times one object per mode: upstream's stages (MoGe pointmap, stage 1
sparse structure, stage 2 SLAT flow, decoders, to_glb), our conversion to the documented
frames, export (GLB + PLY) and upload (file:// storage). Each stage is timed with the device
synchronised on both sides; peak memory is torch's allocator peak for the whole object.
With a random-weights checkpoint (scripts/sam3d_random_checkpoint.py) times and memory are the
real model's; only the assets are noise.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jobs.images import decode_image  # noqa: E402
from jobs.masks import decode_masks  # noqa: E402
from jobs.settings import Settings  # noqa: E402
from jobs.storage import FileStorage  # noqa: E402
from worker.assets import glb, ply  # noqa: E402

# Upstream pipeline methods, in the order one object runs through them.
STAGES = {
    "moge": "compute_pointmap",
    "stage1": "sample_sparse_structure",
    "stage2": "sample_slat",
    "decoders": "decode_slat",
    "to_glb": "postprocess_slat_output",
}
MODES = {"default": {}, "fast": {"fast": True}}


class StageClock:
    """Wraps the pipeline's stage methods; each call adds its synchronised seconds."""

    def __init__(self, pipeline) -> None:
        import torch

        self.torch = torch
        self.seconds: dict[str, float] = {}
        for stage, method in STAGES.items():
            original = getattr(pipeline, method)
            setattr(pipeline, method, self._timed(stage, original))

    def _timed(self, stage, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self.torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.torch.cuda.synchronize()
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0

        return wrapper

    def measure(self, stage: str, fn, *args, **kwargs):
        wrapped = self._timed(stage, fn)
        return wrapped(*args, **kwargs)


def one_object(backend, clock: StageClock, image, mask, options, storage) -> dict:
    import torch

    clock.seconds = {}
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    output = backend._run(image, mask, options)
    clock.torch.cuda.synchronize()
    model_s = time.perf_counter() - t0
    from worker.backends.sam3d import convert_output

    result = clock.measure("convert", convert_output, output, image.shape[:2])
    files = clock.measure(
        "export",
        lambda: {
            "o.glb": glb.export_mesh_glb(result.mesh),
            "o.ply": ply.export_splat_ply(result.gaussians),
        },
    )

    def upload():
        for name, data in files.items():
            storage.put(f"bench/{name}", data, content_type="application/octet-stream")

    clock.measure("upload", upload)
    row = dict(clock.seconds)
    row["run_total"] = model_s
    row["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    row["voxels"] = int(output["coords"].shape[0])
    row["splats"] = len(result.gaussians)
    row["faces"] = len(result.mesh.faces)
    row["mb"] = sum(len(d) for d in files.values()) / 2**20
    return row


def print_table(rows: dict[str, dict]) -> None:
    cols = [
        *STAGES,
        "convert",
        "export",
        "upload",
        "run_total",
        "peak_gb",
        "voxels",
        "splats",
        "faces",
        "mb",
    ]
    print("| mode | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for mode, row in rows.items():
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append("-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
        print(f"| {mode} | " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--image", type=Path, default=ROOT / "samples" / "shapes.jpg")
    parser.add_argument("--masks", type=Path, default=ROOT / "samples" / "shapes.coco.json")
    parser.add_argument("--repeat", type=int, default=2, help="runs per mode (best is shown)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from worker.backends.sam3d import Sam3dBackend

    settings = Settings.from_env(checkpoint_dir=args.checkpoint)
    image = decode_image(args.image.read_bytes())
    mask = decode_masks(json.loads(args.masks.read_text()), image.shape[:2])[0]
    t0 = time.perf_counter()
    backend = Sam3dBackend(settings)
    backend.setup()
    setup_s = time.perf_counter() - t0
    clock = StageClock(backend.pipeline)
    storage = FileStorage(tempfile.mkdtemp(prefix="bench-gpu-"), signing_secret="bench")
    rows: dict[str, dict] = {}
    for mode, extra in MODES.items():
        runs = [
            one_object(backend, clock, image, mask, {"seed": 0, **extra}, storage)
            for _ in range(args.repeat)
        ]
        rows[mode] = min(runs, key=lambda r: r["run_total"])
    print(
        f"\nSAM 3D on {torch.cuda.get_device_name(0)}, torch {torch.__version__}, attention "
        f"{backend.attention}, setup (load + warm-up) {setup_s:.1f} s, image "
        f"{image.shape[1]}x{image.shape[0]}, best of {args.repeat}; seconds unless named:\n"
    )
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"setup_s": setup_s, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
