"""Segmenters: prompts (boxes, points, text) in, one mask per object out, on the worker.

``get_segmenter`` builds one by name, chosen like the 3D backend (``SAM3D_SEGMENTER``);
``sam3`` imports torch and Meta's ``sam3`` package only when set up.
"""

from __future__ import annotations

from jobs.errors import ErrorCode, Sam3dError
from jobs.prompts import SEGMENTERS
from jobs.settings import Settings
from worker.segmenters.base import Segment, Segmenter

__all__ = ["SEGMENTERS", "Segment", "Segmenter", "get_segmenter"]


def get_segmenter(name: str, settings: Settings | None = None) -> Segmenter:
    """A segmenter by name (not yet set up; nothing heavy is imported yet)."""
    if name == "grabcut":
        from worker.segmenters.grabcut import GrabCutSegmenter

        return GrabCutSegmenter()
    if name == "sam3":
        from worker.segmenters.sam3 import Sam3Segmenter

        return Sam3Segmenter(settings or Settings())
    raise Sam3dError(
        ErrorCode.UNKNOWN_SEGMENTER, f"unknown segmenter {name!r}; known: {', '.join(SEGMENTERS)}"
    )
