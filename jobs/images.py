"""Decode uploaded images into upright 8-bit RGB arrays, refusing anything unsafe.

Only JPEG, PNG and WebP are accepted. The format is sniffed from the leading bytes and the
matching Pillow plugin is constructed directly instead of going through ``Image.open``:
that way no other Pillow parser ever sees untrusted bytes, and Pillow's process-wide
decompression-bomb hook (a warning filtered through global state) is never involved. Our
own ``max_pixels`` limit is checked from the header, before a single pixel is decoded.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from jobs.errors import ErrorCode, Sam3dError

__all__ = ["ACCEPTED_FORMATS", "decode_image", "encode_png", "load_image", "read_image_size"]

DEFAULT_MAX_BYTES = 25_000_000
DEFAULT_MAX_PIXELS = 40_000_000

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Leading bytes of formats people commonly send by mistake, to name them in the error.
_REFUSED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"),
)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def _sniff_format(data: bytes) -> str | None:
    """Name the accepted format these bytes start with, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(_PNG_MAGIC):
        return "PNG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _open_header(data: bytes, fmt: str) -> ImageFile.ImageFile:
    """Parse only the header of ``data`` with the plugin for ``fmt`` (no pixels decoded)."""
    fp = io.BytesIO(data)
    if fmt == "JPEG":
        return JpegImagePlugin.JpegImageFile(fp)
    if fmt == "PNG":
        return PngImagePlugin.PngImageFile(fp)
    return WebPImagePlugin.WebPImageFile(fp)


def _describe_unknown(data: bytes) -> str:
    for magic, name in _REFUSED_MAGIC:
        if data.startswith(magic):
            return f"{name} images are not accepted; send JPEG, PNG or WebP"
    return "unrecognised image format; send JPEG, PNG or WebP"


def _sixteen_bit_to_rgb(im: Image.Image) -> np.ndarray:
    """Scale a 16-bit (or 32-bit integer holding 16-bit) grey image to 8-bit RGB."""
    grey = np.asarray(im)
    # "I" is 32-bit signed; clip to the 16-bit range it carries for PNG sources.
    grey16 = np.clip(grey, 0, 65535).astype(np.uint32)
    # Round-to-nearest division by 257 maps 0..65535 onto 0..255 exactly (65535 -> 255).
    grey8 = ((grey16 + 128) // 257).astype(np.uint8)
    return np.repeat(grey8[:, :, None], 3, axis=2)


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Convert any decoded mode to a C-contiguous (H, W, 3) uint8 array."""
    if im.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(im)
    if im.mode == "F":
        grey = np.clip(np.nan_to_num(np.asarray(im)), 0, 255).round().astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    # Alpha is dropped, keeping the colour stored under it (what SAM 3D's own loader does).
    rgb = im if im.mode == "RGB" else im.convert("RGB")
    return np.array(rgb, dtype=np.uint8)


def decode_image(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode JPEG/PNG/WebP bytes into an upright (H, W, 3) uint8 RGB array.

    EXIF orientation is applied, so H and W are those of the upright image. Raises
    ``Sam3dError`` with ``invalid_image`` (empty, unknown format, corrupt or truncated data)
    or ``image_too_large`` (more than ``max_bytes`` bytes, or more than ``max_pixels``
    pixels as declared by the header, checked before any pixel is decoded).
    """
    im, fmt = _checked_header(data, max_bytes, max_pixels)
    try:
        im.load()
        ImageOps.exif_transpose(im, in_place=True)
        return _to_rgb_array(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Sam3dError(ErrorCode.IMAGE_TOO_LARGE, f"{fmt} image is too large: {exc}") from exc
    except MemoryError as exc:
        raise Sam3dError(ErrorCode.IMAGE_TOO_LARGE, f"{fmt} image is too large to decode") from exc
    except Exception as exc:  # truncated data, bad EXIF, corrupt streams
        raise Sam3dError(ErrorCode.INVALID_IMAGE, f"cannot decode {fmt} image: {exc}") from exc
    finally:
        im.close()


_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap W and H


def read_image_size(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """(H, W) of the upright image from the header alone (EXIF orientation applied), with
    every check of :func:`decode_image` that needs no pixels; a PNG's chunks are also
    CRC-checked. Pixels that turn out corrupt fail the job later with ``invalid_image``."""
    im, fmt = _checked_header(data, max_bytes, max_pixels)
    try:
        width, height = im.size
        try:
            orientation = im.getexif().get(0x0112)
        except Exception as exc:  # a malformed EXIF block
            raise Sam3dError(ErrorCode.INVALID_IMAGE, f"cannot read {fmt} EXIF: {exc}") from exc
        _check_structure(im, fmt, bytes(data))
        if orientation in _TRANSPOSED_ORIENTATIONS:
            width, height = height, width
        return int(height), int(width)
    finally:
        im.close()


def _check_structure(im: ImageFile.ImageFile, fmt: str, data: bytes) -> None:
    """Cheap checks that catch truncated files without decoding a pixel."""
    if fmt == "PNG":
        try:
            # Walks the chunks, checking each CRC, up to IEND (on a fresh parse: Pillow
            # verifies only straight after opening).
            _open_header(data, fmt).verify()
        except Exception as exc:
            raise Sam3dError(ErrorCode.INVALID_IMAGE, f"corrupt PNG: {exc}") from exc
    elif fmt == "JPEG":
        # No 0xFFD9 can occur inside entropy-coded data (0xFF is always stuffed): the end
        # marker after the first scan's start proves the file was not cut short.
        scan = im.tile[0][2] if im.tile else 0
        if data.find(b"\xff\xd9", scan) < 0:
            raise Sam3dError(ErrorCode.INVALID_IMAGE, "JPEG image is truncated (no end marker)")
    elif len(data) < 8 + int.from_bytes(data[4:8], "little"):
        raise Sam3dError(ErrorCode.INVALID_IMAGE, "WEBP image is truncated (RIFF size)")


def _checked_header(data: object, max_bytes: int, max_pixels: int):
    """The parsed header of accepted, small enough image bytes, and its format."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise Sam3dError(
            ErrorCode.INVALID_IMAGE, f"image data must be bytes, not {type(data).__name__}"
        )
    data = bytes(data)
    if not data:
        raise Sam3dError(ErrorCode.INVALID_IMAGE, "image data is empty")
    if len(data) > max_bytes:
        raise Sam3dError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"image is {len(data)} bytes; the limit is {max_bytes} bytes",
        )
    fmt = _sniff_format(data)
    if fmt is None:
        raise Sam3dError(ErrorCode.INVALID_IMAGE, _describe_unknown(data))

    try:
        im = _open_header(data, fmt)
    except Image.DecompressionBombError as exc:
        raise Sam3dError(ErrorCode.IMAGE_TOO_LARGE, f"{fmt} image is too large: {exc}") from exc
    except Exception as exc:  # Pillow raises SyntaxError, OSError, ValueError, struct.error...
        raise Sam3dError(ErrorCode.INVALID_IMAGE, f"cannot read {fmt} header: {exc}") from exc

    if im.format != fmt:
        raise Sam3dError(ErrorCode.INVALID_IMAGE, f"expected a {fmt} image, got {im.format}")
    width, height = im.size
    if width <= 0 or height <= 0:
        raise Sam3dError(ErrorCode.INVALID_IMAGE, f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise Sam3dError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"image is {width}x{height} = {width * height} pixels; "
            f"the limit is {max_pixels} pixels",
        )
    return im, fmt


def load_image(
    path: str | Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Read an image file and decode it like :func:`decode_image`."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise Sam3dError(
                ErrorCode.IMAGE_TOO_LARGE,
                f"image file {path} is {size} bytes; the limit is {max_bytes} bytes",
            )
        data = path.read_bytes()
    except OSError as exc:
        raise Sam3dError(
            ErrorCode.INVALID_IMAGE, f"cannot read image file {path}: {exc.strerror or exc}"
        ) from exc
    return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)


def encode_png(array: np.ndarray) -> bytes:
    """Encode an (H, W) or (H, W, 1|3|4) uint8 (or bool (H, W)) array as PNG bytes."""
    arr = np.asarray(array)
    if arr.dtype == np.bool_ and arr.ndim == 2:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise Sam3dError(
            ErrorCode.INVALID_IMAGE, f"encode_png needs a uint8 array, got dtype {arr.dtype}"
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    channels_ok = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))
    if not channels_ok or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise Sam3dError(
            ErrorCode.INVALID_IMAGE, f"encode_png cannot encode an array of shape {arr.shape}"
        )
    buf = io.BytesIO()
    # Pillow infers L / RGB / RGBA from the shape of a uint8 array.
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()
