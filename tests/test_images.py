"""Image decoding: accepted formats, EXIF orientation, modes, limits and bad input."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.errors import ErrorCode, Sam3dError
from jobs.images import decode_image, encode_png, load_image

RED = (255, 0, 0)
BLUE = (0, 0, 255)


def _save(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **params)
    return buf.getvalue()


def _gradient(width: int = 16, height: int = 10) -> np.ndarray:
    """A small RGB image with distinct pixels, to check values come back untouched."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 15, y * 25, (x + y) * 7], axis=2).astype(np.uint8)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose header claims ``width`` x ``height`` grey pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _code(exc_info: pytest.ExceptionInfo[Sam3dError]) -> ErrorCode:
    return exc_info.value.code


# --------------------------------------------------------------------------- formats


def test_png_decodes_exactly() -> None:
    rgb = _gradient()
    out = decode_image(_save(Image.fromarray(rgb), "PNG"))
    assert out.dtype == np.uint8
    assert out.shape == (10, 16, 3)
    assert out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_array_equal(out, rgb)


def test_jpeg_decodes_close() -> None:
    rgb = np.zeros((32, 48, 3), dtype=np.uint8)
    rgb[:, :24] = RED
    rgb[:, 24:] = BLUE
    out = decode_image(_save(Image.fromarray(rgb), "JPEG", quality=95))
    assert out.shape == (32, 48, 3)
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 4


def test_webp_lossless_decodes_exactly() -> None:
    rgb = _gradient()
    out = decode_image(_save(Image.fromarray(rgb), "WEBP", lossless=True))
    np.testing.assert_array_equal(out, rgb)


def test_webp_lossy_decodes() -> None:
    rgb = np.full((20, 30, 3), 128, dtype=np.uint8)
    out = decode_image(_save(Image.fromarray(rgb), "WEBP", quality=90))
    assert out.shape == (20, 30, 3)
    assert np.abs(out.astype(int) - 128).max() < 6


# --------------------------------------------------------------------------- EXIF


@pytest.mark.parametrize(
    ("orientation", "red_corner"),
    [
        (1, "top_left"),
        (3, "bottom_right"),
        (6, "top_right"),  # stored rotated: display needs 90 degrees clockwise
        (8, "bottom_left"),  # display needs 90 degrees counter-clockwise
    ],
)
def test_exif_orientation_is_applied(orientation: int, red_corner: str) -> None:
    im = Image.new("RGB", (40, 20), BLUE)  # stored 40 wide, 20 high
    im.paste(RED, (0, 0, 10, 10))  # red top-left corner as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = decode_image(_save(im, "JPEG", exif=exif.tobytes(), quality=95))

    assert out.shape == ((40, 20, 3) if orientation in (6, 8) else (20, 40, 3))
    h, w = out.shape[:2]
    corners = {
        "top_left": out[4, 4],
        "top_right": out[4, w - 5],
        "bottom_left": out[h - 5, 4],
        "bottom_right": out[h - 5, w - 5],
    }
    for name, pixel in corners.items():
        if name == red_corner:
            assert pixel[0] > 200 and pixel[2] < 60, (name, pixel)
        else:
            assert pixel[2] > 200 and pixel[0] < 60, (name, pixel)


# --------------------------------------------------------------------------- modes


def test_rgba_drops_alpha_keeping_colour() -> None:
    rgba = np.zeros((6, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 1] = 100
    rgba[..., 2] = 50
    rgba[..., 3] = np.arange(8, dtype=np.uint8) * 30
    out = decode_image(_save(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert out.shape == (6, 8, 3)
    assert (out == [200, 100, 50]).all()


def test_la_becomes_grey_rgb() -> None:
    la = Image.new("LA", (5, 4), (90, 30))
    out = decode_image(_save(la, "PNG"))
    assert out.shape == (4, 5, 3)
    assert (out == 90).all()


def test_grey_becomes_rgb() -> None:
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5) * 12
    out = decode_image(_save(Image.fromarray(grey, "L"), "PNG"))
    np.testing.assert_array_equal(out, np.repeat(grey[:, :, None], 3, axis=2))


def test_bilevel_becomes_black_and_white() -> None:
    im = Image.new("1", (6, 3), 0)
    im.putpixel((2, 1), 1)
    out = decode_image(_save(im, "PNG"))
    assert (out[1, 2] == 255).all()
    assert out.sum() == 3 * 255


def test_palette_becomes_its_colours() -> None:
    im = Image.new("P", (6, 4), 0)
    im.putpalette([10, 20, 30, 250, 0, 5] + [0, 0, 0] * 254)
    im.putpixel((3, 2), 1)
    out = decode_image(_save(im, "PNG"))
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[2, 3]) == (250, 0, 5)


def test_palette_with_transparency_becomes_rgb() -> None:
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 40, 80, 120] + [0, 0, 0] * 254)
    out = decode_image(_save(im, "PNG", transparency=0))
    assert out.shape == (4, 4, 3)
    assert tuple(out[0, 0]) == (40, 80, 120)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257 * 10, 32768, 65535]], dtype=np.uint16)
    data = _save(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data)
    np.testing.assert_array_equal(out[0, :, 0], [0, 10, 128, 255])
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_cmyk_jpeg_becomes_rgb() -> None:
    im = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red in CMYK
    out = decode_image(_save(im, "JPEG", quality=95))
    assert out.shape == (8, 8, 3)
    assert out[4, 4, 0] > 200 and out[4, 4, 1] < 60 and out[4, 4, 2] < 60


# --------------------------------------------------------------------------- limits


def test_too_many_bytes() -> None:
    data = _save(Image.fromarray(_gradient()), "PNG")
    with pytest.raises(Sam3dError) as exc_info:
        decode_image(data, max_bytes=len(data) - 1)
    assert _code(exc_info) == ErrorCode.IMAGE_TOO_LARGE
    assert decode_image(data, max_bytes=len(data)).shape == (10, 16, 3)


def test_too_many_pixels() -> None:
    data = _save(Image.fromarray(_gradient(16, 10)), "PNG")
    with pytest.raises(Sam3dError) as exc_info:
        decode_image(data, max_pixels=159)
    assert _code(exc_info) == ErrorCode.IMAGE_TOO_LARGE
    assert decode_image(data, max_pixels=160).shape == (10, 16, 3)


def test_png_decompression_bomb_is_refused_fast() -> None:
    data = _bomb_png(50_000, 50_000)
    assert len(data) < 200
    start = time.perf_counter()
    with pytest.raises(Sam3dError) as exc_info:
        decode_image(data)
    assert time.perf_counter() - start < 0.5
    assert _code(exc_info) == ErrorCode.IMAGE_TOO_LARGE
    assert "50000x50000" in exc_info.value.message


def test_jpeg_header_claiming_huge_size_is_refused_fast() -> None:
    data = bytearray(_save(Image.new("RGB", (8, 8), RED), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 65000, 65000)  # height, width
    start = time.perf_counter()
    with pytest.raises(Sam3dError) as exc_info:
        decode_image(bytes(data))
    assert time.perf_counter() - start < 0.5
    assert _code(exc_info) == ErrorCode.IMAGE_TOO_LARGE


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_pillow_bomb_limit_never_escapes(monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """Pillow's own process-wide limit, even set absurdly low, only ever yields our errors."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    data = _save(Image.fromarray(_gradient(20, 20)), fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            out = decode_image(data)
        except Sam3dError as exc:
            assert exc.code == ErrorCode.IMAGE_TOO_LARGE
        else:
            assert out.shape == (20, 20, 3)


# --------------------------------------------------------------------------- bad input


def _gif() -> bytes:
    return _save(Image.new("P", (4, 4)), "GIF")


def _bmp() -> bytes:
    return _save(Image.new("RGB", (4, 4)), "BMP")


def _tiff() -> bytes:
    return _save(Image.new("RGB", (4, 4)), "TIFF")


def _truncated(fmt: str) -> bytes:
    rng = np.random.default_rng(1)
    noisy = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = _save(Image.fromarray(noisy), fmt)
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (_gif, "GIF"),
        (_bmp, "BMP"),
        (_tiff, "TIFF"),
        (lambda: b"", "empty"),
        (lambda: b"this is not an image at all", "format"),
        (lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "PNG"),
        (lambda: b"\xff\xd8\xff" + b"\x00" * 40, "JPEG"),
        (lambda: b"RIFF\x10\x00\x00\x00WEBPVP8 garbage", "WEBP"),
        (lambda: _truncated("PNG"), "PNG"),
        (lambda: _truncated("JPEG"), "JPEG"),
        (lambda: _truncated("WEBP"), "WEBP"),
    ],
    ids=[
        "gif",
        "bmp",
        "tiff",
        "empty",
        "garbage",
        "png-magic-only",
        "jpeg-magic-only",
        "webp-garbage",
        "png-truncated",
        "jpeg-truncated",
        "webp-truncated",
    ],
)
def test_bad_images_are_invalid(make: Callable[[], bytes], needle: str) -> None:
    with pytest.raises(Sam3dError) as exc_info:
        decode_image(make())
    assert _code(exc_info) == ErrorCode.INVALID_IMAGE
    assert needle.lower() in exc_info.value.message.lower()
    assert "\n" not in exc_info.value.message


@pytest.mark.parametrize("value", ["a string", None, 123])
def test_non_bytes_are_invalid(value: object) -> None:
    with pytest.raises(Sam3dError) as exc_info:
        decode_image(value)  # type: ignore[arg-type]
    assert _code(exc_info) == ErrorCode.INVALID_IMAGE


# --------------------------------------------------------------------------- files, encode


def test_load_image_reads_a_file(tmp_path: Path) -> None:
    rgb = _gradient()
    path = tmp_path / "photo.png"
    path.write_bytes(_save(Image.fromarray(rgb), "PNG"))
    np.testing.assert_array_equal(load_image(path), rgb)
    np.testing.assert_array_equal(load_image(str(path)), rgb)


def test_load_image_errors(tmp_path: Path) -> None:
    with pytest.raises(Sam3dError) as exc_info:
        load_image(tmp_path / "missing.jpg")
    assert _code(exc_info) == ErrorCode.INVALID_IMAGE
    with pytest.raises(Sam3dError) as exc_info:
        load_image(tmp_path)  # a directory
    assert _code(exc_info) == ErrorCode.INVALID_IMAGE
    path = tmp_path / "big.png"
    path.write_bytes(_save(Image.fromarray(_gradient()), "PNG"))
    with pytest.raises(Sam3dError) as exc_info:
        load_image(path, max_bytes=10)
    assert _code(exc_info) == ErrorCode.IMAGE_TOO_LARGE


def test_encode_png_round_trips() -> None:
    rgb = _gradient()
    data = encode_png(rgb)
    assert data.startswith(b"\x89PNG")
    np.testing.assert_array_equal(decode_image(data), rgb)
    grey = rgb[..., 0]
    np.testing.assert_array_equal(decode_image(encode_png(grey))[..., 1], grey)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    assert Image.open(io.BytesIO(encode_png(rgba))).mode == "RGBA"
    np.testing.assert_array_equal(decode_image(encode_png(rgba)), rgb)
    mask = grey > 100
    np.testing.assert_array_equal(decode_image(encode_png(mask))[..., 0], mask * 255)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 4, 3), dtype=np.float32),
        np.zeros((4, 4, 2), dtype=np.uint8),
        np.zeros((4,), dtype=np.uint8),
        np.zeros((0, 4, 3), dtype=np.uint8),
    ],
)
def test_encode_png_refuses_odd_arrays(array: np.ndarray) -> None:
    with pytest.raises(Sam3dError):
        encode_png(array)
