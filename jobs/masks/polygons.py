"""Polygons, COCO flat (``[x1, y1, ...]``) and points (``[[x, y], ...]``), rasterised
with pycocotools (pixel-exact with COCO tools)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from jobs.masks.common import (
    _SEQ_OR_ARRAY,
    _SEQUENCE_TYPES,
    MakeMask,
    Size,
    _depth,
    _invalid,
    _is_number,
)
from jobs.masks.rle import _compressed, _decode_c_order, encode_masks_rle

# Polygon coordinates beyond this are refused: they are never meant, and would overflow
# the clipping arithmetic.
_MAX_COORDINATE = 1e9

# pycocotools' polygon raster costs time and memory in proportion to the perimeter in
# pixels, so a polygon reaching further outside the image than its own size (plus this)
# is clipped first. Nearer ones go to pycocotools untouched, pixel-exact with COCO tools.
_CLIP_MARGIN = 2.0


def _flat_polygon(poly: object, label: str) -> np.ndarray:
    """Validate a flat ``[x1, y1, x2, y2, ...]`` polygon; return its (K, 2) vertices."""
    if isinstance(poly, np.ndarray):
        if poly.ndim != 1 or poly.dtype.kind not in "iuf":
            raise _invalid(f"{label} must be a flat list of numbers")
        coords = poly.astype(np.float64)
    elif isinstance(poly, _SEQUENCE_TYPES):
        if not all(_is_number(v) for v in poly):
            raise _invalid(f"{label} must be a flat list of numbers [x1, y1, x2, y2, ...]")
        coords = np.asarray(poly, dtype=np.float64)
    else:
        raise _invalid(f"{label} must be a list of coordinates, not {type(poly).__name__}")
    if coords.size % 2:
        raise _invalid(f"{label} has an odd number of coordinates ({coords.size})")
    if coords.size < 6:
        raise _invalid(f"{label} has {coords.size // 2} point(s); a polygon needs at least 3")
    if not np.all(np.isfinite(coords)):
        raise _invalid(f"{label} has non-finite coordinates")
    if np.abs(coords).max() > _MAX_COORDINATE:
        raise _invalid(f"{label} has coordinates beyond {_MAX_COORDINATE:g}")
    return coords.reshape(-1, 2)


def _points_polygon(points: object, label: str) -> np.ndarray:
    """Validate a ``[[x1, y1], [x2, y2], ...]`` polygon; return its (K, 2) vertices."""
    if isinstance(points, np.ndarray):
        if points.ndim != 2 or points.shape[1] != 2:
            raise _invalid(f"{label} must be a list of [x, y] points")
        return _flat_polygon(points.reshape(-1), label)
    if not isinstance(points, _SEQUENCE_TYPES):
        raise _invalid(f"{label} must be a list of [x, y] points, not {type(points).__name__}")
    flat: list[object] = []
    for point in points:
        if not isinstance(point, _SEQ_OR_ARRAY) or len(point) != 2:
            raise _invalid(f"{label} must be a list of [x, y] points")
        flat.extend(point)
    return _flat_polygon(flat, label)


def _clip_polygon(xy: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Sutherland-Hodgman: cut a polygon to an axis-aligned box (xmin, ymin, xmax, ymax)."""
    points = [(float(x), float(y)) for x, y in xy]
    edges = ((0, box[0], True), (0, box[2], False), (1, box[1], True), (1, box[3], False))
    for axis, bound, keep_above in edges:
        if not points:
            break
        clipped: list[tuple[float, float]] = []
        prev = points[-1]
        prev_in = (prev[axis] >= bound) == keep_above or prev[axis] == bound
        for cur in points:
            cur_in = (cur[axis] >= bound) == keep_above or cur[axis] == bound
            if cur_in != prev_in:
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                cross = [prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])]
                cross[axis] = bound
                clipped.append((cross[0], cross[1]))
            if cur_in:
                clipped.append(cur)
            prev, prev_in = cur, cur_in
        points = clipped
    return np.asarray(points, dtype=np.float64).reshape(-1, 2)


def _rasterise(polygons: list[np.ndarray], size: Size) -> np.ndarray:
    """Union of polygons rasterised at ``size`` by pycocotools, as an (H, W) 0/1 array."""
    height, width = size
    margin = max(height, width) + _CLIP_MARGIN
    box = (-margin, -margin, width + margin, height + margin)
    flat: list[list[float]] = []
    for xy in polygons:
        outside = (
            xy[:, 0].min() < box[0]
            or xy[:, 1].min() < box[1]
            or xy[:, 0].max() > box[2]
            or xy[:, 1].max() > box[3]
        )
        if outside:
            xy = _clip_polygon(xy, box)
        if len(xy) >= 3:
            flat.append(xy.reshape(-1).tolist())
    if not flat:
        return np.zeros(size, dtype=np.uint8)
    rles = mask_utils.frPyObjects(flat, height, width)
    return _decode_c_order(mask_utils.merge(rles))


def _polygon_object(polys: list[np.ndarray], size: Size) -> MakeMask:
    return functools.partial(_rasterise, polys, size)


def _polygon_items(obj: object, size: Size) -> list[MakeMask]:
    if not isinstance(obj, _SEQ_OR_ARRAY):
        raise _invalid(f"polygon masks must be lists of coordinates, not {type(obj).__name__}")
    depth = _depth(obj)
    if len(obj) == 0:
        return []
    if depth == 1:
        return [_polygon_object([_flat_polygon(obj, "polygon 0")], size)]
    if depth == 2:
        return [
            _polygon_object([_flat_polygon(poly, f"polygon {i}")], size)
            for i, poly in enumerate(obj)
        ]
    if depth == 3:
        items = []
        for i, polys in enumerate(obj):
            if not isinstance(polys, _SEQ_OR_ARRAY) or len(polys) == 0:
                raise _invalid(f"object {i} must be a non-empty list of flat polygons")
            items.append(
                _polygon_object(
                    [_flat_polygon(p, f"object {i} polygon {j}") for j, p in enumerate(polys)],
                    size,
                )
            )
        return items
    raise _invalid(f"polygon masks are nested at most 3 deep, got depth {depth}")


def _points_items(obj: object, size: Size) -> list[MakeMask]:
    if not isinstance(obj, _SEQ_OR_ARRAY):
        raise _invalid(f"points masks must be lists of [x, y], not {type(obj).__name__}")
    if len(obj) == 0:
        return []
    depth = _depth(obj)
    if depth == 2:
        return [_polygon_object([_points_polygon(obj, "polygon 0")], size)]
    if depth == 3:
        return [
            _polygon_object([_points_polygon(points, f"polygon {i}")], size)
            for i, points in enumerate(obj)
        ]
    raise _invalid(
        f"points masks are [[x, y], ...] or a list of those (depth 2 or 3), got depth {depth}"
    )


def _rasterise_rle(polygons: list[np.ndarray], size: Size) -> dict[str, Any]:
    """Union of polygons as one compressed RLE, never as pixels."""
    height, width = size
    margin = max(height, width) + _CLIP_MARGIN
    box = (-margin, -margin, width + margin, height + margin)
    flat: list[list[float]] = []
    for xy in polygons:
        if (
            xy[:, 0].min() < box[0]
            or xy[:, 1].min() < box[1]
            or xy[:, 0].max() > box[2]
            or xy[:, 1].max() > box[3]
        ):
            xy = _clip_polygon(xy, box)
        if len(xy) >= 3:
            flat.append(xy.reshape(-1).tolist())
    if not flat:
        return encode_masks_rle(np.zeros(size, dtype=bool))[0]
    return _compressed(mask_utils.merge(mask_utils.frPyObjects(flat, height, width)))
