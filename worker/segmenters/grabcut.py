"""GrabCut (OpenCV, CPU): masks from boxes and clicked points, no weights.

Each prompt is cut on a crop around it, resampled so its longer side is at most
``WORK_SIDE`` pixels (GrabCut's cost grows with pixels, its accuracy hardly). Outside the box
is background. A box is cut first from a "core" start: a sure core in the box's middle, a
probable middle and a rim that may be either. A loose box holds much background; started
from the whole box as "probably object" GrabCut learns that background into the object's
colour model and keeps it (on the bench's photos the core start was the better cut for
nearly every loose box). Only where both core tries collapse (nothing left, the whole box
kept, or little beyond the sure core) is the box cut from the whole box as "probably
object". Clicks alone are cut from both starts and the cut whose outline follows the
image's edges best is kept. Positive clicks are sure object, negative ones sure background.
If every try collapses, the mask is the ellipse inscribed in the box (or a disc around the
clicks) and the manifest says so: never an empty mask, never a box-shaped one unannounced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from worker.segmenters.base import Segment, inscribed_ellipse

WORK_SIDE = 400  # longest side of the crop GrabCut runs on
ITERATIONS = 5
MIN_FILL = 0.03  # a mask under this share of its box has collapsed
MAX_FILL = 0.95  # above it, the mask is the box itself: GrabCut found no edge inside
# GrabCut runs per prompt, in rounds: (from the box, or from a sure core), k-means seed. Of a
# round's cuts that did not collapse, the one whose outline follows the image's edges best is
# kept (GrabCut's k-means start decides a lot); the next round runs only if none is left. A box
# is cut from its core first (a loose box's background would seed the object's colours), clicks
# alone from both starts at once.
BOX_ROUNDS = (((False, 0), (False, 1)), ((True, 0), (True, 1)))
CLICK_ROUNDS = (((True, 0), (False, 0), (True, 1), (False, 1)),)

Box = tuple[float, float, float, float]


def _region(prompt: Mapping[str, Any], size: tuple[int, int]) -> Box:
    """The box the object lies in: the prompt's, or one grown around its positive clicks."""
    height, width = size
    if "box" in prompt:
        x0, y0, x1, y1 = prompt["box"]
        return float(x0), float(y0), float(x1), float(y1)
    on = np.array([p[:2] for p in prompt["points"] if p[2]], dtype=np.float64)
    grow = 0.35 * min(height, width) + 0.5 * float(np.ptp(on, axis=0).max(initial=0.0))
    x0, y0 = on.min(axis=0) - grow
    x1, y1 = on.max(axis=0) + grow
    return max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)


def _run_grabcut(crop: np.ndarray, init: np.ndarray, seed: int) -> np.ndarray | None:
    """GrabCut from a label mask; None where OpenCV refuses (no background or no object)."""
    labels = init.copy()
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(seed)  # its GMMs start from k-means: the same input, the same mask
    try:
        cv2.grabCut(crop, labels, None, bgd, fgd, ITERATIONS, cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        return None
    return (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)


def _clean(mask: np.ndarray, seeds: list[tuple[int, int]]) -> np.ndarray:
    """Specks removed; the components holding a positive click, else the large ones."""
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, comp, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return mask.astype(bool)
    keep = {int(comp[y, x]) for x, y in seeds if comp[y, x] > 0}
    if not keep:
        areas = stats[1:, cv2.CC_STAT_AREA]
        keep = {i + 1 for i, a in enumerate(areas) if a >= 0.15 * areas.max()}
    return np.isin(comp, sorted(keep))


def _fill_holes(mask: np.ndarray, open_sides: tuple[bool, bool, bool, bool]) -> np.ndarray:
    """``mask`` with every background region it encloses filled. A region reaching a side of
    the crop counts as outside only where that side is not the photo's own edge
    (``open_sides``: left, top, right, bottom): an object cut by the frame still closes
    there."""
    height, width = mask.shape
    outside = np.zeros((height + 2, width + 2), np.uint8)
    outside[1:-1, 1:-1] = ~mask
    left, top, right, bottom = open_sides
    outside[:, 0] = 1 if left else 0
    outside[0, :] = 1 if top else 0
    outside[:, -1] = 1 if right else 0
    outside[-1, :] = 1 if bottom else 0
    count, comp = cv2.connectedComponents(outside, connectivity=4)
    border = np.concatenate([comp[0], comp[-1], comp[:, 0], comp[:, -1]])
    reached = np.unique(border[np.concatenate([outside[0], outside[-1], outside[:, 0],
                                               outside[:, -1]]) > 0])  # fmt: skip
    return mask | ~np.isin(comp[1:-1, 1:-1], reached)


def _edge_strength(crop: np.ndarray) -> np.ndarray:
    """Colour gradient magnitude, 0..1 (the image's edges)."""
    lab = cv2.cvtColor(crop, cv2.COLOR_RGB2LAB).astype(np.float32)
    gx, gy = cv2.Sobel(lab, cv2.CV_32F, 1, 0), cv2.Sobel(lab, cv2.CV_32F, 0, 1)
    magnitude = np.sqrt((gx**2 + gy**2).sum(axis=2))
    return magnitude / (magnitude.max() or 1.0)


def _boundary_contrast(mask: np.ndarray, edges: np.ndarray) -> float:
    """Mean edge strength along the mask's outline: how well it follows the image's edges."""
    m = mask.astype(np.uint8)
    outline = (
        cv2.dilate(m, np.ones((3, 3), np.uint8)) - cv2.erode(m, np.ones((3, 3), np.uint8))
    ) > 0
    return float(edges[outline].mean()) if outline.any() else 0.0


class GrabCutSegmenter:
    """Boxes and points to masks with OpenCV's GrabCut; reads no text."""

    name = "grabcut"
    version = f"opencv-{cv2.__version__}"
    prompt_kinds = frozenset({"box", "points"})

    def setup(self) -> None:
        """Nothing to load."""

    def segment(self, image: np.ndarray, prompts: Sequence[Mapping[str, Any]]) -> list[Segment]:
        """One mask per prompt, in order (GrabCut has no batch: one cut each)."""
        return [self.segment_one(image, prompt, i) for i, prompt in enumerate(prompts)]

    def segment_one(self, image: np.ndarray, prompt: Mapping[str, Any], index: int) -> Segment:
        """The mask of one box and/or points prompt."""
        if "text" in prompt:
            raise ValueError("grabcut reads no text prompts")  # refused at submit already
        height, width = image.shape[:2]
        box = _region(prompt, (height, width))
        bw, bh = box[2] - box[0], box[3] - box[1]
        margin = max(8.0, 0.15 * max(bw, bh))
        cx0, cy0 = int(max(0, np.floor(box[0] - margin))), int(max(0, np.floor(box[1] - margin)))
        cx1 = int(min(width, np.ceil(box[2] + margin)))
        cy1 = int(min(height, np.ceil(box[3] + margin)))
        scale = min(1.0, WORK_SIDE / max(cx1 - cx0, cy1 - cy0))
        cw, ch = max(1, round((cx1 - cx0) * scale)), max(1, round((cy1 - cy0) * scale))
        crop = cv2.resize(
            np.ascontiguousarray(image[cy0:cy1, cx0:cx1, :3]),
            (cw, ch),
            interpolation=cv2.INTER_AREA,
        )
        local: Box = (
            (box[0] - cx0) * scale,
            (box[1] - cy0) * scale,
            (box[2] - cx0) * scale,
            (box[3] - cy0) * scale,
        )
        points = [
            (float((x - cx0) * scale), float((y - cy0) * scale), int(label))
            for x, y, label in prompt.get("points", [])
        ]
        seeds = [
            (min(cw - 1, max(0, int(x))), min(ch - 1, max(0, int(y))))
            for x, y, label in points
            if label
        ]
        yy, xx = np.mgrid[:ch, :cw]
        inside = (xx + 0.5 >= local[0]) & (xx + 0.5 <= local[2])
        inside &= (yy + 0.5 >= local[1]) & (yy + 0.5 <= local[3])
        box_area = float(inside.sum()) or 1.0
        open_sides = (cx0 > 0, cy0 > 0, cx1 < width, cy1 < height)
        radius = max(2, round(0.015 * np.hypot(cw, ch)))

        def labelled(first: bool) -> np.ndarray:
            init = np.full((ch, cw), cv2.GC_BGD, np.uint8)
            if first:
                init[inside] = cv2.GC_PR_FGD
            else:  # a sure core, a probable middle and a rim that may be either
                init[inside] = cv2.GC_PR_BGD
                init[inscribed_ellipse((ch, cw), local, 0.85) & inside] = cv2.GC_PR_FGD
                init[inscribed_ellipse((ch, cw), local, 0.3) & inside] = cv2.GC_FGD
            if "box" not in prompt:  # clicks only: the region is a guess, all of it open
                init[inside] = cv2.GC_PR_BGD if first else init[inside]
                for x, y in seeds:
                    cv2.circle(init, (x, y), 4 * radius, int(cv2.GC_PR_FGD), -1)
            if not (init == cv2.GC_BGD).any():  # the box is the whole image: a rim
                rim = max(1, round(0.02 * max(cw, ch)))
                init[:rim, :] = init[-rim:, :] = cv2.GC_PR_BGD
                init[:, :rim] = init[:, -rim:] = cv2.GC_PR_BGD
            for x, y, label in points:
                value = cv2.GC_FGD if label else cv2.GC_BGD
                cv2.circle(init, (round(x), round(y)), radius, int(value), -1)
            return init

        notes: list[str] = []
        edges = _edge_strength(crop)
        clicked_off = np.zeros((ch, cw), np.uint8)  # negative clicks stay out, holes or not
        for x, y, label in points:
            if not label:
                cv2.circle(clicked_off, (round(x), round(y)), radius, 1, -1)
        clicked_off = clicked_off.astype(bool)
        core_area = float((inscribed_ellipse((ch, cw), local, 0.3) & inside).sum())
        candidates = []  # (boundary contrast, mask, which initialisation)
        box_shaped = None
        for tries in BOX_ROUNDS if "box" in prompt else CLICK_ROUNDS:
            if candidates:
                break
            for first, seed in tries:
                cut = _run_grabcut(crop, labelled(first), seed)
                if cut is not None:
                    cut = _fill_holes(_clean(cut & inside, seeds), open_sides)
                    cut &= inside & ~clicked_off
                fill = float(cut.sum()) / box_area if cut is not None else 0.0
                which = "box" if first else "core"
                # From the core, a cut that kept little beyond the core itself found no edge.
                core_only = not first and cut is not None and cut.sum() < 1.25 * core_area
                if MIN_FILL <= fill <= MAX_FILL and not core_only:
                    candidates.append((_boundary_contrast(cut, edges), cut, which))
                else:
                    what = "left nothing" if fill < MIN_FILL else f"kept {fill:.0%} of the box"
                    what = "kept only its sure core" if core_only and fill >= MIN_FILL else what
                    notes.append(f"grabcut from the {which} initialisation (seed {seed}) {what}")
                    if fill > MAX_FILL:
                        box_shaped = cut
        mask = None
        if candidates:
            contrast, mask, which = max(candidates, key=lambda c: c[0])
        elif box_shaped is not None:
            mask = box_shaped  # a box-shaped mask, said so
            notes.append("the mask fills its box: GrabCut found no edge inside it")
        fallback = None
        if mask is None:
            mask = inscribed_ellipse((ch, cw), local, 1.0) & inside
            fallback = "ellipse"
            notes.append("the mask is the ellipse inscribed in the box, not a segmentation")
        full = np.zeros((height, width), bool)
        up = cv2.resize(
            mask.astype(np.float32), (cx1 - cx0, cy1 - cy0), interpolation=cv2.INTER_LINEAR
        )
        full[cy0:cy1, cx0:cx1] = up >= 0.5
        if not full.any():  # a sliver box at a low resolution: its centre pixel at least
            full[
                min(height - 1, int((box[1] + box[3]) / 2)),
                min(width - 1, int((box[0] + box[2]) / 2)),
            ] = True
        return Segment(full, index, None, tuple(notes), fallback)
