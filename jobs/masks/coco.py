"""COCO files: choosing one image, each annotation (polygons or RLE) one object."""

from __future__ import annotations

import functools
from pathlib import PurePosixPath
from typing import Any

from jobs.errors import ErrorCode
from jobs.masks.common import (
    _SEQUENCE_TYPES,
    CocoImageAmbiguous,
    MakeMask,
    Size,
    _depth,
    _invalid,
    _is_number,
    _mismatch,
)
from jobs.masks.polygons import _flat_polygon, _polygon_object
from jobs.masks.rle import _decode_rle


def _basename(name: object) -> str:
    return PurePosixPath(str(name).replace("\\", "/")).name


def _same_id(a: object, b: object) -> bool:
    return a == b or (a is not None and b is not None and str(a) == str(b))


def _select_coco_image(
    images: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    image_id: int | None,
    file_name: str | None,
) -> tuple[object, dict[str, Any] | None]:
    """Pick the COCO image whose annotations are wanted: (its id, its entry or None)."""
    if image_id is not None:
        if not images:
            return image_id, None
        found = [im for im in images if _same_id(im.get("id"), image_id)]
        if not found:
            raise _invalid(f"COCO file has no image with id {image_id!r}")
        entry = found[0]
        if file_name is not None and _basename(entry.get("file_name", "")) != _basename(file_name):
            raise _invalid(
                f"COCO image {image_id!r} is {entry.get('file_name')!r}, not {file_name!r}"
            )
        return entry.get("id"), entry
    if file_name is not None:
        wanted = _basename(file_name)
        found = [im for im in images if _basename(im.get("file_name", "")) == wanted]
        if not found:
            raise _invalid(f"COCO file has no image named {wanted!r}")
        if len(found) > 1:
            raise _invalid(f"COCO file has {len(found)} images named {wanted!r}; pass image_id")
        return found[0].get("id"), found[0]
    if len(images) == 1:
        return images[0].get("id"), images[0]
    if not images:
        ids: list[object] = []
        for ann in annotations:
            if not any(_same_id(ann.get("image_id"), seen) for seen in ids):
                ids.append(ann.get("image_id"))
        if len(ids) == 1:
            return ids[0], None
        if not ids:
            raise _invalid("COCO file holds no annotations")
        raise _invalid(f"COCO annotations refer to {len(ids)} images; pass image_id to choose one")
    raise CocoImageAmbiguous(
        ErrorCode.INVALID_MASK,
        f"COCO file holds {len(images)} images; pass image_id or file_name to choose one",
    )


def _annotation_item(ann: dict[str, Any], size: Size, label: str) -> MakeMask:
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        return functools.partial(_decode_rle, seg, size, label)
    if isinstance(seg, _SEQUENCE_TYPES) and seg:
        polys = [seg] if _depth(seg) == 1 else list(seg)
        return _polygon_object(
            [_flat_polygon(p, f"{label} polygon {j}") for j, p in enumerate(polys)], size
        )
    raise _invalid(f"{label} has no usable 'segmentation' (polygons or RLE)")


def _coco_items(
    obj: object, size: Size, image_id: int | None, file_name: str | None
) -> list[MakeMask]:
    if not isinstance(obj, dict):
        raise _invalid(f"a COCO file must be a JSON object, not {type(obj).__name__}")
    annotations = obj.get("annotations")
    images = obj.get("images", [])
    if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
        raise _invalid("COCO 'annotations' must be a list of objects")
    if not isinstance(images, list) or not all(isinstance(im, dict) for im in images):
        raise _invalid("COCO 'images' must be a list of objects")
    chosen, entry = _select_coco_image(images, annotations, image_id, file_name)
    if entry is not None and "height" in entry and "width" in entry:
        coco_size = (entry["height"], entry["width"])
        if not all(_is_number(v) for v in coco_size):
            raise _invalid(f"COCO image {chosen!r} has a non-numeric height or width")
        if (int(coco_size[0]), int(coco_size[1])) != size:
            raise _mismatch(f"COCO image {chosen!r}", coco_size, size)
    selected = [ann for ann in annotations if _same_id(ann.get("image_id"), chosen)]
    if not selected:
        raise _invalid(f"COCO image {chosen!r} has no annotations")
    return [
        _annotation_item(ann, size, f"mask {i} (COCO annotation id {ann.get('id')!r})")
        for i, ann in enumerate(selected)
    ]
