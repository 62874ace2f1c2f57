"""COCO run-length encoding: decoding, validation kept compressed, encoding, stats."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from jobs.masks.common import (
    _SEQ_OR_ARRAY,
    _SEQUENCE_TYPES,
    MakeMask,
    MaskStats,
    Size,
    _check_image_size,
    _invalid,
    _is_number,
    _mismatch,
    _numeric_array,
    _one_or_many,
)

_RLE_MAX_GROUP = 7  # 7 x 5 bits: far above any count an image of < 2**32 pixels needs


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
        self._ahead: dict[int, np.ndarray] = {}  # decoded before they were asked for

    def decode_ahead(self, index: int, mask: np.ndarray | None = None) -> None:
        """Hold mask ``index`` decoded (``mask``, or decoded now) for its first access."""
        self._ahead[index] = self[index] if mask is None else mask

    def __len__(self) -> int:
        return len(self.rles)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        ahead = self._ahead.pop(index, None)  # handed out once: memory is not kept
        if ahead is not None:
            return ahead
        return _decode_rle(self.rles[index], self.size, f"mask {index}")

    def stats(self, index: int) -> MaskStats:
        return rle_stats(self.rles[index])


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
