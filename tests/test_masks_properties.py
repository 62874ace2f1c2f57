"""Properties of mask decoding: RLE round trips and polygon rasterisation."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jobs.errors import ErrorCode, Sam3dError
from jobs.masks import decode_masks, encode_masks_rle

SETTINGS = settings(max_examples=100, deadline=None)


# --------------------------------------------------------------------------- helpers


@st.composite
def mask_stacks(draw: st.DrawFn) -> np.ndarray:
    """(N, H, W) bool masks, each with at least one pixel set."""
    n = draw(st.integers(1, 4))
    h = draw(st.integers(1, 40))
    w = draw(st.integers(1, 40))
    masks = draw(hnp.arrays(np.bool_, (n, h, w)))
    for i in range(n):
        masks[i, draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = True
    return masks


def _column_major_runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts, by a plain walk down each column, zeros first."""
    h, w = mask.shape
    counts: list[int] = []
    value, run = False, 0
    for x in range(w):
        for y in range(h):
            if bool(mask[y, x]) == value:
                run += 1
            else:
                counts.append(run)
                value, run = not value, 1
    counts.append(run)
    return counts


def _raster(mask_input: object, size: tuple[int, int], fmt: str) -> np.ndarray:
    """One decoded object, or an all-False mask where the polygon covers no pixel."""
    try:
        out = decode_masks(mask_input, size, mask_format=fmt)
    except Sam3dError as exc:
        assert exc.code == ErrorCode.EMPTY_MASK, exc
        return np.zeros(size, dtype=bool)
    assert out.shape == (1, *size)
    return out[0]


def _convex_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Andrew's monotone chain, counter-clockwise, without collinear points."""
    pts = sorted(set(points))

    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, float]] = []
    upper: list[tuple[float, float]] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def _shoelace(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _perimeter(xy: np.ndarray) -> float:
    return float(np.linalg.norm(np.roll(xy, -1, axis=0) - xy, axis=1).sum())


def _centres_inside(xy: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Exact even-odd test of every pixel centre (x + 0.5, y + 0.5)."""
    py, px = np.mgrid[0 : size[0], 0 : size[1]] + 0.5
    inside = np.zeros(size, dtype=bool)
    for (x1, y1), (x2, y2) in zip(xy, np.roll(xy, -1, axis=0), strict=True):
        if y1 == y2:
            continue
        crosses = (y1 > py) != (y2 > py)
        with np.errstate(over="ignore"):  # nearly flat, far edges: +-inf compares right
            x_at = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (px < x_at)
    return inside


def _distance_to_boundary(xy: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    py, px = np.mgrid[0 : size[0], 0 : size[1]] + 0.5
    best = np.full(size, np.inf)
    for (x1, y1), (x2, y2) in zip(xy, np.roll(xy, -1, axis=0), strict=True):
        dx, dy = x2 - x1, y2 - y1
        length2 = dx * dx + dy * dy
        t = np.clip(((px - x1) * dx + (py - y1) * dy) / length2, 0, 1) if length2 else 0.0
        best = np.minimum(best, np.hypot(px - x1 - t * dx, py - y1 - t * dy))
    return best


sizes = st.tuples(st.integers(8, 48), st.integers(8, 48))


@st.composite
def convex_polygons(draw: st.DrawFn) -> tuple[tuple[int, int], np.ndarray]:
    """An image size and a convex polygon (K, 2) inside it, with some area."""
    h, w = draw(sizes)
    k = draw(st.integers(3, 10))
    xs = draw(st.lists(st.floats(0, w), min_size=k, max_size=k))
    ys = draw(st.lists(st.floats(0, h), min_size=k, max_size=k))
    hull = _convex_hull(list(zip(xs, ys, strict=True)))
    xy = np.asarray(hull, dtype=np.float64).reshape(-1, 2)
    assume(len(xy) >= 3 and _shoelace(xy) >= 1.0)
    return (h, w), xy


@st.composite
def star_polygons(draw: st.DrawFn) -> tuple[tuple[int, int], np.ndarray]:
    """A simple, often concave polygon that may reach far outside the image."""
    h, w = draw(sizes)
    cx = draw(st.floats(-w, 2 * w))
    cy = draw(st.floats(-h, 2 * h))
    k = draw(st.integers(3, 12))
    angles = sorted(draw(st.lists(st.floats(0, 2 * math.pi), min_size=k, max_size=k, unique=True)))
    scale = draw(st.sampled_from([1.0, 3.0, 1e3, 1e6]))
    radii = draw(st.lists(st.floats(1, max(h, w) * scale), min_size=k, max_size=k))
    xy = np.asarray(
        [(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii, strict=True)]
    )
    return (h, w), xy


# --------------------------------------------------------------------------- rle


@SETTINGS
@given(mask_stacks())
def test_rle_round_trip(masks: np.ndarray) -> None:
    rles = encode_masks_rle(masks)
    assert all(isinstance(r["counts"], str) and r["size"] == list(masks.shape[1:]) for r in rles)
    np.testing.assert_array_equal(decode_masks(rles, masks.shape[1:]), masks)


@SETTINGS
@given(mask_stacks())
def test_uncompressed_rle_built_by_hand_decodes(masks: np.ndarray) -> None:
    rles = [{"counts": _column_major_runs(m), "size": list(m.shape)} for m in masks]
    np.testing.assert_array_equal(decode_masks(rles, masks.shape[1:]), masks)
    np.testing.assert_array_equal(decode_masks(rles, masks.shape[1:], mask_format="rle"), masks)


# --------------------------------------------------------------------------- polygons


@SETTINGS
@given(sizes, st.data())
def test_integer_rectangles_round_trip(size: tuple[int, int], data: st.DataObject) -> None:
    h, w = size
    x0, x1 = sorted(data.draw(st.lists(st.integers(0, w), min_size=2, max_size=2, unique=True)))
    y0, y1 = sorted(data.draw(st.lists(st.integers(0, h), min_size=2, max_size=2, unique=True)))
    out = decode_masks([x0, y0, x1, y0, x1, y1, x0, y1], size)
    expected = np.zeros(size, dtype=bool)
    expected[y0:y1, x0:x1] = True
    assert int(out.sum()) == (x1 - x0) * (y1 - y0)
    np.testing.assert_array_equal(out[0], expected)


@SETTINGS
@given(convex_polygons())
def test_convex_polygon_forms_agree_and_fit(case: tuple[tuple[int, int], np.ndarray]) -> None:
    size, xy = case
    flat = _raster(xy.reshape(-1).tolist(), size, "polygon")
    points = _raster(xy.tolist(), size, "points")
    np.testing.assert_array_equal(flat, points)

    # The raster lies inside the polygon's bounding box, give or take a pixel.
    rows, cols = np.nonzero(flat)
    if rows.size:
        assert rows.min() >= math.floor(xy[:, 1].min()) - 1
        assert rows.max() <= math.ceil(xy[:, 1].max()) + 1
        assert cols.min() >= math.floor(xy[:, 0].min()) - 1
        assert cols.max() <= math.ceil(xy[:, 0].max()) + 1

    # Pixel area matches the true area up to an error along the boundary.
    tolerance = 0.5 * _perimeter(xy) + 1.0
    assert abs(int(flat.sum()) - _shoelace(xy)) <= tolerance


@SETTINGS
@given(convex_polygons())
def test_guessing_reads_flat_and_points_forms_alike(
    case: tuple[tuple[int, int], np.ndarray],
) -> None:
    size, xy = case
    try:
        flat = decode_masks(xy.reshape(-1).tolist(), size)
        points = decode_masks(xy.tolist(), size)
    except Sam3dError as exc:
        assert exc.code == ErrorCode.EMPTY_MASK
        return
    np.testing.assert_array_equal(flat, points)


@SETTINGS
@given(star_polygons())
def test_far_reaching_polygons_rasterise_like_exact_centres(
    case: tuple[tuple[int, int], np.ndarray],
) -> None:
    """Clipping far vertices changes nothing away from the boundary."""
    size, xy = case
    out = _raster(xy.reshape(-1).tolist(), size, "polygon")
    truth = _centres_inside(xy, size)
    away = _distance_to_boundary(xy, size) > 1.0
    np.testing.assert_array_equal(out[away], truth[away])
