"""COCO run-length encoding of binary masks, in numpy alone (no pycocotools).

The string form is COCO's compressed RLE (``pycocotools.mask.encode`` writes the same
bytes): runs in column-major order starting with zeros, each count after the second stored
as the difference to the count two before, in 5-bit groups offset by 48.
"""

from __future__ import annotations

from typing import Any


def _counts(mask: Any) -> list[int]:
    import numpy as np

    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return [0]
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], changes, [flat.size]))).tolist()
    return [0, *counts] if flat[0] else counts


def counts_to_string(counts: list[int]) -> str:
    """COCO's compressed form of uncompressed RLE ``counts``."""
    out = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: negative differences end at -1
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def encode_rle(mask: Any) -> dict[str, Any]:
    """``{"size": [H, W], "counts": str}`` of one (H, W) mask (nonzero is set)."""
    height, width = mask.shape
    return {"size": [int(height), int(width)], "counts": counts_to_string(_counts(mask))}


def encode_masks_rle(masks: Any) -> list[dict[str, Any]]:
    """Compressed RLE of every mask of an (H, W) or (N, H, W) array."""
    if masks.ndim == 2:
        masks = masks[None]
    return [encode_rle(m) for m in masks]
