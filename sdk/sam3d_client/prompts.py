"""Prompts (boxes, points, text) as the SDK and the CLI send them: ``{"box": [x0, y0, x1,
y1]}``, ``{"points": [[x, y, 1 | 0], ...]}`` (both in one entry if wanted) or ``{"text":
"mug"}``, one entry per object. The service checks them (``invalid_prompt``,
``prompt_out_of_bounds``, ``unsupported_prompt``); here only their shape is made JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from sam3d_client.errors import InvalidInput


def _invalid(message: str) -> InvalidInput:
    return InvalidInput("invalid_prompt", message)


def _is_array(value: Any) -> bool:
    """A numpy array, without importing numpy (the SDK does not need it: a caller who made an
    array has imported it already)."""
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.ndarray)


def _plain(value: Any) -> Any:
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def boxes_to_prompts(boxes: Any) -> list[dict[str, Any]]:
    """``{"box": ...}`` per row of an (N, 4) ``x0, y0, x1, y1`` array or list."""
    rows = _plain(boxes)
    if isinstance(rows, list | tuple) and len(rows) == 4 and not isinstance(rows[0], list | tuple):
        rows = [rows]
    if not isinstance(rows, list | tuple) or not all(
        isinstance(row, list | tuple) and len(row) == 4 for row in rows
    ):
        raise _invalid("boxes must be (N, 4): x0, y0, x1, y1 per row")
    try:
        return [{"box": [float(v) for v in row]} for row in rows]
    except (TypeError, ValueError):
        raise _invalid("boxes must be (N, 4) numbers: x0, y0, x1, y1 per row") from None


def encode_prompts(prompts: Any) -> list[dict[str, Any]]:
    """JSON-ready prompts from a list of dicts, one dict, an (N, 4) array of boxes, or
    anything with an ``.xyxy`` array (supervision's ``Detections``)."""
    if hasattr(prompts, "xyxy"):
        return boxes_to_prompts(prompts.xyxy)
    if _is_array(prompts):
        return boxes_to_prompts(prompts)
    if isinstance(prompts, dict):
        prompts = [prompts]
    if not isinstance(prompts, list | tuple) or not all(isinstance(p, dict) for p in prompts):
        raise _invalid("prompts must be a list of {box | points | text} objects or (N, 4) boxes")
    return [_plain(p) for p in prompts]


def read_prompts_arg(text: str) -> list[dict[str, Any]]:
    """``--prompts``: a JSON file, or the JSON itself."""
    path = Path(text)
    source = path.read_text() if not text.lstrip().startswith(("[", "{")) else text
    try:
        return encode_prompts(json.loads(source))
    except json.JSONDecodeError as exc:
        raise _invalid(f"--prompts is neither a JSON file nor JSON: {exc.msg}") from None


def read_boxes_file(path: Path) -> list[dict[str, Any]]:
    """``--boxes``: a JSON list of ``[x0, y0, x1, y1]``, or text with four numbers per line
    (commas or spaces; ``#`` comments), a detector's usual output."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        try:
            return boxes_to_prompts(json.loads(text))
        except json.JSONDecodeError as exc:
            raise _invalid(f"{path}: not JSON: {exc.msg}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].replace(",", " ").strip()
        if not line:
            continue
        try:
            rows.append([float(v) for v in line.split()])
        except ValueError:
            raise _invalid(f"{path}:{number}: a box is four numbers x0 y0 x1 y1") from None
        if len(rows[-1]) != 4:
            raise _invalid(f"{path}:{number}: a box is four numbers x0 y0 x1 y1")
    if not rows:
        raise _invalid(f"{path}: no boxes")
    return boxes_to_prompts(rows)
