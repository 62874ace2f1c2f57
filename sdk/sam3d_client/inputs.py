"""Turning what users hold (paths, bytes, PIL images, numpy arrays, COCO dicts, detections)
into the fields of a ``POST /v1/jobs`` multipart request.

Numpy masks travel as COCO compressed RLE (``mask_format="rle"``, encoded by
:mod:`sam3d_client.rle`): a few hundred bytes per object instead of H×W numbers. JSON formats
(polygons, RLE, COCO) are sent as they are and decoded by the service; PNG masks go as
``mask`` files. A list of sources of different kinds keeps its order: the service reads
``mask_input`` before the ``mask`` files, so one JSON source may lead and arrays after it
travel as PNG files. Nothing here needs the server's code: numpy and Pillow are needed only
for array inputs (``pip install "sam3d-client[arrays]"``).
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sam3d_client.errors import InvalidInput
from sam3d_client.rle import encode_masks_rle

MASK_FILE_SUFFIXES = (".json", ".png", ".npy")
# The service's mask_format names (jobs/masks: a test checks they agree).
MASK_FORMATS = ("binary", "png", "polygon", "points", "rle", "coco")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class MaskPayload:
    """Masks as the request carries them: JSON ``mask_input`` and/or PNG ``mask`` files."""

    mask_input: Any = None
    mask_format: str | None = None
    files: list[bytes] = field(default_factory=list)
    # The (H, W) bool arrays an RLE ``mask_input`` was encoded from (to send them as PNG
    # files instead, when they follow other sources).
    arrays: list[Any] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.mask_input is None and not self.files


def _invalid_mask(message: str) -> InvalidInput:
    return InvalidInput("invalid_mask", message)


def _invalid_image(message: str) -> InvalidInput:
    return InvalidInput("invalid_image", message)


def is_array(value: object) -> bool:
    """A numpy array; numpy is not imported for it (an array means numpy is loaded)."""
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.ndarray)


def _numpy(what: str) -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is an optional dependency
        raise InvalidInput(
            "invalid_request", f"{what} needs numpy: pip install 'sam3d-client[arrays]'"
        ) from None
    return numpy


def _png(arr: Any, what: str) -> bytes:
    """PNG bytes of an (H, W) or (H, W, 3|4) uint8 (or uint16 (H, W)) array, by Pillow."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is an optional dependency
        raise InvalidInput(
            "invalid_request", f"{what} needs Pillow: pip install 'sam3d-client[arrays]'"
        ) from None
    import numpy as np

    buf = io.BytesIO()
    # Pillow infers L / RGB / RGBA (I;16 for uint16) from the array.
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def json_default(value: Any) -> Any:
    """``json.dumps`` hook for numpy scalars and arrays, and bytes RLE counts."""
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray):
        return value.tolist()
    if np is not None and isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# --------------------------------------------------------------------------- images


def _image_name(data: bytes) -> str:
    if data.startswith(_PNG_MAGIC):
        return "image.png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image.jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image.webp"
    return "image"


def _array_to_png(arr: Any) -> bytes:
    import numpy as np

    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        scale = 255.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 1.0
        arr = np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))):
        raise _invalid_image(f"an image array must be (H, W), (H, W, 3|4), not {arr.shape}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise _invalid_image(f"cannot encode an image array of shape {arr.shape}")
    return _png(arr, "an image array")


def encode_image(image: object) -> tuple[str, bytes]:
    """(file name, bytes) of an image given as a path, bytes, a PIL image or a numpy array.

    PIL images and arrays are encoded as PNG (lossless); files and bytes are sent untouched.
    """
    if isinstance(image, str | Path):
        path = Path(image)
        try:
            return path.name, path.read_bytes()
        except OSError as exc:
            raise _invalid_image(f"cannot read image file {path}: {exc.strerror or exc}") from None
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        return _image_name(data), data
    if is_array(image):
        return "image.png", _array_to_png(image)
    pil = sys.modules.get("PIL.Image")  # a PIL image means Pillow is loaded
    if pil is not None and isinstance(image, pil.Image):
        im = image
        if im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return "image.png", buf.getvalue()
    raise InvalidInput(
        "invalid_image",
        f"image must be a path, bytes, a PIL image or a numpy array, not {type(image).__name__}",
    )


# --------------------------------------------------------------------------- masks


def _as_bool(arr: Any) -> Any:
    """The service's reading of a binary mask: bool as is, floats > 0.5, integers > 0."""
    import numpy as np

    if arr.dtype == np.bool_:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return arr > 0.5
    if np.issubdtype(arr.dtype, np.integer):
        return arr > 0
    raise _invalid_mask(f"a mask array must be bool or numeric, not dtype {arr.dtype}")


def _rle_of_arrays(arrays: Sequence[Any]) -> MaskPayload:
    encoded: list[dict[str, Any]] = []
    masks: list[Any] = []
    for arr in arrays:
        if arr.ndim not in (2, 3):
            raise _invalid_mask(f"a mask array must be (H, W) or (N, H, W), got shape {arr.shape}")
        if arr.ndim == 3 and arr.shape[0] == 0:
            continue
        binary = _as_bool(arr)
        encoded.extend(encode_masks_rle(binary))
        masks.extend(binary if binary.ndim == 3 else [binary])
    return MaskPayload(encoded, "rle", arrays=masks)


def _fix_rle(obj: Any) -> Any:
    """pycocotools' RLE dicts hold bytes counts: JSON needs str."""
    if isinstance(obj, dict):
        return {k: _fix_rle(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_fix_rle(v) for v in obj]
    if isinstance(obj, bytes | bytearray):
        return bytes(obj).decode("ascii")
    return obj


def _looks_like_path(value: str) -> bool:
    return value.lower().endswith(MASK_FILE_SUFFIXES) or (
        len(value) < 4096 and "\n" not in value and Path(value).is_file()
    )


def _is_source(obj: object) -> bool:
    """A self-contained mask source that can be one entry of a list of sources."""
    if isinstance(obj, str):
        return _looks_like_path(obj)
    return isinstance(obj, Path | bytes | bytearray | memoryview) or is_array(obj) or _has_mask(obj)


def _has_mask(obj: object) -> bool:
    return (
        not is_array(obj)
        and not isinstance(obj, dict | list | tuple | str | bytes)
        and hasattr(obj, "mask")
    )


def _check_format(given: str | None, allowed: tuple[str, ...], what: str) -> None:
    if given is not None and given not in allowed:
        raise _invalid_mask(f"{what} cannot be sent with mask_format={given!r}")


def load_mask_source(path: str | Path, mask_format: str | None = None) -> MaskPayload:
    """One mask file: ``.json`` (any JSON format or COCO), ``.png``, ``.npy``.

    ``mask_format`` applies to ``.json`` files; ``.png`` is always PNG, ``.npy`` binary
    (as for ``sam3d-jobs generate``).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MASK_FILE_SUFFIXES:
        raise _invalid_mask(f"mask file {path} has an unknown extension; use .json, .png or .npy")
    try:
        if suffix == ".png":
            return MaskPayload(files=[path.read_bytes()])
        if suffix == ".npy":
            np = _numpy(f"mask file {path}")
            return _rle_of_arrays([np.load(path, allow_pickle=False)])
        return MaskPayload(json.loads(path.read_bytes()), mask_format)
    except OSError as exc:
        raise _invalid_mask(f"cannot read mask file {path}: {exc.strerror or exc}") from None
    except (ValueError, EOFError) as exc:
        raise _invalid_mask(f"cannot parse mask file {path}: {exc}") from None


def _single(obj: object, mask_format: str | None) -> MaskPayload:
    if _has_mask(obj):
        inner = obj.mask  # type: ignore[attr-defined]
        if inner is None:
            raise _invalid_mask(f"{type(obj).__name__}.mask is None: no masks to send")
        return _single(_numpy("detections").asarray(inner), mask_format)
    if is_array(obj):
        _check_format(mask_format, ("binary", "rle"), "a numpy mask array")
        return _rle_of_arrays([obj])
    if isinstance(obj, bytes | bytearray | memoryview):
        _check_format(mask_format, ("png",), "PNG bytes")
        return MaskPayload(files=[bytes(obj)])
    if isinstance(obj, Path) or (isinstance(obj, str) and _looks_like_path(obj)):
        return load_mask_source(obj, mask_format)
    if isinstance(obj, str):  # a base64 PNG
        return MaskPayload(obj, mask_format)
    if isinstance(obj, dict):
        return MaskPayload(_fix_rle(obj), mask_format)
    raise _invalid_mask(f"masks of type {type(obj).__name__} are not a known mask format")


def _in_order(parts: list[MaskPayload]) -> MaskPayload:
    """Several sources of different kinds as one request, in their order.

    The service decodes ``mask_input`` first, then the ``mask`` files in order: a JSON source
    may come first, and everything after it travels as files (arrays as lossless PNGs).
    Nothing is decoded here, so this needs none of the service's decoders.
    """
    lead: MaskPayload | None = None
    files: list[bytes] = []
    for i, part in enumerate(parts):
        if part.arrays:
            files.extend(_png(a.astype("uint8") * 255, "mask arrays") for a in part.arrays)
        elif part.mask_input is not None:
            if i:
                raise _invalid_mask(
                    "in a list of mask sources a JSON source (polygons, RLE, COCO) must come "
                    "first: the service reads mask_input before the mask files; reorder the "
                    "list or send each kind on its own"
                )
            lead = part
        files.extend(part.files)
    if lead is None:
        return MaskPayload(files=files)
    return MaskPayload(lead.mask_input, lead.mask_format, files=files)


def encode_masks(
    masks: object,
    *,
    image: bytes,
    mask_format: str | None = None,
    image_id: int | None = None,
    file_name: str | None = None,
) -> MaskPayload:
    """The request fields for ``masks`` in any form :meth:`sam3d_client.Client.submit` accepts.

    ``image``, ``image_id`` and ``file_name`` are kept for callers of earlier versions, which
    decoded mixed lists here: the service now does all decoding (see :func:`_in_order`).
    """
    if masks is None:
        return MaskPayload()
    if not isinstance(masks, list | tuple):
        return _single(masks, mask_format)
    items = list(masks)
    if items and all(is_array(m) for m in items):
        _check_format(mask_format, ("binary", "rle"), "numpy mask arrays")
        return _rle_of_arrays(items)
    if items and all(_is_source(m) for m in items):
        parts = [_single(m, mask_format) for m in items]
        if all(p.mask_input is None for p in parts):  # only PNG files: sent as they are
            return MaskPayload(files=[f for p in parts for f in p.files])
        if len(parts) == 1:
            return parts[0]
        if all(p.arrays for p in parts):  # only arrays: one RLE list
            return _rle_of_arrays([a for p in parts for a in p.arrays])
        return _in_order(parts)
    if any(_is_source(m) and not isinstance(m, str) for m in items):
        raise _invalid_mask("a list of masks mixes files or arrays with JSON values")
    return MaskPayload(_fix_rle(items), mask_format)


# --------------------------------------------------------------------------- depth


def _geometry_bytes(value: object, kind: str) -> tuple[str, bytes]:
    """(file name, bytes) of a depth map or pointmap given as a path, bytes or an array."""
    if isinstance(value, str | Path):
        path = Path(value)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidInput(
                "invalid_depth", f"cannot read {kind} file {path}: {exc.strerror or exc}"
            ) from None
        return path.name, data
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        return (f"{kind}.png" if data.startswith(_PNG_MAGIC) else f"{kind}.npy"), data
    if is_array(value):
        import numpy as np

        if kind == "depth" and value.dtype == np.uint16:  # millimetres, as depth cameras write
            return "depth.png", _png(value, "a uint16 depth array")
        if not np.issubdtype(value.dtype, np.floating):
            raise InvalidInput(
                "invalid_depth", f"a {kind} array must be float metres (or uint16 mm for depth)"
            )
        buf = io.BytesIO()
        np.save(buf, value.astype(np.float32), allow_pickle=False)
        return f"{kind}.npy", buf.getvalue()
    raise InvalidInput(
        "invalid_depth",
        f"{kind} must be a path, bytes or a numpy array, not {type(value).__name__}",
    )


def encode_geometry(
    *, depth: object = None, pointmap: object = None, intrinsics: object = None
) -> tuple[str, str, bytes, object] | None:
    """(field, file name, bytes, intrinsics) for a depth map or pointmap, or None."""
    if depth is not None and pointmap is not None:
        raise InvalidInput("invalid_request", "pass depth or pointmap, not both")
    if depth is None and pointmap is None:
        if intrinsics is not None:
            raise InvalidInput("invalid_intrinsics", "intrinsics need a depth or pointmap")
        return None
    if intrinsics is None:
        raise InvalidInput("invalid_intrinsics", "depth and pointmap need intrinsics (pixels)")
    kind = "depth" if depth is not None else "pointmap"
    name, data = _geometry_bytes(depth if depth is not None else pointmap, kind)
    if is_array(intrinsics):
        intrinsics = intrinsics.tolist()
    return kind, name, data, intrinsics
