"""Reading a job submission (multipart or JSON) into validated inputs, at submit time."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import Request

from api.json_input import loads_input
from api.models import parse_json_body
from jobs.budgets import check_output_budget
from jobs.depth import KINDS as DEPTH_KINDS
from jobs.depth import DepthInput, read_depth_input
from jobs.encoding import decode_base64
from jobs.errors import ErrorCode, Sam3dError
from jobs.fetch import UrlField, fetch_url
from jobs.images import read_image_size
from jobs.masks import MASK_FORMATS, RleMasks, decode_masks_rle
from jobs.options import parse_options
from jobs.prompts import max_prompted_objects, parse_prompts
from jobs.queue import DEFAULT_QUEUE, QUEUES
from jobs.settings import Settings
from jobs.webhooks import check_webhook_url


@dataclass
class Submission:
    """Everything a job needs, already decoded and checked."""

    image_bytes: bytes
    image_size: tuple[int, int]  # (H, W) of the upright image
    # One COCO compressed RLE per object (never N x H x W pixels); an (N, H, W) array is
    # accepted too and encoded when stored.
    masks: list[dict[str, Any]] | np.ndarray
    options: dict[str, Any]
    queue: str
    webhook_url: str | None = None
    depth: DepthInput | None = None  # metric geometry: a depth map or pointmap + intrinsics
    # Instead of masks (then ``masks`` is empty): boxes, points or text for the segmenter.
    prompts: list[dict[str, Any]] | None = None
    prompted_objects: int = 0  # the most objects ``prompts`` can yield

    @property
    def objects_total(self) -> int:
        """Objects the job will have (for prompts: the most they can yield)."""
        return self.prompted_objects if self.prompts is not None else len(self.masks)


def _bad(message: str) -> Sam3dError:
    return Sam3dError(ErrorCode.INVALID_REQUEST, message)


def _json_field(text: str | None, name: str) -> Any:
    if text is None or text == "":
        return None
    try:
        return loads_input(text)
    except json.JSONDecodeError as exc:
        raise _bad(f"field {name!r} is not valid JSON: {exc.msg}") from None
    except ValueError as exc:  # an integer past Python's digit limit
        raise _bad(f"field {name!r}: {exc}") from None


def _int_or_none(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise _bad(f"{name} must be an integer")
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise _bad(f"{name} must be an integer") from None


UPLOADS = "uploads"


def upload_prefix(owner: str) -> str:
    """Storage prefix of an owner's uploaded images (POST /v1/uploads)."""
    return f"{UPLOADS}/{owner}/"


def _image_from_json(spec: Any, settings: Settings, owner: str, storage: Any) -> bytes:
    if not isinstance(spec, dict) or spec.get("type") not in ("base64", "url", "key"):
        raise _bad('"image" must be {"type": "base64" | "url" | "key", "value": ...}')
    value = spec.get("value")
    if not isinstance(value, str) or not value:
        raise _bad('"image.value" must be a non-empty string')
    if spec["type"] == "key":
        # Only the caller's own uploads: another key's upload is as unknown as a missing one.
        if not value.startswith(upload_prefix(owner)) or ".." in value:
            raise Sam3dError(ErrorCode.INVALID_IMAGE, f"unknown upload key {value!r}")
        try:
            return storage.get(value)
        except (KeyError, ValueError):
            raise Sam3dError(ErrorCode.INVALID_IMAGE, f"unknown upload key {value!r}") from None
    if spec["type"] == "url":
        return fetch_url(
            value, max_bytes=settings.max_image_bytes, allow_private=settings.allow_private_urls
        )
    # Before decoding: 4 characters per 3 bytes, plus line breaks (MIME: 2 in 78) and a prefix.
    if len(value) > settings.max_image_bytes * 4 // 3 * 1.03 + 128:
        raise Sam3dError(ErrorCode.IMAGE_TOO_LARGE, "image exceeds the size limit")
    try:
        return decode_base64(value)
    except ValueError as exc:
        message = f'"image.value" is not valid base64: {exc}'
        raise Sam3dError(ErrorCode.INVALID_IMAGE, message) from None


def _blob_from_json(spec: Any, name: str, settings: Settings) -> bytes:
    """A depth map or pointmap given as ``{"type": "base64" | "url", "value"}``."""
    if not isinstance(spec, dict) or spec.get("type") not in ("base64", "url"):
        raise _bad(f'"{name}" must be {{"type": "base64" | "url", "value": ...}}')
    value = spec.get("value")
    if not isinstance(value, str) or not value:
        raise _bad(f'"{name}.value" must be a non-empty string')
    if spec["type"] == "url":
        return fetch_url(
            value,
            max_bytes=settings.max_request_bytes,
            allow_private=settings.allow_private_urls,
            field=UrlField(f"{name} URL", ErrorCode.INVALID_DEPTH, ErrorCode.REQUEST_TOO_LARGE),
        )
    try:
        return decode_base64(value)
    except ValueError as exc:
        message = f'"{name}.value" is not valid base64: {exc}'
        raise Sam3dError(ErrorCode.INVALID_DEPTH, message) from None


def _geometry(depth: bytes | None, pointmap: bytes | None) -> tuple[str, bytes] | None:
    if depth is not None and pointmap is not None:
        raise _bad('send "depth" or "pointmap", not both')
    if depth is not None:
        return "depth", depth
    if pointmap is not None:
        return "pointmap", pointmap
    return None


def parse_submission(request: Request, settings: Settings, owner: str, storage: Any) -> Submission:
    """Decode and validate a POST /v1/jobs request; every failure is a Sam3dError."""
    if request.mimetype == "multipart/form-data":
        return _parse_multipart(request, settings)
    if request.is_json:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise _bad("the body is not a JSON object")
        return parse_json_spec(body, settings, owner=owner, storage=storage)
    raise _bad("send multipart/form-data or application/json")


def parse_json_spec(
    body: dict[str, Any], settings: Settings, *, owner: str, storage: Any
) -> Submission:
    """One job given as JSON (a POST /v1/jobs body, or one entry of a batch): its envelope
    validated by the ``JsonSubmission`` model, the rest as for multipart."""
    job = parse_json_body(body, settings.backend)
    return _validated(
        image_bytes=_image_from_json(job.image.model_dump(), settings, owner, storage),
        mask_input=job.mask_input,
        prompts=job.prompts,
        mask_files=[],
        mask_format=job.mask_format,
        options=job.options,
        image_id=job.image_id,
        file_name=job.file_name,
        webhook_url=job.webhook_url,
        settings=settings,
        geometry=_geometry(
            *(
                _blob_from_json(blob.model_dump(), kind, settings) if blob is not None else None
                for kind, blob in ((k, getattr(job, k)) for k in DEPTH_KINDS)
            )
        ),
        intrinsics=job.intrinsics,
    )


def _parse_multipart(request: Request, settings: Settings) -> Submission:
    upload = request.files.get("image")
    if upload is None:
        raise _bad('multipart submissions need an "image" file')
    form = request.form
    return _validated(
        image_bytes=upload.read(settings.max_image_bytes + 1),
        mask_input=_json_field(form.get("mask_input"), "mask_input"),
        prompts=_json_field(form.get("prompts"), "prompts"),
        mask_files=[f.read() for f in request.files.getlist("mask")],
        mask_format=form.get("mask_format") or None,
        options=_json_field(form.get("options"), "options"),
        image_id=_int_or_none(form.get("image_id"), "image_id"),
        file_name=form.get("file_name") or None,
        webhook_url=form.get("webhook_url") or None,
        settings=settings,
        geometry=_geometry(
            *(
                request.files[k].read(settings.max_request_bytes) if k in request.files else None
                for k in DEPTH_KINDS
            )
        ),
        intrinsics=_json_field(form.get("intrinsics"), "intrinsics"),
    )


def _validated(
    *,
    image_bytes: bytes,
    mask_input: Any,
    mask_files: list[bytes],
    mask_format: Any,
    options: Any,
    image_id: int | None,
    file_name: str | None,
    webhook_url: Any,
    settings: Settings,
    geometry: tuple[str, bytes] | None = None,
    intrinsics: Any = None,
    prompts: Any = None,
) -> Submission:
    if webhook_url is not None:
        if not settings.webhook_secret:
            raise _bad("webhooks are not configured on this server (SAM3D_WEBHOOK_SECRET)")
        webhook_url = check_webhook_url(webhook_url, allow_private=settings.allow_private_urls)
    if mask_format is not None and mask_format not in MASK_FORMATS:
        raise Sam3dError(
            ErrorCode.INVALID_MASK,
            f"unknown mask_format {mask_format!r}; one of {', '.join(MASK_FORMATS)}",
        )
    if options is not None and not isinstance(options, dict):
        raise Sam3dError(ErrorCode.INVALID_OPTION, '"options" must be a JSON object')
    options = dict(options or {})
    queue = options.pop("priority", DEFAULT_QUEUE)
    if queue not in QUEUES:
        raise Sam3dError(
            ErrorCode.INVALID_OPTION, f"option 'priority' must be one of {', '.join(QUEUES)}"
        )
    options = parse_options(settings.backend, options)

    # The header only (size, EXIF orientation): pixels are decoded by the worker.
    size = read_image_size(
        image_bytes, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels
    )
    if prompts is not None:
        if mask_input is not None or mask_files or mask_format is not None:
            raise _bad('send "mask_input" (or "mask" files) or "prompts", not both')
        return _prompted(image_bytes, size, prompts, options, queue, webhook_url, settings,
                         geometry=geometry, intrinsics=intrinsics)  # fmt: skip
    parts = []
    if mask_input is not None:
        parts.append(
            decode_masks_rle(
                mask_input,
                size,
                mask_format=mask_format,
                image_id=image_id,
                file_name=file_name,
                max_masks=settings.max_masks,
            )
        )
    if mask_files:
        parts.append(
            decode_masks_rle(mask_files, size, mask_format="png", max_masks=settings.max_masks)
        )
    if not parts:
        raise Sam3dError(
            ErrorCode.INVALID_MASK, 'no masks: send "mask_input", "mask" files or "prompts"'
        )
    masks = [rle for part in parts for rle in part]
    if len(masks) > settings.max_masks:
        raise Sam3dError(
            ErrorCode.TOO_MANY_MASKS,
            f"{len(masks)} objects; the limit is {settings.max_masks}",
        )
    if geometry is None and intrinsics is not None:
        raise Sam3dError(
            ErrorCode.INVALID_INTRINSICS,
            'intrinsics need a "depth" or "pointmap" to go with (for the field of view alone '
            "use the option fov_deg)",
        )
    # Masks stay RLE: the depth check decodes one at a time.
    depth = (
        read_depth_input(*geometry, intrinsics, size, RleMasks(masks, size)) if geometry else None
    )
    check_output_budget(settings, settings.backend, options, len(masks))
    return Submission(
        bytes(image_bytes),
        (int(size[0]), int(size[1])),
        masks,
        options,
        queue,
        webhook_url,
        depth,
    )


def _prompted(
    image_bytes: bytes,
    size: tuple[int, int],
    prompts: Any,
    options: dict[str, Any],
    queue: str,
    webhook_url: str | None,
    settings: Settings,
    *,
    geometry: tuple[str, bytes] | None,
    intrinsics: Any,
) -> Submission:
    """A job whose masks the worker's segmenter makes from ``prompts`` (jobs/prompts.py)."""
    checked = parse_prompts(
        prompts, size, max_objects=settings.max_masks, segmenter=settings.segmenter
    )
    if geometry is not None or intrinsics is not None:
        # The depth check needs the masks, which only the worker will have.
        raise _bad('"depth", "pointmap" and "intrinsics" go with masks, not with "prompts"')
    count = max_prompted_objects(checked, settings.max_masks)
    check_output_budget(settings, settings.backend, options, count)
    return Submission(
        bytes(image_bytes),
        (int(size[0]), int(size[1])),
        [],
        options,
        queue,
        webhook_url,
        None,
        checked,
        count,
    )
