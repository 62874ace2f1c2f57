"""Prompts instead of masks: one entry per object, checked at submit time.

An entry is ``{"box": [x0, y0, x1, y1]}`` (pixels of the upright image, EXIF orientation
applied), ``{"points": [[x, y, 1 | 0], ...]}`` (1 a point on the object, 0 one off it), both
in one entry, or ``{"text": "mug"}`` for every instance found (at most ``max_objects``, each
scoring at least ``min_score``). The worker's segmenter turns them into masks
(``worker/segmenters/``); which kinds it reads is ``SEGMENTER_PROMPTS`` here, so the API can
refuse what the worker could not do without importing the worker.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from jobs.errors import ErrorCode, Sam3dError

# What each segmenter reads (the worker's classes say the same; tests keep them equal).
SEGMENTER_PROMPTS: dict[str, frozenset[str]] = {
    "grabcut": frozenset({"box", "points"}),
    "sam3": frozenset({"box", "points", "text"}),
}
SEGMENTERS = tuple(SEGMENTER_PROMPTS)
MAX_TEXT_CHARS = 80
MAX_POINTS = 64  # per entry
MIN_BOX_SIDE = 2.0  # pixels: a narrower box is degenerate
DEFAULT_MIN_SCORE = 0.5
PROMPT_KINDS = ("box", "points", "text")
_ENTRY_KEYS = {*PROMPT_KINDS, "max_objects", "min_score"}
_TEXT_KEYS = {"text", "max_objects", "min_score"}


def prompt_kinds(prompt: Mapping[str, Any]) -> set[str]:
    """The kinds of prompt an entry holds: of ``box``, ``points`` and ``text``."""
    return {kind for kind in PROMPT_KINDS if kind in prompt}


def _invalid(message: str) -> Sam3dError:
    return Sam3dError(ErrorCode.INVALID_PROMPT, message)


def _outside(message: str) -> Sam3dError:
    return Sam3dError(ErrorCode.PROMPT_OUT_OF_BOUNDS, message)


def _number(value: Any, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(f"{label} must be a number")
    number = float(value)
    if not math.isfinite(number):
        raise _invalid(f"{label} must be finite")
    return number


def _box(value: Any, size: tuple[int, int], label: str) -> list[float]:
    if not isinstance(value, list | tuple) or len(value) != 4:
        raise _invalid(f"{label}.box must be [x0, y0, x1, y1]")
    x0, y0, x1, y1 = (_number(v, f"{label}.box[{i}]") for i, v in enumerate(value))
    if x1 - x0 < MIN_BOX_SIDE or y1 - y0 < MIN_BOX_SIDE:
        raise _invalid(
            f"{label}.box {[x0, y0, x1, y1]} is degenerate: it needs x1 > x0 and y1 > y0, "
            f"each side at least {MIN_BOX_SIDE:g} px"
        )
    height, width = size
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise _outside(
            f"{label}.box {[x0, y0, x1, y1]} is not inside the {width}x{height} image "
            "(pixels of the upright image, after EXIF orientation)"
        )
    return [x0, y0, x1, y1]


def _points(value: Any, size: tuple[int, int], label: str) -> list[list[float]]:
    if not isinstance(value, list | tuple) or not value:
        raise _invalid(f"{label}.points must be a non-empty list of [x, y, 1 | 0]")
    if len(value) > MAX_POINTS:
        raise _invalid(f"{label}.points has {len(value)} points; at most {MAX_POINTS}")
    height, width = size
    points = []
    for i, point in enumerate(value):
        where = f"{label}.points[{i}]"
        if not isinstance(point, list | tuple) or len(point) != 3:
            raise _invalid(f"{where} must be [x, y, 1 | 0]")
        x, y = _number(point[0], f"{where}[0]"), _number(point[1], f"{where}[1]")
        flag = point[2]
        if isinstance(flag, bool) or flag not in (0, 1):
            raise _invalid(f"{where}: the label must be 1 (on the object) or 0 (off it)")
        if not (0 <= x <= width and 0 <= y <= height):
            raise _outside(f"{where} ({x:g}, {y:g}) is not inside the {width}x{height} image")
        points.append([x, y, int(flag)])
    return points


def _text_entry(entry: Mapping[str, Any], label: str, max_objects: int) -> dict[str, Any]:
    if set(entry) - _TEXT_KEYS:
        raise _invalid(f"{label}: a text prompt stands alone (no box or points beside it)")
    text = entry["text"]
    if not isinstance(text, str) or not text.strip():
        raise _invalid(f"{label}.text must be a non-empty string")
    text = " ".join(text.split())
    if len(text) > MAX_TEXT_CHARS or not text.isprintable():
        raise _invalid(f"{label}.text must be printable and at most {MAX_TEXT_CHARS} characters")
    limit = entry.get("max_objects", max_objects)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= max_objects:
        raise _invalid(f"{label}.max_objects must be an integer within 1..{max_objects}")
    min_score = _number(entry.get("min_score", DEFAULT_MIN_SCORE), f"{label}.min_score")
    if not 0.0 <= min_score <= 1.0:
        raise _invalid(f"{label}.min_score must be within 0..1")
    return {"text": text, "max_objects": limit, "min_score": min_score}


def parse_prompts(
    value: Any, image_size: tuple[int, int], *, max_objects: int, segmenter: str
) -> list[dict[str, Any]]:
    """Checked, normalised prompts: a list with one dict per entry. Every violation is a
    ``Sam3dError``: ``invalid_prompt`` (shape, degenerate box, text), ``prompt_out_of_bounds``,
    ``too_many_masks`` or ``unsupported_prompt`` (a kind ``segmenter`` cannot read)."""
    if not isinstance(value, list) or not value:
        raise _invalid('"prompts" must be a non-empty list, one entry per object')
    if len(value) > max_objects:
        raise Sam3dError(
            ErrorCode.TOO_MANY_MASKS, f"{len(value)} prompts; the limit is {max_objects}"
        )
    reads = SEGMENTER_PROMPTS.get(segmenter, frozenset())
    prompts = []
    for i, entry in enumerate(value):
        label = f"prompts[{i}]"
        if not isinstance(entry, Mapping):
            raise _invalid(f"{label} must be an object with box, points or text")
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise _invalid(f"{label}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
        if "text" in entry:
            prompt = _text_entry(entry, label, max_objects)
        else:
            if "box" not in entry and "points" not in entry:
                raise _invalid(f"{label} needs a box, points or text")
            if set(entry) & {"max_objects", "min_score"}:
                raise _invalid(f"{label}: max_objects and min_score go with text prompts")
            prompt = {}
            if "box" in entry:
                prompt["box"] = _box(entry["box"], image_size, label)
            if "points" in entry:
                prompt["points"] = _points(entry["points"], image_size, label)
                if "box" not in prompt and not any(p[2] for p in prompt["points"]):
                    raise _invalid(f"{label}: points without a box need at least one 1 (on)")
        missing = sorted(prompt_kinds(prompt) - reads)
        if missing:
            readers = sorted(s for s, kinds in SEGMENTER_PROMPTS.items() if missing[0] in kinds)
            raise Sam3dError(
                ErrorCode.UNSUPPORTED_PROMPT,
                f"{label}: {missing[0]} prompts need a segmenter that reads them "
                f"({', '.join(readers)}); this server's segmenter is {segmenter!r} "
                "(SAM3D_SEGMENTER on the workers and the API)",
            )
        prompts.append(prompt)
    return prompts


def max_prompted_objects(prompts: Sequence[Mapping[str, Any]], limit: int) -> int:
    """The most objects ``prompts`` can yield (a text entry up to its ``max_objects``),
    capped at ``limit``: what budgets and time limits are computed for."""
    return min(limit, sum(int(p.get("max_objects", 1)) if "text" in p else 1 for p in prompts))
