"""A job's masks on the worker: stored ones, or made from its prompts once and kept.

A job submitted with prompts is segmented before any 3D work; its masks (``input/masks.json``,
COCO RLE) and what made each (``input/segments.json``: prompt index, score, notes) are stored
first, masks last, so a redelivered job finds them and does not segment again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from jobs.artifacts import INPUT_MASKS, INPUT_PROMPTS, INPUT_SEGMENTS
from jobs.errors import ErrorCode, Sam3dError
from jobs.masks import MaskStats, RleMasks, encode_masks_rle, rle_stats
from jobs.prompts import prompt_kinds
from worker.segmenters.base import Segmenter

JSON_TYPE = "application/json"


class _Files(Protocol):
    def get(self, path: str) -> bytes: ...

    def put(self, path: str, data: bytes, content_type: str) -> None: ...


class JobMasks(RleMasks):
    """RLE masks whose stats (the manifest's ``objects[i].mask``) carry the RLE itself and,
    for prompted jobs, the prompt index, score and notes of each."""

    def __init__(
        self,
        rles: Sequence[dict[str, Any]],
        image_size: tuple[int, int],
        segments: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__(rles, image_size)
        self.segments = list(segments) if segments is not None else None

    def stats(self, index: int) -> MaskStats:
        stats: dict[str, Any] = dict(rle_stats(self.rles[index]))
        stats["rle"] = {
            "size": list(self.rles[index]["size"]),
            "counts": self.rles[index]["counts"],
        }
        if self.segments is not None:
            stats.update(self.segments[index])
        return stats  # type: ignore[return-value]


def segment_prompts(
    image: np.ndarray,
    prompts: Sequence[Mapping[str, Any]],
    segmenter: Segmenter,
    *,
    max_objects: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """RLE masks and their segment records for ``prompts``; a kind the segmenter cannot
    read is ``unsupported_prompt``, nothing found at all ``no_objects_found``."""
    for i, prompt in enumerate(prompts):
        missing = prompt_kinds(prompt) - segmenter.prompt_kinds
        if missing:
            raise Sam3dError(
                ErrorCode.UNSUPPORTED_PROMPT,
                f"prompts[{i}]: this worker's segmenter {segmenter.name!r} cannot read "
                f"{', '.join(sorted(missing))} prompts",
            )
    segments = segmenter.segment(image, prompts)[:max_objects]
    if not segments:
        raise Sam3dError(
            ErrorCode.NO_OBJECTS_FOUND,
            "the prompts found no object (text prompts: none scored at least min_score)",
        )
    label = f"{segmenter.name} {segmenter.version}"
    rles = [encode_masks_rle(s.mask)[0] for s in segments]  # one plane at a time
    records = [{**s.to_dict(), "segmenter": label} for s in segments]
    return rles, records


def job_masks(
    files: _Files,
    extra: Mapping[str, Any] | None,
    image: np.ndarray,
    segmenter: Callable[[], Segmenter],
    *,
    max_objects: int,
    on_segmenting: Callable[[], None] | None = None,
) -> tuple[JobMasks, float | None]:
    """The job's masks and the seconds spent segmenting (None when nothing was segmented:
    masks given, or made by an earlier run of this job)."""
    size = image.shape[:2]
    if not (extra or {}).get("prompts"):
        return JobMasks(json.loads(files.get(INPUT_MASKS)), size), None
    try:
        rles = json.loads(files.get(INPUT_MASKS))
    except KeyError:
        rles = None
    if rles is not None:  # segmented by an earlier run: kept, not made again
        return JobMasks(rles, size, json.loads(files.get(INPUT_SEGMENTS))["objects"]), None
    if on_segmenting is not None:
        on_segmenting()
    t0 = time.perf_counter()
    spec = json.loads(files.get(INPUT_PROMPTS))
    chosen = segmenter()
    rles, records = segment_prompts(image, spec["prompts"], chosen, max_objects=max_objects)
    seconds = time.perf_counter() - t0
    files.put(
        INPUT_SEGMENTS,
        json.dumps(
            {
                "segmenter": {"name": chosen.name, "version": chosen.version},
                "time_s": round(seconds, 4),
                "objects": records,
            }
        ).encode(),
        JSON_TYPE,
    )
    files.put(INPUT_MASKS, json.dumps(rles).encode(), JSON_TYPE)  # last: the marker
    return JobMasks(rles, size, records), seconds
