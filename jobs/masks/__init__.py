"""Decode object masks given in any supported format into one (N, H, W) bool array.

Formats (``mask_format`` names; each covers one or several objects):

- ``binary``: a numpy (H, W) or (N, H, W) array, a list of (H, W) arrays, an (H, W) nested
  list or a list of them. Bool is taken as is, integers as ``> 0``, floats as ``> 0.5``.
- ``png``: PNG bytes, a base64 PNG string (an optional ``data:image/png;base64,`` prefix is
  allowed), or a list of those, one object each. A non-constant alpha channel means
  ``alpha > 0``; palette images mean ``index > 0``; otherwise the grey level (the brightest
  channel for RGB) means ``> 0`` when the mask's maximum is at most 1, else ``>= 128``
  (``>= 32768`` for 16-bit).
- ``polygon``: COCO flat polygons. ``[x1, y1, x2, y2, ...]`` is one object;
  ``[[...], [...]]`` is one object per polygon; ``[[[...], [...]], [[...]]]`` is one object
  per entry, each the union of its polygons (like a COCO ``segmentation``).
- ``points``: ``[[x1, y1], [x2, y2], ...]`` is one object; a list of those, one object each.
- ``rle``: ``{"counts": str | list[int], "size": [H, W]}`` or a list of those. String
  counts are COCO compressed RLE, list counts uncompressed (column-major, zeros first).
- ``coco``: a COCO dataset dict. One image is chosen by ``image_id``, else by ``file_name``
  (matched on basenames), else automatically when the file holds exactly one image; each
  of its annotations (polygons or RLE, crowd or not) is one object, in file order.

Without ``mask_format`` the format is guessed from the structure:

- numpy array -> binary; bytes -> png; str -> png (base64);
- dict with ``annotations`` -> coco; dict with ``counts`` and ``size`` -> rle;
- list of dicts -> rle; list of str/bytes -> png; list of numpy arrays -> binary;
- nested lists of numbers, by depth:

  - depth 1 -> one flat polygon;
  - depth 2 -> one binary mask if rectangular with shape (H, W) and only 0/1 values;
    else one points polygon if every inner list has 2 values; else, if rectangular with
    only 0/1 values, a binary mask of the wrong size (``mask_size_mismatch``: no real
    polygon has every vertex in the unit square); else one flat polygon per inner list;
  - depth 3 -> N binary masks if every entry is a 0/1 (H, W) grid; else points polygons
    if every innermost list has 2 values; else, if every entry is a rectangular 0/1
    grid, binary masks of the wrong size (``mask_size_mismatch``); else objects each made
    of several flat polygons;
  - deeper -> ``invalid_mask``.

Rules for every format: binary, PNG and RLE masks must have the image's size (else
``mask_size_mismatch``); polygons are rasterised at the image size with pycocotools, parts
outside the image being cut off; a polygon needs at least 3 points, an even number of
finite numeric coordinates. No objects at all (an empty list, a COCO image without
annotations) is ``invalid_mask``; an object with no pixel set is ``empty_mask``; more than
``max_masks`` objects is ``too_many_masks``. Anything else malformed is ``invalid_mask``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, TypedDict

import numpy as np
from PIL import Image, PngImagePlugin
from pycocotools import mask as mask_utils

from jobs.errors import ErrorCode, Sam3dError

__all__ = [
    "MASK_FORMATS",
    "MaskStats",
    "RleMasks",
    "decode_masks",
    "decode_masks_rle",
    "encode_masks_rle",
    "load_mask_file",
    "load_mask_files",
    "mask_stats",
    "rle_stats",
]

MASK_FORMATS: tuple[str, ...] = ("binary", "png", "polygon", "points", "rle", "coco")

DEFAULT_MAX_MASKS = 64
# What decoding malformed input can raise, turned into one invalid_mask answer.
_MALFORMED = (
    TypeError,
    ValueError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    RecursionError,
)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Polygon coordinates beyond this are refused: they are never meant, and would overflow
# the clipping arithmetic.
_MAX_COORDINATE = 1e9
# pycocotools' polygon raster costs time and memory in proportion to the perimeter in
# pixels, so a polygon reaching further outside the image than its own size (plus this)
# is clipped first. Nearer ones go to pycocotools untouched, pixel-exact with COCO tools.
_CLIP_MARGIN = 2.0
_RLE_MAX_GROUP = 7  # 7 x 5 bits: far above any count an image of < 2**32 pixels needs

_BYTES_TYPES = (bytes, bytearray, memoryview)
_SEQUENCE_TYPES = (list, tuple)
_SEQ_OR_ARRAY = (list, tuple, np.ndarray)
_STR_OR_BYTES = (str, bytes, bytearray, memoryview)

Size = tuple[int, int]
# Decodes one object lazily (after the object count is checked) into an (H, W) array whose
# nonzero pixels are the mask; pycocotools' 0/1 uint8 is kept as is, to skip a copy.
MakeMask = Callable[[], np.ndarray]


class MaskStats(TypedDict):
    """Pixel area and COCO ``[x, y, w, h]`` bounding box of one mask."""

    area: int
    bbox: list[int]


# --------------------------------------------------------------------------- errors


class CocoImageAmbiguous(Sam3dError):
    """``invalid_mask``: a COCO file of several images, and none chosen."""


def _invalid(message: str) -> Sam3dError:
    return Sam3dError(ErrorCode.INVALID_MASK, message)


def _mismatch(label: str, got: Sequence[int], size: Size) -> Sam3dError:
    return Sam3dError(
        ErrorCode.MASK_SIZE_MISMATCH,
        f"{label} is {int(got[0])}x{int(got[1])} (HxW) but the image is {size[0]}x{size[1]}",
    )


# --------------------------------------------------------------------------- structure


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def _depth(obj: object) -> int:
    """Nesting depth following first elements; a numpy array counts its dimensions."""
    depth = 0
    while isinstance(obj, _SEQ_OR_ARRAY):
        if isinstance(obj, np.ndarray):
            return depth + obj.ndim
        depth += 1
        if len(obj) == 0:
            return depth
        obj = obj[0]
    return depth


def _numeric_array(obj: object) -> np.ndarray | None:
    """``obj`` as a rectangular bool/int/float array, or None when ragged or not numeric."""
    try:
        arr = np.asarray(obj)
    except (ValueError, TypeError, OverflowError):
        return None
    return arr if arr.dtype.kind in "biuf" else None


def _is_zero_one(arr: np.ndarray) -> bool:
    if arr.dtype.kind == "b":
        return True
    return bool(np.all((arr == 0) | (arr == 1)))


# --------------------------------------------------------------------------- binary


def _binary_to_bool(value: object, size: Size, label: str) -> np.ndarray:
    arr = value if isinstance(value, np.ndarray) else _numeric_array(value)
    if arr is None or arr.dtype.kind not in "biuf":
        raise _invalid(f"{label} is not a rectangular array of numbers")
    if arr.ndim != 2:
        raise _invalid(f"{label} must be 2-D (H, W), got shape {tuple(arr.shape)}")
    if arr.shape != size:
        raise _mismatch(label, arr.shape, size)
    if arr.dtype.kind == "b":
        return arr
    if arr.dtype.kind == "f":
        return arr > 0.5
    return arr > 0


def _binary_items(obj: object, size: Size) -> list[MakeMask]:
    if isinstance(obj, np.ndarray):
        entries: list[object] = [obj]
    elif isinstance(obj, _SEQUENCE_TYPES):
        if not obj:
            return []
        one_mask = _depth(obj) == 2 and not any(isinstance(e, np.ndarray) for e in obj)
        entries = [obj] if one_mask else list(obj)
    else:
        raise _invalid(f"binary masks must be arrays or nested lists, not {type(obj).__name__}")

    items: list[MakeMask] = []
    for entry in entries:
        if isinstance(entry, np.ndarray) and entry.ndim == 3:
            if entry.dtype.kind not in "biuf":
                raise _invalid(f"binary masks must be numeric, got dtype {entry.dtype}")
            if entry.shape[1:] != size:
                raise _mismatch("binary masks", entry.shape[1:], size)
            for plane in entry:
                label = f"mask {len(items)}"
                items.append(functools.partial(_binary_to_bool, plane, size, label))
        else:
            label = f"mask {len(items)}"
            items.append(functools.partial(_binary_to_bool, entry, size, label))
    return items


# --------------------------------------------------------------------------- png


def _base64_bytes(text: str, label: str) -> bytes:
    text = text.strip()
    if text.startswith("data:"):
        header, sep, payload = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise _invalid(f"{label} is a data URL without a ';base64,' payload")
        text = payload
    text = "".join(text.split()).translate({ord("-"): "+", ord("_"): "/"})
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _invalid(f"{label} is not valid base64: {exc}") from exc


def _grey_to_bool(grey: np.ndarray, half: int) -> np.ndarray:
    if grey.size and grey.max() <= 1:
        return grey > 0
    return grey >= half


def _png_pixels_to_bool(im: PngImagePlugin.PngImageFile) -> np.ndarray:
    mode = im.mode
    if mode == "1":
        return np.array(im, dtype=bool)
    if mode == "P":
        return np.asarray(im) > 0
    if "A" in im.getbands():
        alpha = np.asarray(im.getchannel("A"))
        if alpha.min() != alpha.max():
            return alpha > 0
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _grey_to_bool(np.asarray(im), 32768)
    if mode in ("RGB", "RGBA"):
        # The brightest channel, so that a pure red or blue mask counts as set.
        return _grey_to_bool(np.asarray(im)[:, :, :3].max(axis=2), 128)
    grey = im if mode == "L" else im.convert("L")
    return _grey_to_bool(np.asarray(grey), 128)


def _png_to_bool(value: object, size: Size, label: str) -> np.ndarray:
    if isinstance(value, str):
        data = _base64_bytes(value, label)
    elif isinstance(value, _BYTES_TYPES):
        data = bytes(value)
    else:
        raise _invalid(f"{label} must be PNG bytes or a base64 string")
    if not data.startswith(_PNG_MAGIC):
        raise _invalid(f"{label} is not a PNG image")
    try:
        im = PngImagePlugin.PngImageFile(io.BytesIO(data))
    except Exception as exc:  # Pillow raises SyntaxError, OSError, ValueError...
        raise _invalid(f"{label} is not a readable PNG: {exc}") from exc
    try:
        width, height = im.size
        # Checked before decoding: a PNG must match the image, so no bomb gets through.
        if (height, width) != size:
            raise _mismatch(label, (height, width), size)
        im.load()
        return _png_pixels_to_bool(im)
    except Sam3dError:
        raise
    except Exception as exc:
        raise _invalid(f"{label} cannot be decoded as PNG: {exc}") from exc
    finally:
        im.close()


def _one_or_many(
    obj: object, single: type | tuple[type, ...], decode: Callable, size: Size, what: str
) -> list[MakeMask]:
    """One entry (of type ``single``) or a sequence of them, each decoded lazily."""
    if isinstance(obj, single):
        entries: list[object] = [obj]
    elif isinstance(obj, _SEQUENCE_TYPES):
        entries = list(obj)
    else:
        raise _invalid(f"{what}, not {type(obj).__name__}")
    return [functools.partial(decode, entry, size, f"mask {i}") for i, entry in enumerate(entries)]


def _png_items(obj: object, size: Size) -> list[MakeMask]:
    return _one_or_many(
        obj, _STR_OR_BYTES, _png_to_bool, size, "PNG masks must be bytes or base64 strings"
    )


# --------------------------------------------------------------------------- rle


def _rle_string_counts(counts: str | bytes, label: str) -> np.ndarray:
    """Decode COCO's compressed RLE string exactly as pycocotools does, validating it.

    Each count is LEB128-like: 6-bit characters offset by 48, 5 value bits each, 0x20 to
    continue, 0x10 in the last character for the sign; from the 4th count on, values are
    deltas from the count two places before.
    """
    try:
        raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    except UnicodeEncodeError as exc:
        raise _invalid(f"{label}: RLE counts string is not ASCII") from exc
    if not raw:
        return np.zeros(0, dtype=np.int64)
    vals = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if vals.min() < 0 or vals.max() > 63:
        raise _invalid(f"{label}: RLE counts string has characters outside '0'..'o'")
    more = (vals & 0x20) != 0
    if more[-1]:
        raise _invalid(f"{label}: RLE counts string is truncated")
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > _RLE_MAX_GROUP:
        raise _invalid(f"{label}: RLE counts string holds an impossibly large count")
    group = np.repeat(np.arange(len(ends)), lengths)
    shift = 5 * (np.arange(len(vals)) - starts[group])
    values = np.bitwise_or.reduceat((vals & 0x1F) << shift, starts)
    negative = (vals[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * lengths[negative])
    cnts = values.copy()
    cnts[1::2] = np.cumsum(values[1::2])
    cnts[2::2] = np.cumsum(values[2::2])
    return cnts


def _rle_size(rle: dict[str, Any], label: str) -> Size:
    size = rle.get("size")
    if (
        not isinstance(size, _SEQ_OR_ARRAY)
        or len(size) != 2
        or not all(_is_number(v) and float(v).is_integer() and v >= 0 for v in size)
    ):
        raise _invalid(f"{label}: RLE 'size' must be [H, W], got {size!r}")
    return int(size[0]), int(size[1])


def _decode_rle(rle: object, size: Size, label: str) -> np.ndarray:
    """An RLE input validated by ``_rle_checked`` (pycocotools trusts counts blindly and
    writes past its buffer when they overrun), decoded to an (H, W) bool array."""
    return _decode_c_order(_rle_checked(rle, size, label))


def _decode_c_order(rle: dict[str, Any]) -> np.ndarray:
    """pycocotools' decode as a C-ordered (H, W) bool array.

    pycocotools returns column-major uint8; numpy's strided copy into a row-major array
    costs ~10 ms at 2048x2048, Pillow's blocked transpose ~1.5 ms.
    """
    decoded = mask_utils.decode(rle)  # (H, W) Fortran order == (W, H) C order in memory
    height, width = decoded.shape
    if height == 0 or width == 0:
        return np.zeros((height, width), dtype=bool)
    image = Image.frombuffer("L", (height, width), decoded.T, "raw", "L", 0, 1)
    return np.asarray(image.transpose(Image.Transpose.TRANSPOSE)).view(bool)


def _rle_items(obj: object, size: Size) -> list[MakeMask]:
    return _one_or_many(obj, dict, _decode_rle, size, "RLE masks must be dicts or a list of dicts")


# --------------------------------------------------------------------------- polygons


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


# --------------------------------------------------------------------------- coco


def _basename(name: object) -> str:
    return PurePosixPath(str(name).replace("\\", "/")).name


def _same_id(a: object, b: object) -> bool:
    return a == b or (a is not None and b is not None and str(a) == str(b))


def _select_coco_image(
    images: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    image_id: int | None,
    file_name: str | None,
) -> tuple[object, dict[str, Any] | None]:
    """Pick the COCO image whose annotations are wanted: (its id, its entry or None)."""
    if image_id is not None:
        if not images:
            return image_id, None
        found = [im for im in images if _same_id(im.get("id"), image_id)]
        if not found:
            raise _invalid(f"COCO file has no image with id {image_id!r}")
        entry = found[0]
        if file_name is not None and _basename(entry.get("file_name", "")) != _basename(file_name):
            raise _invalid(
                f"COCO image {image_id!r} is {entry.get('file_name')!r}, not {file_name!r}"
            )
        return entry.get("id"), entry
    if file_name is not None:
        wanted = _basename(file_name)
        found = [im for im in images if _basename(im.get("file_name", "")) == wanted]
        if not found:
            raise _invalid(f"COCO file has no image named {wanted!r}")
        if len(found) > 1:
            raise _invalid(f"COCO file has {len(found)} images named {wanted!r}; pass image_id")
        return found[0].get("id"), found[0]
    if len(images) == 1:
        return images[0].get("id"), images[0]
    if not images:
        ids: list[object] = []
        for ann in annotations:
            if not any(_same_id(ann.get("image_id"), seen) for seen in ids):
                ids.append(ann.get("image_id"))
        if len(ids) == 1:
            return ids[0], None
        if not ids:
            raise _invalid("COCO file holds no annotations")
        raise _invalid(f"COCO annotations refer to {len(ids)} images; pass image_id to choose one")
    raise CocoImageAmbiguous(
        ErrorCode.INVALID_MASK,
        f"COCO file holds {len(images)} images; pass image_id or file_name to choose one",
    )


def _annotation_item(ann: dict[str, Any], size: Size, label: str) -> MakeMask:
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        return functools.partial(_decode_rle, seg, size, label)
    if isinstance(seg, _SEQUENCE_TYPES) and seg:
        polys = [seg] if _depth(seg) == 1 else list(seg)
        return _polygon_object(
            [_flat_polygon(p, f"{label} polygon {j}") for j, p in enumerate(polys)], size
        )
    raise _invalid(f"{label} has no usable 'segmentation' (polygons or RLE)")


def _coco_items(
    obj: object, size: Size, image_id: int | None, file_name: str | None
) -> list[MakeMask]:
    if not isinstance(obj, dict):
        raise _invalid(f"a COCO file must be a JSON object, not {type(obj).__name__}")
    annotations = obj.get("annotations")
    images = obj.get("images", [])
    if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
        raise _invalid("COCO 'annotations' must be a list of objects")
    if not isinstance(images, list) or not all(isinstance(im, dict) for im in images):
        raise _invalid("COCO 'images' must be a list of objects")
    chosen, entry = _select_coco_image(images, annotations, image_id, file_name)
    if entry is not None and "height" in entry and "width" in entry:
        coco_size = (entry["height"], entry["width"])
        if not all(_is_number(v) for v in coco_size):
            raise _invalid(f"COCO image {chosen!r} has a non-numeric height or width")
        if (int(coco_size[0]), int(coco_size[1])) != size:
            raise _mismatch(f"COCO image {chosen!r}", coco_size, size)
    selected = [ann for ann in annotations if _same_id(ann.get("image_id"), chosen)]
    if not selected:
        raise _invalid(f"COCO image {chosen!r} has no annotations")
    return [
        _annotation_item(ann, size, f"mask {i} (COCO annotation id {ann.get('id')!r})")
        for i, ann in enumerate(selected)
    ]


# --------------------------------------------------------------------------- guessing


def _guess_nested(obj: Sequence[Any], size: Size) -> str:
    depth = _depth(obj)
    if depth == 1:
        return "polygon"
    if depth == 2:
        arr = _numeric_array(obj)
        if arr is not None and arr.ndim == 2 and arr.size and _is_zero_one(arr):
            if arr.shape == size:
                return "binary"
            if arr.shape[1] != 2:
                return "binary"  # a 0/1 grid of the wrong size: decoding reports the sizes
        if all(isinstance(p, _SEQUENCE_TYPES) and len(p) == 2 for p in obj):
            return "points"
        return "polygon"
    if depth == 3:
        grids_01 = True
        all_match = True
        for entry in obj:
            arr = _numeric_array(entry)
            if arr is None or arr.ndim != 2 or not arr.size or not _is_zero_one(arr):
                grids_01 = False
                break
            all_match = all_match and arr.shape == size
        if grids_01 and all_match:
            return "binary"
        points = all(
            isinstance(entry, _SEQUENCE_TYPES)
            and all(isinstance(p, _SEQUENCE_TYPES) and len(p) == 2 for p in entry)
            for entry in obj
        )
        if points:
            return "points"
        if grids_01:
            return "binary"  # 0/1 grids of the wrong size: decoding reports the sizes
        return "polygon"
    raise _invalid(f"nested lists of depth {depth} are not a known mask format")


def _guess_format(obj: object, size: Size) -> str:
    if isinstance(obj, np.ndarray):
        return "binary"
    if isinstance(obj, _STR_OR_BYTES):
        return "png"
    if isinstance(obj, dict):
        if "annotations" in obj:
            return "coco"
        if "counts" in obj and "size" in obj:
            return "rle"
        raise _invalid(
            "a dict mask_input must be a COCO file ('annotations') or an RLE ('counts', 'size')"
        )
    if isinstance(obj, _SEQUENCE_TYPES):
        if not obj:
            return "polygon"  # no objects either way; reported as such
        if all(isinstance(e, dict) for e in obj):
            return "rle"
        if all(isinstance(e, _STR_OR_BYTES) for e in obj):
            return "png"
        if all(isinstance(e, np.ndarray) for e in obj):
            return "binary"
        if any(isinstance(e, (dict, *_STR_OR_BYTES)) for e in obj):
            raise _invalid("mask_input mixes entries of different kinds")
        return _guess_nested(obj, size)
    raise _invalid(f"mask_input of type {type(obj).__name__} is not a known mask format")


# --------------------------------------------------------------------------- public


def _check_image_size(image_size: object) -> Size:
    if (
        not isinstance(image_size, _SEQUENCE_TYPES)
        or len(image_size) != 2
        or not all(
            isinstance(v, int | np.integer) and not isinstance(v, bool) and v > 0
            for v in image_size
        )
    ):
        raise Sam3dError(
            ErrorCode.INVALID_REQUEST,
            f"image_size must be (H, W) positive integers, got {image_size!r}",
        )
    return int(image_size[0]), int(image_size[1])


def _items_for(
    mask_input: object,
    size: Size,
    mask_format: str | None,
    image_id: int | None,
    file_name: str | None,
) -> list[MakeMask]:
    if mask_format is None:
        fmt = _guess_format(mask_input, size)
    elif isinstance(mask_format, str) and mask_format.strip().lower() in MASK_FORMATS:
        fmt = mask_format.strip().lower()
    else:
        raise _invalid(
            f"unknown mask_format {mask_format!r}; valid formats: {', '.join(MASK_FORMATS)}"
        )
    if fmt == "binary":
        return _binary_items(mask_input, size)
    if fmt == "png":
        return _png_items(mask_input, size)
    if fmt == "polygon":
        return _polygon_items(mask_input, size)
    if fmt == "points":
        return _points_items(mask_input, size)
    if fmt == "rle":
        return _rle_items(mask_input, size)
    return _coco_items(mask_input, size, image_id, file_name)


def decode_masks(
    mask_input: object,
    image_size: tuple[int, int],
    *,
    mask_format: str | None = None,
    image_id: int | None = None,
    file_name: str | None = None,
    max_masks: int = DEFAULT_MAX_MASKS,
) -> np.ndarray:
    """Decode ``mask_input`` into an (N, H, W) bool array, objects in input order.

    ``image_size`` is (H, W). ``mask_format`` (one of :data:`MASK_FORMATS`) turns off
    guessing; ``image_id`` / ``file_name`` choose the image of a COCO file. Every failure
    is a ``Sam3dError`` (see the module docstring for the formats, rules and codes).
    """
    size = _check_image_size(image_size)
    try:
        items = _items_for(mask_input, size, mask_format, image_id, file_name)
        if not items:
            raise _invalid("mask_input holds no objects")
        if len(items) > max_masks:
            raise Sam3dError(
                ErrorCode.TOO_MANY_MASKS,
                f"mask_input holds {len(items)} objects; the limit is {max_masks}",
            )
        masks = np.zeros((len(items), *size), dtype=bool)
        for i, make in enumerate(items):
            masks[i] = make()
            if not masks[i].any():
                raise Sam3dError(ErrorCode.EMPTY_MASK, f"mask {i} is empty (no pixel set)")
        return masks
    except Sam3dError:
        raise
    except _MALFORMED as exc:
        raise _invalid(f"malformed mask_input: {type(exc).__name__}: {exc}") from exc


def encode_masks_rle(masks: np.ndarray) -> list[dict[str, Any]]:
    """Encode (N, H, W) (or one (H, W)) masks as JSON-ready COCO compressed RLE dicts."""
    arr = np.asarray(masks)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise _invalid(f"masks must be (N, H, W) or (H, W), got shape {tuple(arr.shape)}")
    height, width = int(arr.shape[1]), int(arr.shape[2])
    encoded = []
    for plane in arr:
        # One plane at a time keeps the Fortran-ordered uint8 copy pycocotools needs small.
        bits = plane if plane.dtype == np.bool_ else plane != 0
        rle = mask_utils.encode(np.asfortranarray(bits.view(np.uint8)))
        encoded.append({"size": [height, width], "counts": rle["counts"].decode("ascii")})
    return encoded


def mask_stats(mask: np.ndarray) -> MaskStats:
    """Pixel area and COCO ``[x, y, w, h]`` bbox of one (H, W) mask (zeros when empty)."""
    arr = np.asarray(mask, dtype=bool)
    if arr.ndim != 2:
        raise _invalid(f"mask must be 2-D (H, W), got shape {tuple(arr.shape)}")
    rows = np.flatnonzero(arr.any(axis=1))
    cols = np.flatnonzero(arr.any(axis=0))
    if rows.size == 0:
        return {"area": 0, "bbox": [0, 0, 0, 0]}
    return {
        "area": int(np.count_nonzero(arr)),
        "bbox": [
            int(cols[0]),
            int(rows[0]),
            int(cols[-1] - cols[0] + 1),
            int(rows[-1] - rows[0] + 1),
        ],
    }


def load_mask_file(
    path: str | Path,
    image_size: tuple[int, int],
    *,
    mask_format: str | None = None,
    image_id: int | None = None,
    file_name: str | None = None,
    max_masks: int = DEFAULT_MAX_MASKS,
) -> np.ndarray:
    """Decode one mask file: ``.json`` (COCO or any JSON format), ``.png``, or ``.npy``.

    ``mask_format`` applies to ``.json`` files; ``.png`` is always PNG, ``.npy`` binary.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".png", ".npy"):
        raise _invalid(f"mask file {path} has an unknown extension; use .json, .png or .npy")
    try:
        if suffix == ".json":
            mask_input: object = json.loads(path.read_bytes())
        elif suffix == ".png":
            mask_input = path.read_bytes()
            mask_format = "png"
        else:
            mask_input = np.load(path, allow_pickle=False)
            mask_format = "binary"
    except OSError as exc:
        raise _invalid(f"cannot read mask file {path}: {exc.strerror or exc}") from exc
    except (ValueError, EOFError, RecursionError) as exc:  # bad JSON, bad or pickled .npy
        raise _invalid(f"cannot parse mask file {path}: {exc}") from exc
    return decode_masks(
        mask_input,
        image_size,
        mask_format=mask_format,
        image_id=image_id,
        file_name=file_name,
        max_masks=max_masks,
    )


def load_mask_files(
    paths: Sequence[str | Path],
    image_size: tuple[int, int],
    *,
    mask_format: str | None = None,
    image_id: int | None = None,
    file_name: str | None = None,
    max_masks: int = DEFAULT_MAX_MASKS,
) -> np.ndarray:
    """Decode several mask files and concatenate their objects in the given order."""
    if not paths:
        raise _invalid("no mask files given")
    parts: list[np.ndarray] = []
    total = 0
    for path in paths:
        part = load_mask_file(
            path,
            image_size,
            mask_format=mask_format,
            image_id=image_id,
            file_name=file_name,
            max_masks=max_masks,
        )
        parts.append(part)
        total += len(part)
        if total > max_masks:
            raise Sam3dError(
                ErrorCode.TOO_MANY_MASKS,
                f"mask files hold more than {max_masks} objects (the limit) after {path}",
            )
    return np.concatenate(parts, axis=0)


def rle_stats(rle: dict[str, Any]) -> MaskStats:
    """Area and COCO bbox of one compressed RLE, without decoding it to pixels."""
    coded = {"size": list(rle["size"]), "counts": rle["counts"]}
    if isinstance(coded["counts"], str):
        coded["counts"] = coded["counts"].encode("ascii")
    area = int(mask_utils.area(coded))
    if area == 0:
        return {"area": 0, "bbox": [0, 0, 0, 0]}
    return {"area": area, "bbox": [int(round(v)) for v in mask_utils.toBbox(coded)]}


class RleMasks(Sequence[np.ndarray]):
    """Masks kept as COCO RLE and decoded one at a time on access: N objects never cost
    N x H x W bytes at once."""

    def __init__(self, rles: Sequence[dict[str, Any]], image_size: tuple[int, int]) -> None:
        self.rles = list(rles)
        self.size = _check_image_size(image_size)
        for i, rle in enumerate(self.rles):  # cheap checks now; pixels only when asked
            if not isinstance(rle, dict) or _rle_size(rle, f"mask {i}") != self.size:
                raise _invalid(f"mask {i} is not an RLE of the image's size")

    def __len__(self) -> int:
        return len(self.rles)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return _decode_rle(self.rles[index], self.size, f"mask {index}")

    def stats(self, index: int) -> MaskStats:
        return rle_stats(self.rles[index])


# --------------------------------------------------------------------------- straight to RLE


def _compressed(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    return {
        "size": [int(rle["size"][0]), int(rle["size"][1])],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def _rle_checked(rle: object, size: Size, label: str) -> dict[str, Any]:
    """An RLE input with its size and counts checked, kept compressed."""
    if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
        raise _invalid(f"{label} must be a dict with 'counts' and 'size'")
    rle_size = _rle_size(rle, label)
    if rle_size != size:
        raise _mismatch(label, rle_size, size)
    height, width = size
    counts = rle["counts"]
    if isinstance(counts, str | bytes):
        cnts = _rle_string_counts(counts, label)
    elif isinstance(counts, _SEQ_OR_ARRAY):
        arr = _numeric_array(counts)
        if arr is None or arr.ndim != 1 or arr.dtype.kind not in "iu":
            if not (isinstance(counts, _SEQUENCE_TYPES) and len(counts) == 0):
                raise _invalid(f"{label}: RLE counts must be a list of integers")
            arr = np.zeros(0, dtype=np.int64)
        cnts = arr.astype(np.int64)
    else:
        raise _invalid(f"{label}: RLE counts must be a string or a list of integers")
    if cnts.size and cnts.min() < 0:
        raise _invalid(f"{label}: RLE counts must not be negative")
    if int(cnts.sum()) != height * width:
        raise _invalid(
            f"{label}: RLE counts cover {int(cnts.sum())} pixels but size {height}x{width} "
            f"has {height * width}"
        )
    if isinstance(counts, str | bytes):
        # Kept as sent: _rle_string_counts decoded it exactly as pycocotools will.
        raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
        return _compressed({"size": [height, width], "counts": raw})
    return _compressed(
        mask_utils.frPyObjects({"size": [height, width], "counts": cnts.tolist()}, height, width)
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


def _to_rle(make: MakeMask, size: Size) -> dict[str, Any]:
    """One decoded object as RLE: polygons and RLE inputs without ever making pixels."""
    func = getattr(make, "func", None)
    if func is _rasterise:
        return _rasterise_rle(*make.args)
    if func is _decode_rle:
        return _rle_checked(*make.args)
    return encode_masks_rle(make())[0]


def decode_masks_rle(
    mask_input: object,
    image_size: tuple[int, int],
    *,
    mask_format: str | None = None,
    image_id: int | None = None,
    file_name: str | None = None,
    max_masks: int = DEFAULT_MAX_MASKS,
) -> list[dict[str, Any]]:
    """Like :func:`decode_masks`, but each object as COCO compressed RLE (JSON-ready):
    polygons are rasterised straight to RLE and RLE inputs only validated, so N objects
    never cost N x H x W bytes. The same rules and error codes."""
    size = _check_image_size(image_size)
    try:
        items = _items_for(mask_input, size, mask_format, image_id, file_name)
        if not items:
            raise _invalid("mask_input holds no objects")
        if len(items) > max_masks:
            raise Sam3dError(
                ErrorCode.TOO_MANY_MASKS,
                f"mask_input holds {len(items)} objects; the limit is {max_masks}",
            )
        rles = []
        for i, make in enumerate(items):
            rle = _to_rle(make, size)
            if rle_stats(rle)["area"] == 0:
                raise Sam3dError(ErrorCode.EMPTY_MASK, f"mask {i} is empty (no pixel set)")
            rles.append(rle)
        return rles
    except Sam3dError:
        raise
    except _MALFORMED as exc:
        raise _invalid(f"malformed mask_input: {type(exc).__name__}: {exc}") from exc
