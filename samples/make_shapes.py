"""Makes the bundled sample: a rendered still life and its COCO annotations.

Run ``python samples/make_shapes.py`` to regenerate ``shapes.jpg`` and ``shapes.coco.json``.
The masks come in three formats on purpose: RLE (the ball), a polygon (the box) and a
two-part polygon (the bottle: body and cap).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as coco_mask

HERE = Path(__file__).parent
W, H = 640, 480


def render() -> tuple[Image.Image, dict]:
    yy, xx = np.mgrid[:H, :W].astype(np.float32)
    sky = np.stack([150 + 60 * yy / H, 180 + 40 * yy / H, 230 - 20 * yy / H], -1)
    floor = np.stack([120 + 30 * (yy - 300) / H, 100 + 20 * (yy - 300) / H, 80 + 0 * yy], -1)
    img = np.where((yy < 300)[..., None], sky, floor)

    # A shaded red ball.
    cx, cy, r = 190, 270, 95
    d2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / r**2
    ball = d2 <= 1
    light = np.clip(1.1 - 0.6 * (((xx - cx + 35) ** 2 + (yy - cy + 40) ** 2) / r**2), 0.35, 1.1)
    img[ball] = np.stack([220 * light, 40 * light, 35 * light], -1)[ball]
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)

    box = [(330, 230), (470, 215), (490, 345), (345, 365)]
    draw.polygon(box, fill=(40, 90, 200))
    draw.polygon([(330, 230), (470, 215), (480, 280), (338, 295)], fill=(70, 120, 225))

    body = [(540, 380), (600, 380), (600, 220), (585, 190), (555, 190), (540, 220)]
    cap = [(557, 150), (583, 150), (583, 190), (557, 190)]
    draw.polygon(body, fill=(40, 150, 70))
    draw.polygon(cap, fill=(230, 230, 230))

    rle = coco_mask.encode(np.asfortranarray(ball.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")

    def flat(points: list[tuple[int, int]]) -> list[float]:
        return [float(c) for p in points for c in p]

    coco = {
        "info": {"description": "sam3d-jobs sample: a ball, a box and a bottle"},
        "images": [{"id": 1, "file_name": "shapes.jpg", "width": W, "height": H}],
        "categories": [
            {"id": 1, "name": "ball"},
            {"id": 2, "name": "box"},
            {"id": 3, "name": "bottle"},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": rle},
            {"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 0, "segmentation": [flat(box)]},
            {
                "id": 3,
                "image_id": 1,
                "category_id": 3,
                "iscrowd": 0,
                "segmentation": [flat(body), flat(cap)],
            },
        ],
    }
    return canvas, coco


if __name__ == "__main__":
    image, annotations = render()
    image.save(HERE / "shapes.jpg", quality=92)
    (HERE / "shapes.coco.json").write_text(json.dumps(annotations, indent=1) + "\n")
    print(f"wrote {HERE / 'shapes.jpg'} and {HERE / 'shapes.coco.json'}")
