"""On a GPU host: ``Sam3dBackend.generate_batch`` on the real upstream pipeline, objects of two
images (two "jobs") in shared passes, and a job leaving at a flow step. Prints JSON lines.

    python3 scripts/gpu_batch_check.py --checkpoint /tmp/sam3d-random
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jobs.images import decode_image  # noqa: E402
from jobs.masks import decode_masks  # noqa: E402
from jobs.settings import Settings  # noqa: E402
from worker.backends.base import BatchItem  # noqa: E402
from worker.backends.sam3d import Sam3dBackend  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    args = parser.parse_args()
    import torch

    image = decode_image((ROOT / "samples" / "shapes.jpg").read_bytes())
    masks = decode_masks(
        json.loads((ROOT / "samples" / "shapes.coco.json").read_text()), image.shape[:2]
    )
    mirrored = np.ascontiguousarray(image[:, ::-1])
    backend = Sam3dBackend(Settings.from_env(checkpoint_dir=args.checkpoint, compile_flow=False))
    backend.setup()
    options = {"seed": 0, "fast": True}

    def items() -> list[BatchItem]:
        return [
            BatchItem("a", image, list(masks[:2]), [1, 1]),
            BatchItem("b", mirrored, [np.ascontiguousarray(m[:, ::-1]) for m in masks], [2] * 3),
        ]

    def run(leaving) -> tuple[dict, float]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        got: dict[str, list[int]] = {}
        for key, pos, result in backend.generate_batch(items(), options=options, leaving=leaving):
            assert len(result.gaussians) > 0 and len(result.mesh.faces) > 0
            got.setdefault(key, []).append(pos)
        torch.cuda.synchronize()
        return got, time.perf_counter() - t0

    run(lambda: set())  # warm
    got, seconds = run(lambda: set())
    print(json.dumps({"check": "two images in shared passes", "got": got, "s": seconds}))
    calls = [0]

    def leaving() -> set[str]:
        calls[0] += 1
        return {"b"} if calls[0] > 3 else set()  # b canceled after a few flow steps

    got, seconds = run(leaving)
    print(json.dumps({"check": "b leaves mid-flow", "got": got, "s": seconds, "asks": calls[0]}))
    t0 = time.perf_counter()
    for item in items():
        list(backend.generate_many(item.image, item.masks, camera=None, seeds=item.seeds,
                                   options=options))  # fmt: skip
    torch.cuda.synchronize()
    print(json.dumps({"check": "each image alone (generate_many)", "s": time.perf_counter() - t0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
