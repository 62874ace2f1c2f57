"""What every mask format shares: limits, types, the errors, structure checks."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TypedDict

import numpy as np

from jobs.errors import ErrorCode, Sam3dError

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


class CocoImageAmbiguous(Sam3dError):
    """``invalid_mask``: a COCO file of several images, and none chosen."""


def _invalid(message: str) -> Sam3dError:
    return Sam3dError(ErrorCode.INVALID_MASK, message)


def _mismatch(label: str, got: Sequence[int], size: Size) -> Sam3dError:
    return Sam3dError(
        ErrorCode.MASK_SIZE_MISMATCH,
        f"{label} is {int(got[0])}x{int(got[1])} (HxW) but the image is {size[0]}x{size[1]}",
    )


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
