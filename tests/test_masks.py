"""Mask decoding: every format, the ambiguous nested lists, COCO files, limits, bad input."""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from jobs.errors import ErrorCode, Sam3dError
from jobs.masks import (
    MASK_FORMATS,
    RleMasks,
    decode_masks,
    encode_masks_rle,
    load_mask_file,
    load_mask_files,
    mask_stats,
)

H, W = 24, 32
SIZE = (H, W)


def _box(y0: int, y1: int, x0: int, x1: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _box_polygon(y0: int, y1: int, x0: int, x1: int) -> list[int]:
    """The flat COCO polygon whose raster is exactly ``_box(y0, y1, x0, x1)``."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _box_points(y0: int, y1: int, x0: int, x1: int) -> list[list[int]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


A = _box(2, 10, 3, 12)
B = _box(12, 20, 15, 30)
C = _box(5, 8, 20, 25)
A_POLY, B_POLY, C_POLY = (
    _box_polygon(2, 10, 3, 12),
    _box_polygon(12, 20, 15, 30),
    _box_polygon(5, 8, 20, 25),
)


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE, built by hand: column-major runs, zeros first."""
    flat = mask.T.reshape(-1)
    counts: list[int] = []
    current, run = False, 0
    for value in flat:
        if bool(value) == current:
            run += 1
        else:
            counts.append(run)
            current, run = bool(value), 1
    counts.append(run)
    return {"counts": counts, "size": list(mask.shape)}


def _decode(mask_input: object, **kwargs: Any) -> np.ndarray:
    return decode_masks(mask_input, SIZE, **kwargs)


def _error(mask_input: object, size: tuple[int, int] = SIZE, **kwargs: Any) -> Sam3dError:
    with pytest.raises(Sam3dError) as exc_info:
        decode_masks(mask_input, size, **kwargs)
    assert "\n" not in exc_info.value.message
    return exc_info.value


def _assert_masks(out: np.ndarray, *expected: np.ndarray) -> None:
    assert out.dtype == np.bool_
    assert out.shape == (len(expected), H, W)
    for got, want in zip(out, expected, strict=True):
        np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- binary


def test_binary_numpy_one_mask_of_each_dtype() -> None:
    _assert_masks(_decode(A), A)
    _assert_masks(_decode(A.astype(np.uint8) * 255), A)
    _assert_masks(_decode(A.astype(np.int64)), A)
    probs = np.where(A, 0.6, 0.4).astype(np.float32)
    _assert_masks(_decode(probs), A)
    _assert_masks(_decode(A, mask_format="binary"), A)


def test_binary_numpy_stack_and_list_of_arrays() -> None:
    _assert_masks(_decode(np.stack([A, B, C])), A, B, C)
    _assert_masks(_decode([A, B.astype(np.uint8), C.astype(np.float64)]), A, B, C)
    _assert_masks(_decode([A, B], mask_format="binary"), A, B)


def test_binary_nested_list_is_one_object_not_h_polygons() -> None:
    """The original SDK read an (H, W) nested list as H polygons."""
    nested = A.astype(int).tolist()
    _assert_masks(_decode(nested), A)
    _assert_masks(_decode(A.tolist()), A)  # booleans
    _assert_masks(_decode(nested, mask_format="binary"), A)


def test_binary_nested_list_even_when_rows_look_like_polygons() -> None:
    """W even and >= 6: every row could be a flat polygon, yet it is one binary mask."""
    assert W % 2 == 0
    _assert_masks(_decode(B.astype(int).tolist()), B)


def test_list_of_binary_nested_lists_is_n_objects_not_a_crash() -> None:
    """The original SDK crashed on a list of binary masks sent as nested lists."""
    nested = [A.astype(int).tolist(), B.astype(int).tolist(), C.tolist()]
    _assert_masks(_decode(nested), A, B, C)
    _assert_masks(_decode(nested, mask_format="binary"), A, B, C)


def test_explicit_binary_nested_list_thresholds() -> None:
    _assert_masks(_decode((A * 255).astype(int).tolist(), mask_format="binary"), A)
    _assert_masks(_decode(np.where(A, 0.9, 0.1).tolist(), mask_format="binary"), A)


def test_binary_size_mismatch_names_both_sizes() -> None:
    err = _error(np.zeros((H + 1, W), dtype=bool))
    assert err.code == ErrorCode.MASK_SIZE_MISMATCH
    assert f"{H + 1}x{W}" in err.message and f"{H}x{W}" in err.message
    assert _error(np.zeros((2, H, W + 1), bool)).code == ErrorCode.MASK_SIZE_MISMATCH
    assert _error([A, np.ones((H, W - 1), bool)]).code == ErrorCode.MASK_SIZE_MISMATCH


@pytest.mark.parametrize(
    "array",
    [
        np.ones((1, 1, H, W), dtype=bool),
        np.ones(W, dtype=bool),
        np.full((H, W), "1"),
        np.full((H, W), None, dtype=object),
        np.ones((H, W), dtype=np.complex64),
    ],
    ids=["4d", "1d", "str", "object", "complex"],
)
def test_binary_bad_arrays(array: np.ndarray) -> None:
    assert _error(array).code == ErrorCode.INVALID_MASK


# --------------------------------------------------------------------------- png


def test_png_grey_0_255_and_0_1() -> None:
    _assert_masks(_decode(_png(A.astype(np.uint8) * 255)), A)
    _assert_masks(_decode(_png(A.astype(np.uint8))), A)  # values 0/1: > 0
    _assert_masks(_decode(_png(A.astype(np.uint8) * 255), mask_format="png"), A)


def test_png_grey_threshold_is_128() -> None:
    grey = np.where(A, 200, 0).astype(np.uint8)
    grey[B] = 100  # below half: not set
    _assert_masks(_decode(_png(grey)), A)


def test_png_alpha_channel_wins_when_not_constant() -> None:
    rgba = np.zeros((H, W, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white everywhere: the colour says nothing
    rgba[..., 3] = A.astype(np.uint8) * 255
    _assert_masks(_decode(_png(rgba, "RGBA")), A)
    la = np.stack([np.full((H, W), 255, np.uint8), A.astype(np.uint8) * 255], axis=2)
    _assert_masks(_decode(_png(la, "LA")), A)


def test_png_constant_alpha_falls_back_to_colour() -> None:
    rgba = np.zeros((H, W, 4), dtype=np.uint8)
    rgba[A, 0] = 255  # pure red object: bright in its brightest channel
    rgba[..., 3] = 255
    _assert_masks(_decode(_png(rgba, "RGBA")), A)
    _assert_masks(_decode(_png(rgba[..., :3].copy(), "RGB")), A)


def test_png_palette_uses_index() -> None:
    im = Image.fromarray(np.where(A, 2, 0).astype(np.uint8), "P")
    im.putpalette([0, 0, 0, 0, 0, 0, 1, 1, 1] + [0, 0, 0] * 253)  # index 2 is almost black
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    _assert_masks(_decode(buf.getvalue()), A)


def test_png_bilevel_and_sixteen_bit() -> None:
    bilevel = Image.fromarray(A)  # mode "1"
    buf = io.BytesIO()
    bilevel.save(buf, format="PNG")
    _assert_masks(_decode(buf.getvalue()), A)
    sixteen = np.where(A, 65535, 0).astype(np.uint16)
    sixteen[B] = 20000  # below half scale
    _assert_masks(_decode(_png(sixteen)), A)


def test_png_base64_and_data_url_and_lists() -> None:
    data = _png(A.astype(np.uint8) * 255)
    text = base64.b64encode(data).decode()
    _assert_masks(_decode(text), A)
    _assert_masks(_decode("data:image/png;base64," + text), A)
    _assert_masks(_decode(text, mask_format="png"), A)
    other = _png(B.astype(np.uint8) * 255)
    _assert_masks(_decode([data, other]), A, B)
    _assert_masks(_decode([text, base64.b64encode(other).decode()]), A, B)
    _assert_masks(_decode([data, other], mask_format="png"), A, B)


def test_png_size_mismatch() -> None:
    err = _error(_png(np.zeros((H, W + 2), np.uint8)))
    assert err.code == ErrorCode.MASK_SIZE_MISMATCH
    assert f"{H}x{W + 2}" in err.message


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_png_bomb_mask_is_refused_by_size_before_decoding() -> None:
    start = time.perf_counter()
    err = _error(_png_claiming(60_000, 60_000))
    assert time.perf_counter() - start < 0.5
    assert err.code == ErrorCode.MASK_SIZE_MISMATCH


def test_png_with_the_right_size_but_truncated_data_is_invalid() -> None:
    assert _error(_png_claiming(W, H)).code == ErrorCode.INVALID_MASK


@pytest.mark.parametrize(
    "value",
    [
        b"\xff\xd8\xff\xe0 a jpeg",
        b"not a png",
        "!!! not base64 !!!",
        "data:image/png,rawtext",
        base64.b64encode(b"not a png either").decode(),
        "",
        [b"not a png"],
        [_png(A.astype(np.uint8) * 255)[:60]],
    ],
    ids=[
        "jpeg",
        "garbage-bytes",
        "bad-base64",
        "data-url-no-b64",
        "b64-non-png",
        "empty",
        "list",
        "cut",
    ],
)
def test_png_bad_inputs(value: object) -> None:
    assert _error(value).code == ErrorCode.INVALID_MASK


# --------------------------------------------------------------------------- polygons


def test_polygon_one_flat() -> None:
    _assert_masks(_decode(A_POLY), A)
    _assert_masks(_decode([float(v) for v in A_POLY]), A)
    _assert_masks(_decode(A_POLY, mask_format="polygon"), A)
    _assert_masks(_decode(np.asarray(A_POLY), mask_format="polygon"), A)


def test_polygon_several_flat_are_one_object_each() -> None:
    _assert_masks(_decode([A_POLY, B_POLY, C_POLY]), A, B, C)
    _assert_masks(_decode([A_POLY, B_POLY], mask_format="polygon"), A, B)


def test_polygon_objects_made_of_several_polygons() -> None:
    out = _decode([[A_POLY, C_POLY], [B_POLY]])
    _assert_masks(out, A | C, B)
    _assert_masks(_decode([[A_POLY, C_POLY]], mask_format="polygon"), A | C)


def test_points_one_and_several() -> None:
    pa, pb = _box_points(2, 10, 3, 12), _box_points(12, 20, 15, 30)
    _assert_masks(_decode(pa), A)
    _assert_masks(_decode([pa, pb]), A, B)
    _assert_masks(_decode(pa, mask_format="points"), A)
    _assert_masks(_decode([pa, pb], mask_format="points"), A, B)
    _assert_masks(_decode(np.asarray(pa), mask_format="points"), A)
    _assert_masks(_decode([tuple(map(tuple, pa))]), A)  # tuples work like lists


def test_points_with_unequal_lengths() -> None:
    tri = [[3, 2], [12, 2], [12, 10]]
    out = _decode([tri, _box_points(12, 20, 15, 30)])
    assert out.shape == (2, H, W)
    np.testing.assert_array_equal(out[1], B)


def test_polygon_outside_the_image_is_clipped() -> None:
    _assert_masks(_decode([-5, -5, W + 5, -5, W + 5, H + 5, -5, H + 5]), np.ones(SIZE, bool))
    _assert_masks(_decode(_box_polygon(-10, 10, -10, 12)), _box(0, 10, 0, 12))


def test_polygon_with_far_away_coordinates_is_fast_and_right() -> None:
    """Far vertices are clipped first: pycocotools' cost grows with the perimeter."""
    far = [-1e8, -1e8, 1e8, 1e8, -1e8, 1e8]  # the half-plane y >= x
    near = [-40, -40, 100, 100, -40, 100]
    start = time.perf_counter()
    out = _decode(far)
    assert time.perf_counter() - start < 0.5
    np.testing.assert_array_equal(out, _decode(near))
    rows, cols = np.mgrid[0:H, 0:W]
    assert out[0][rows > cols + 1].all() and not out[0][rows < cols - 1].any()


def test_polygon_entirely_outside_is_empty() -> None:
    err = _error(_box_polygon(-30, -20, 5, 10))
    assert err.code == ErrorCode.EMPTY_MASK


@pytest.mark.parametrize(
    ("value", "fmt"),
    [
        ([1, 2, 3, 4], None),  # 2 points
        ([1, 2, 3, 4, 5, 6, 7], "polygon"),  # odd
        ([1, 2, 3, 4, 5, float("nan")], None),
        ([1, 2, 3, 4, 5, float("inf")], None),
        ([1, 2, 3, 4, 5, 1e300], None),
        ([1, 2, 3, "4", 5, 6], None),
        ([1, 2, 3, None, 5, 6], None),
        ([True, 2, 3, 4, 5, 6], "polygon"),
        ([[1, 2], [3, 4]], None),  # 2 points
        ([[1, 2], [3, 4], [5]], "points"),
        ([[1, 2], [3, 4], [5, "x"]], "points"),
        ([[1, 2, 3], [3, 4, 5], [5, 6, 7]], "points"),
        ([[[1, 2], [3, 4], [5, 6]]], "polygon"),  # points under "polygon": no guessing
        ([[1, 2, 3, 4, 5, 6], [1, 2]], None),
        ([[1, 2, 3, 4, 5, 6], 7], None),
        ([[[1, 2, 3, 4, 5, 6]], []], None),
        ([[[[1, 2, 3, 4, 5, 6]]]], None),  # too deep
        ([[[[1, 2, 3, 4, 5, 6]]]], "polygon"),
        ([1, 2, 3, 4, 5, 6], "points"),
    ],
)
def test_bad_polygons(value: object, fmt: str | None) -> None:
    assert _error(value, mask_format=fmt).code == ErrorCode.INVALID_MASK


# --------------------------------------------------------------------------- rle


def test_rle_compressed_one_and_many() -> None:
    rles = encode_masks_rle(np.stack([A, B]))
    assert all(isinstance(r["counts"], str) for r in rles)
    json.dumps(rles)  # JSON-ready
    _assert_masks(_decode(rles[0]), A)
    _assert_masks(_decode(rles), A, B)
    _assert_masks(_decode(rles, mask_format="rle"), A, B)
    _assert_masks(_decode(encode_masks_rle(C)), C)  # one (H, W) mask encodes too
    as_bytes = {"counts": rles[0]["counts"].encode(), "size": [H, W]}
    _assert_masks(_decode(as_bytes), A)


def test_rle_uncompressed_list_counts() -> None:
    _assert_masks(_decode(_uncompressed_rle(A)), A)
    _assert_masks(_decode([_uncompressed_rle(A), _uncompressed_rle(B)]), A, B)
    # A mask whose first pixel is set starts with a zero-length run of zeros.
    corner = _box(0, 3, 0, 3)
    rle = _uncompressed_rle(corner)
    assert rle["counts"][0] == 0
    _assert_masks(_decode(rle, mask_format="rle"), corner)


def test_rle_matches_pycocotools() -> None:
    rle = mask_utils.encode(np.asfortranarray(C.astype(np.uint8)))
    _assert_masks(_decode(rle), C)


def test_rle_size_mismatch() -> None:
    rle = encode_masks_rle(np.zeros((H, W + 1), bool) | _box(1, 3, 1, 3, (H, W + 1)))[0]
    err = _error(rle)
    assert err.code == ErrorCode.MASK_SIZE_MISMATCH
    assert f"{H}x{W + 1}" in err.message


@pytest.mark.parametrize(
    "rle",
    [
        {"counts": [H * W - 1], "size": [H, W]},  # too few pixels
        {"counts": [H * W, 1], "size": [H, W]},  # too many
        {"counts": [-1, H * W + 1], "size": [H, W]},
        {"counts": [1.5, H * W - 1.5], "size": [H, W]},
        {"counts": [True], "size": [H, W]},
        {"counts": [], "size": [H, W]},
        {"counts": "", "size": [H, W]},
        {"counts": "0" * 3, "size": [H, W]},
        {"counts": "abc~~~", "size": [H, W]},  # characters outside '0'..'o'
        {"counts": "ooooo", "size": [H, W]},  # ends mid-number
        {"counts": "\u00e9\u00e9", "size": [H, W]},
        {"counts": 12, "size": [H, W]},
        {"counts": None, "size": [H, W]},
        {"counts": [[1, 2]], "size": [H, W]},
        {"counts": [H * W], "size": [H]},
        {"counts": [H * W], "size": "HW"},
        {"counts": [H * W], "size": [H, -W]},
        {"counts": [H * W], "size": [float("nan"), W]},
        {"counts": [H * W]},
        {"size": [H, W]},
    ],
)
def test_bad_rles(rle: dict[str, Any]) -> None:
    err = _error(rle, mask_format="rle")
    assert err.code in (ErrorCode.INVALID_MASK, ErrorCode.MASK_SIZE_MISMATCH)
    if "size" in rle and rle["size"] == [H, W]:
        assert err.code == ErrorCode.INVALID_MASK


def test_rle_string_whose_counts_overrun_is_refused() -> None:
    """pycocotools would write past its buffer for counts summing beyond H*W."""
    big = encode_masks_rle(np.ones((H * 2, W), bool))[0]["counts"]
    err = _error({"counts": big, "size": [H, W]})
    assert err.code == ErrorCode.INVALID_MASK
    assert "cover" in err.message


# --------------------------------------------------------------------------- coco


def _coco() -> dict[str, Any]:
    crowd = _uncompressed_rle(C)
    return {
        "info": {"description": "test"},
        "images": [
            {"id": 7, "file_name": "train/first.jpg", "height": H, "width": W},
            {"id": 9, "file_name": "train/second.jpg", "height": H, "width": W},
            {"id": 11, "file_name": "val/empty.jpg", "height": H, "width": W},
        ],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "segmentation": [A_POLY], "iscrowd": 0},
            {"id": 2, "image_id": 9, "category_id": 1, "segmentation": [B_POLY], "iscrowd": 0},
            {
                "id": 3,
                "image_id": 7,
                "category_id": 1,
                "segmentation": encode_masks_rle(B)[0],
                "iscrowd": 0,
            },
            {"id": 4, "image_id": 7, "category_id": 1, "segmentation": crowd, "iscrowd": 1},
            {
                "id": 5,
                "image_id": 9,
                "category_id": 1,
                "segmentation": [A_POLY, C_POLY],
                "iscrowd": 0,
            },
        ],
    }


def test_coco_by_image_id_in_file_order() -> None:
    _assert_masks(_decode(_coco(), image_id=7), A, B, C)
    _assert_masks(_decode(_coco(), image_id=9), B, A | C)
    _assert_masks(_decode(_coco(), image_id=9, mask_format="coco"), B, A | C)


def test_coco_by_file_name_basename() -> None:
    _assert_masks(_decode(_coco(), file_name="second.jpg"), B, A | C)
    _assert_masks(_decode(_coco(), file_name="/data/elsewhere/first.jpg"), A, B, C)


def test_coco_single_image_is_chosen_automatically() -> None:
    coco = _coco()
    coco["images"] = coco["images"][:1]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] == 7]
    _assert_masks(_decode(coco), A, B, C)


def test_coco_without_images_but_one_image_id() -> None:
    coco = {"annotations": [a for a in _coco()["annotations"] if a["image_id"] == 9]}
    _assert_masks(_decode(coco), B, A | C)


def test_coco_with_several_images_needs_a_choice() -> None:
    err = _error(_coco())
    assert err.code == ErrorCode.INVALID_MASK
    assert "3 images" in err.message and "image_id" in err.message and "file_name" in err.message


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"image_id": 8}, "no image with id"),
        ({"file_name": "missing.jpg"}, "no image named"),
        ({"image_id": 11}, "no annotations"),
        ({"image_id": 7, "file_name": "second.jpg"}, "not"),
    ],
)
def test_coco_bad_choices(kwargs: dict[str, Any], needle: str) -> None:
    err = _error(_coco(), **kwargs)
    assert err.code == ErrorCode.INVALID_MASK
    assert needle in err.message


def test_coco_image_size_mismatch() -> None:
    err = _error(_coco(), size=(H, W + 4), image_id=7)
    assert err.code == ErrorCode.MASK_SIZE_MISMATCH
    assert f"{H}x{W}" in err.message and f"{H}x{W + 4}" in err.message


def test_coco_duplicate_file_names_need_image_id() -> None:
    coco = _coco()
    coco["images"][1]["file_name"] = "other/first.jpg"
    assert "pass image_id" in _error(coco, file_name="first.jpg").message


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["annotations"][0].pop("segmentation"),
        lambda c: c["annotations"][0].update(segmentation=[]),
        lambda c: c["annotations"][0].update(segmentation="polygon"),
        lambda c: c["annotations"][0].update(segmentation=[[1, 2, 3]]),
        lambda c: c["annotations"][2].update(segmentation={"counts": "zz"}),
        lambda c: c.update(annotations="none"),
        lambda c: c.update(annotations=[1, 2]),
        lambda c: c.update(images={"id": 7}),
        lambda c: c["images"][0].update(height="tall"),
    ],
)
def test_coco_malformed(mutate: Any) -> None:
    coco = copy.deepcopy(_coco())
    mutate(coco)
    assert _error(coco, image_id=7).code == ErrorCode.INVALID_MASK


# --------------------------------------------------------------------------- ambiguity


def test_depth2_pairs_are_one_points_polygon() -> None:
    out = _decode(_box_points(2, 10, 3, 12))
    assert out.shape[0] == 1


def test_depth2_equal_length_polygons_are_several_objects() -> None:
    out = _decode([A_POLY, B_POLY, C_POLY])  # rectangular but not 0/1
    assert out.shape[0] == 3


def test_depth2_zero_one_grid_of_wrong_size_is_a_size_mismatch() -> None:
    err = _error(_box(1, 5, 1, 7, (10, 8)).astype(int).tolist())
    assert err.code == ErrorCode.MASK_SIZE_MISMATCH
    assert "10x8" in err.message


def test_depth3_zero_one_grids_of_wrong_size_are_a_size_mismatch() -> None:
    grid = _box(1, 5, 1, 7, (10, 8)).astype(int).tolist()
    assert _error([grid, grid]).code == ErrorCode.MASK_SIZE_MISMATCH
    assert _error([A.astype(int).tolist(), grid]).code == ErrorCode.MASK_SIZE_MISMATCH


def test_explicit_format_turns_guessing_off() -> None:
    # Pairs read as flat polygons of one point each under "polygon".
    assert _error(_box_points(2, 10, 3, 12), mask_format="polygon").code == ErrorCode.INVALID_MASK
    # A polygon list read as a binary mask is a 2-D grid of the wrong size.
    err = _error([A_POLY, B_POLY], mask_format="binary")
    assert err.code == ErrorCode.MASK_SIZE_MISMATCH
    assert _error(A, mask_format="png").code == ErrorCode.INVALID_MASK
    assert _error(A_POLY, mask_format="rle").code == ErrorCode.INVALID_MASK
    assert _error(A_POLY, mask_format="coco").code == ErrorCode.INVALID_MASK
    _assert_masks(_decode(A_POLY, mask_format=" Polygon "), A)


def test_unknown_mask_format_lists_the_valid_ones() -> None:
    err = _error(A, mask_format="bitmap")
    assert err.code == ErrorCode.INVALID_MASK
    assert all(name in err.message for name in MASK_FORMATS)
    assert _error(A, mask_format=3).code == ErrorCode.INVALID_MASK  # type: ignore[arg-type]


# --------------------------------------------------------------------------- counts


def test_empty_mask_names_its_index() -> None:
    err = _error(np.stack([A, np.zeros(SIZE, bool), B]))
    assert err.code == ErrorCode.EMPTY_MASK
    assert "mask 1" in err.message


def test_no_objects_is_invalid() -> None:
    for value in ([], (), np.zeros((0, H, W), bool)):
        assert _error(value).code == ErrorCode.INVALID_MASK
    assert _error([], mask_format="rle").code == ErrorCode.INVALID_MASK


def test_too_many_masks() -> None:
    polys = [_box_polygon(i % 20, i % 20 + 2, 1, 5) for i in range(65)]
    err = _error(polys)
    assert err.code == ErrorCode.TOO_MANY_MASKS
    assert "65" in err.message and "64" in err.message
    assert _decode(polys[:64]).shape[0] == 64
    assert _error(np.stack([A, B, C]), max_masks=2).code == ErrorCode.TOO_MANY_MASKS


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        3.5,
        True,
        object(),
        {1, 2, 3},
        {},
        {"foo": 1},
        {"counts": "x"},
        [None],
        [[None]],
        [[[None]]],
        [{}],
        [{"counts": "x"}],
        [{"annotations": []}],
        [A, "text"],
        [{"counts": "0", "size": [H, W]}, b"png"],
        [[1, 2], [3, [4]]],
        [1, [2, 3]],
        [[1, 2, 3, 4, 5, 6], None],
        [[[[[1]]]]],
        [[], []],
        [[[]]],
        {"annotations": {}},
        {"annotations": [], "images": []},
        {"annotations": [{"image_id": 1, "segmentation": "x"}]},
        [float("nan")] * 6,
        [10**30] * 6,
    ],
)
def test_garbage_gives_invalid_mask(value: object) -> None:
    err = _error(value)
    assert err.code == ErrorCode.INVALID_MASK


@pytest.mark.parametrize("size", [(0, W), (H,), (H, W, 3), "HW", (H, 2.5), (True, W), None])
def test_bad_image_size(size: Any) -> None:
    with pytest.raises(Sam3dError) as exc_info:
        decode_masks(A, size)
    assert exc_info.value.code == ErrorCode.INVALID_REQUEST


_MEMORY_PROBE = """
import json, resource, sys
from jobs.masks import decode_masks

h, w = 3072, 4096
polygons = [[200 * i, 100, 200 * i + 150, 100, 200 * i + 150, 2900, 200 * i, 2900]
            for i in range(20)]
# The same boxes as uncompressed RLE, written out by hand (column-major runs, zeros first).
rles = []
for i in range(20):
    x0, x1, y0, y1 = 200 * i, 200 * i + 150, 100, 2900
    counts = [x0 * h + y0] + [y1 - y0, h - (y1 - y0)] * (x1 - x0 - 1)
    counts += [y1 - y0, (w - x1) * h + h - y1]
    rles.append({"counts": counts, "size": [h, w]})

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

base = peak_mb()
from_polygons = decode_masks(polygons, (h, w))
after_polygons = peak_mb()
del from_polygons
from_rles = decode_masks(rles, (h, w))
after_rles = peak_mb()
print(json.dumps({"base": base, "polygons": after_polygons - base, "rles": after_rles - base,
                  "shape": list(from_rles.shape), "area": int(from_rles[3].sum())}))
"""


def test_large_masks_stay_small_in_memory() -> None:
    """20 masks of 4096x3072 cost their 250 MB of bools, not GBs of intermediates.

    Measured as the peak resident size of a fresh process, so that pycocotools' own C
    buffers count too.
    """
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    report = json.loads(result.stdout)
    assert report["shape"] == [20, 3072, 4096]
    assert report["area"] == 150 * 2800
    output_mb = 20 * 3072 * 4096 / 2**20
    assert report["polygons"] < output_mb + 150, report
    # The polygon output was freed but the peak stays: both decodes together stay small.
    assert report["rles"] < output_mb + 150, report


# --------------------------------------------------------------------------- stats


def test_mask_stats() -> None:
    assert mask_stats(A) == {"area": 8 * 9, "bbox": [3, 2, 9, 8]}
    single = np.zeros(SIZE, bool)
    single[5, 7] = True
    assert mask_stats(single) == {"area": 1, "bbox": [7, 5, 1, 1]}
    assert mask_stats(np.zeros(SIZE, bool)) == {"area": 0, "bbox": [0, 0, 0, 0]}
    stats = mask_stats(A | B)
    assert stats["area"] == int(A.sum() + B.sum())
    assert stats["bbox"] == [3, 2, 27, 18]
    np.testing.assert_allclose(
        stats["bbox"],
        mask_utils.toBbox(mask_utils.encode(np.asfortranarray((A | B).astype(np.uint8)))),
    )


# --------------------------------------------------------------------------- files


def test_load_several_png_files_in_order(tmp_path: Path) -> None:
    paths = []
    for name, mask in (("b.png", B), ("a.png", A), ("c.PNG", C)):
        path = tmp_path / name
        path.write_bytes(_png(mask.astype(np.uint8) * 255))
        paths.append(path)
    _assert_masks(load_mask_files(paths, SIZE), B, A, C)
    _assert_masks(load_mask_file(paths[1], SIZE), A)


def test_load_npy_files(tmp_path: Path) -> None:
    np.save(tmp_path / "stack.npy", np.stack([A, B]))
    np.save(tmp_path / "one.npy", C.astype(np.uint8))
    out = load_mask_files([tmp_path / "stack.npy", str(tmp_path / "one.npy")], SIZE)
    _assert_masks(out, A, B, C)


def test_load_json_files(tmp_path: Path) -> None:
    (tmp_path / "coco.json").write_text(json.dumps(_coco()))
    (tmp_path / "rle.json").write_text(json.dumps(encode_masks_rle(np.stack([C, A]))))
    (tmp_path / "poly.json").write_text(json.dumps(B_POLY))
    _assert_masks(load_mask_file(tmp_path / "coco.json", SIZE, file_name="second.jpg"), B, A | C)
    _assert_masks(load_mask_file(tmp_path / "rle.json", SIZE), C, A)
    _assert_masks(load_mask_file(tmp_path / "poly.json", SIZE, mask_format="polygon"), B)
    out = load_mask_files([tmp_path / "rle.json", tmp_path / "poly.json"], SIZE)
    _assert_masks(out, C, A, B)


def test_load_mask_file_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "mask.bmp").write_bytes(b"BM")
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "fake.png").write_bytes(b"not a png")
    for name in ("bad.json", "mask.bmp", "pickled.npy", "fake.png", "missing.png"):
        with pytest.raises(Sam3dError) as exc_info:
            load_mask_file(tmp_path / name, SIZE)
        assert exc_info.value.code == ErrorCode.INVALID_MASK, name
    with pytest.raises(Sam3dError) as exc_info:
        load_mask_files([], SIZE)
    assert exc_info.value.code == ErrorCode.INVALID_MASK


def test_load_mask_files_counts_objects_across_files(tmp_path: Path) -> None:
    np.save(tmp_path / "stack.npy", np.stack([A, B, C]))
    with pytest.raises(Sam3dError) as exc_info:
        load_mask_files([tmp_path / "stack.npy", tmp_path / "stack.npy"], SIZE, max_masks=5)
    assert exc_info.value.code == ErrorCode.TOO_MANY_MASKS
    assert load_mask_files([tmp_path / "stack.npy"] * 2, SIZE, max_masks=6).shape[0] == 6


def test_rle_masks_decoded_ahead_are_handed_out_once_and_equal_the_decode():
    masks = np.zeros((3, 40, 60), dtype=bool)
    masks[0, 5:20, 10:30] = True
    masks[1, 25:35, 40:55] = True
    masks[2, 0:40, 0:3] = True
    rles = RleMasks(encode_masks_rle(masks), (40, 60))
    ahead = np.ones((40, 60), dtype=bool)  # a stand-in array: the one handed out first
    rles.decode_ahead(1, ahead)
    rles.decode_ahead(2)
    assert rles[1] is ahead
    assert np.array_equal(rles[1], masks[1])  # the second access decodes the RLE again
    assert np.array_equal(rles[2], masks[2]) and np.array_equal(rles[0], masks[0])
