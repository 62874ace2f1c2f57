"""Guessing the format of a ``mask_input`` sent without ``mask_format``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jobs.masks.common import (
    _SEQUENCE_TYPES,
    _STR_OR_BYTES,
    Size,
    _depth,
    _invalid,
    _is_zero_one,
    _numeric_array,
)


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
