"""Binary masks: numpy arrays, nested lists, and PNG (bytes, base64, files)."""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import PngImagePlugin

from jobs.encoding import decode_base64
from jobs.errors import Sam3dError
from jobs.masks.common import (
    _BYTES_TYPES,
    _PNG_MAGIC,
    _SEQUENCE_TYPES,
    _STR_OR_BYTES,
    MakeMask,
    Size,
    _depth,
    _invalid,
    _mismatch,
    _numeric_array,
    _one_or_many,
)


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


def _base64_bytes(text: str, label: str) -> bytes:
    try:
        return decode_base64(text)
    except ValueError as exc:
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


def _png_items(obj: object, size: Size) -> list[MakeMask]:
    return _one_or_many(
        obj, _STR_OR_BYTES, _png_to_bool, size, "PNG masks must be bytes or base64 strings"
    )
