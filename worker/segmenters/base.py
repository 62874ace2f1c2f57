"""The segmenter interface: ``setup()`` once per process, ``segment()`` once per image with
every prompt of it (one batched call where the model batches)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Segment:
    """One object's mask, the prompt it came from and how sure the segmenter is."""

    mask: np.ndarray  # (H, W) bool, never empty
    prompt: int  # index into the job's prompts
    score: float | None  # the model's own score; None where it has none (GrabCut)
    # What the manifest must say when the mask is not simply the segmenter's answer:
    # a retry with another initialisation, a fallback shape, a mask that fills its box.
    notes: tuple[str, ...] = field(default=())
    fallback: str | None = None  # e.g. "ellipse": the mask is a stand-in, not a segmentation

    def to_dict(self) -> dict[str, Any]:
        """What the manifest keeps beside the mask's RLE."""
        entry: dict[str, Any] = {"prompt": self.prompt, "score": self.score}
        if self.notes:
            entry["notes"] = list(self.notes)
        if self.fallback:
            entry["fallback"] = self.fallback
        return entry


class Segmenter(Protocol):
    """Turns an image's prompts into masks."""

    name: str
    version: str
    prompt_kinds: frozenset[str]  # of "box", "points", "text"

    def setup(self) -> None:
        """Load weights and warm up; called once per worker process, before any job."""

    def segment(self, image: np.ndarray, prompts: Sequence[Mapping[str, Any]]) -> list[Segment]:
        """Masks for an (H, W, 3) uint8 image: one per box/points entry, in order, and every
        instance a text entry finds (up to its ``max_objects``, score ``>= min_score``)."""


def inscribed_ellipse(
    shape: tuple[int, int], box: Sequence[float], fraction: float = 1.0
) -> np.ndarray:
    """(H, W) bool mask of the ellipse inscribed in ``box`` (x0, y0, x1, y1), shrunk to
    ``fraction`` of its size: the segmenters' stand-in where a cut collapses."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    rx = max(0.5, fraction * (box[2] - box[0]) / 2)
    ry = max(0.5, fraction * (box[3] - box[1]) / 2)
    return ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1.0
