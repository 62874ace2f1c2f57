"""GrabCut masks from loose boxes against careful hand masks, on photos of another kind than
the tests' (scikit-image's bundled photos: coffee, astronaut, rocket; no download).

    python bench/grabcut.py [--masks bench/data/hand_masks.json] [--pad 0.1]

Prints one row per object for two kinds of loose box: the one drawn by hand in the JSON,
and the hand mask's bounding box grown by ``--pad`` of its size on every side (clipped to
the image). Goal (issue 16): mean IoU >= 0.85, none below 0.5.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.segmenters.grabcut import GrabCutSegmenter  # noqa: E402


def load_photo(name: str) -> np.ndarray:
    """A photo scikit-image ships in its wheel (skimage.data reads it from disk)."""
    from skimage import data

    image = getattr(data, name)()
    return image[..., :3] if image.ndim == 3 else np.stack([image] * 3, -1)


def polygons_mask(polygons: list, size: tuple[int, int]) -> np.ndarray:
    canvas = Image.new("L", (size[1], size[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        draw.polygon([tuple(p) for p in poly], fill=1, outline=1)
    return np.asarray(canvas, bool)


def padded_box(mask: np.ndarray, pad: float) -> list[float]:
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    dx, dy = pad * (x1 - x0), pad * (y1 - y0)
    h, w = mask.shape
    return [max(0.0, x0 - dx), max(0.0, y0 - dy), min(w, x1 + dx), min(h, y1 + dy)]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--masks", type=Path, default=ROOT / "bench" / "data" / "hand_masks.json")
    parser.add_argument("--pad", type=float, default=0.1, help="padded-bbox boxes: this share")
    args = parser.parse_args()
    spec = json.loads(args.masks.read_text())
    segmenter = GrabCutSegmenter()
    rows, scores = [], {"hand": [], "pad": []}
    for obj in spec["objects"]:
        image = load_photo(obj["image"])
        truth = polygons_mask(obj["polygons"], image.shape[:2])
        for kind, box in (("hand", obj["box"]), ("pad", padded_box(truth, args.pad))):
            t0 = time.perf_counter()
            seg = segmenter.segment_one(image, {"box": [float(v) for v in box]}, 0)
            seconds = time.perf_counter() - t0
            score = iou(seg.mask, truth)
            scores[kind].append(score)
            fill = truth.sum() / ((box[2] - box[0]) * (box[3] - box[1]))
            rows.append((obj["image"], obj["name"], kind, box, fill, score, seconds, seg.notes))
    print(f"GrabCut ({segmenter.version}), loose boxes vs hand masks ({args.masks.name})\n")
    print("| photo | object | box | box | object / box | IoU | s | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for image, name, kind, box, fill, score, seconds, notes in rows:
        label = "drawn by hand" if kind == "hand" else f"bbox + {args.pad:.0%}"
        coords = ", ".join(f"{v:.0f}" for v in box)
        print(f"| {image} | {name} | {label} | [{coords}] | {fill:.2f} | {score:.3f} | "
              f"{seconds:.2f} | {'; '.join(notes) or '-'} |")  # fmt: skip
    print()
    for kind, values in scores.items():
        label = "drawn by hand" if kind == "hand" else f"bbox + {args.pad:.0%}"
        print(f"boxes {label}: mean IoU {np.mean(values):.3f}, min {np.min(values):.3f} "
              f"over {len(values)} objects")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
