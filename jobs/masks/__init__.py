"""Decode object masks given in any supported format into one (N, H, W) bool array.

This module holds the public functions; each format family has its own module: ``binary``
(arrays, nested lists, PNG), ``polygons`` (flat and points), ``rle``, ``coco`` (files), and
``detect`` (guessing the format); ``common`` holds the limits, types and errors they share.

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

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jobs.errors import ErrorCode, Sam3dError
from jobs.masks.binary import _binary_items, _png_items
from jobs.masks.coco import _coco_items
from jobs.masks.common import (
    _MALFORMED,
    DEFAULT_MAX_MASKS,
    MASK_FORMATS,
    CocoImageAmbiguous,
    MakeMask,
    MaskStats,
    Size,
    _check_image_size,
    _invalid,
)
from jobs.masks.detect import _guess_format
from jobs.masks.polygons import _points_items, _polygon_items, _rasterise, _rasterise_rle
from jobs.masks.rle import (
    RleMasks,
    _decode_rle,
    _rle_checked,
    _rle_items,
    encode_masks_rle,
    rle_stats,
)

__all__ = [
    "DEFAULT_MAX_MASKS",
    "MASK_FORMATS",
    "CocoImageAmbiguous",
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


def _counted_items(mask_input, size, mask_format, image_id, file_name, max_masks: int) -> list:
    """The objects of ``mask_input``: at least one, at most ``max_masks``."""
    items = _items_for(mask_input, size, mask_format, image_id, file_name)
    if not items:
        raise _invalid("mask_input holds no objects")
    if len(items) > max_masks:
        raise Sam3dError(
            ErrorCode.TOO_MANY_MASKS,
            f"mask_input holds {len(items)} objects; the limit is {max_masks}",
        )
    return items


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
        items = _counted_items(mask_input, size, mask_format, image_id, file_name, max_masks)
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
        items = _counted_items(mask_input, size, mask_format, image_id, file_name, max_masks)
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
