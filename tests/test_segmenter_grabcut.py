"""The grabcut segmenter on the project's own photo (samples/shapes.jpg) against hand-made
masks (tests/data/grabcut/shapes.json), and its promises: never an empty mask, never a
box-shaped one unannounced, the same mask for the same input. Prompt checking is tested
here too (jobs/prompts.py), without a server."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw
from service import TESTS

from jobs.errors import ErrorCode, Sam3dError
from jobs.prompts import SEGMENTER_PROMPTS, max_prompted_objects, parse_prompts
from worker.segmenters import get_segmenter
from worker.segmenters.grabcut import GrabCutSegmenter

HAND = json.loads((TESTS / "data" / "grabcut" / "shapes.json").read_text())


def polygons_mask(polygons: list, size: tuple[int, int]) -> np.ndarray:
    canvas = Image.new("L", (size[1], size[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        draw.polygon([tuple(p) for p in poly], fill=1, outline=1)
    return np.asarray(canvas, bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.asarray(Image.open(TESTS.parent / HAND["image"]).convert("RGB"))


@pytest.fixture(scope="module")
def truths(image) -> list[np.ndarray]:
    return [polygons_mask(o["polygons"], image.shape[:2]) for o in HAND["objects"]]


def test_loose_boxes_against_hand_masks(image, truths):
    prompts = [{"box": o["box"]} for o in HAND["objects"]]
    segments = GrabCutSegmenter().segment(image, prompts)
    assert [s.prompt for s in segments] == [0, 1, 2]
    scores = [iou(s.mask, t) for s, t in zip(segments, truths, strict=True)]
    assert min(scores) > 0.9, scores
    assert all(not s.notes and s.fallback is None and s.score is None for s in segments)


def test_looser_boxes_bbox_plus_20_percent(image, truths):
    """Boxes far looser than the hand-drawn ones (each mask's bounding box grown by 20 % of its
    size on every side) still give the object, not the background the box takes in."""
    seg = GrabCutSegmenter()
    for truth in truths:
        ys, xs = np.nonzero(truth)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        dx, dy = 0.2 * (x1 - x0), 0.2 * (y1 - y0)
        box = [max(0.0, x0 - dx), max(0.0, y0 - dy), min(640.0, x1 + dx), min(480.0, y1 + dy)]
        segment = seg.segment_one(image, {"box": [float(v) for v in box]}, 0)
        assert iou(segment.mask, truth) > 0.95 and not segment.notes


def test_one_click_on_each_object(image, truths):
    seg = GrabCutSegmenter()
    for i, truth in enumerate(truths):
        ys, xs = np.nonzero(truth)
        point = [float(np.median(xs)), float(np.median(ys)), 1]
        mask = seg.segment_one(image, {"points": [point]}, i).mask
        assert iou(mask, truth) > 0.6, (HAND["objects"][i]["name"], iou(mask, truth))
        assert mask[int(point[1]), int(point[0])]  # the clicked pixel is in its mask


def test_a_negative_click_takes_a_part_away(image, truths):
    """A click off the object (on the bottle's cap) takes that part out of the mask."""
    bottle = HAND["objects"][2]
    seg = GrabCutSegmenter()
    whole = seg.segment_one(image, {"box": bottle["box"]}, 0).mask
    body = seg.segment_one(image, {"box": bottle["box"], "points": [[570, 170, 0]]}, 0).mask
    assert whole[170, 570] and not body[170, 570]
    assert body.sum() < whole.sum()


def test_the_same_input_gives_the_same_mask(image):
    seg = GrabCutSegmenter()
    prompt = {"box": HAND["objects"][0]["box"]}
    assert np.array_equal(
        seg.segment_one(image, prompt, 0).mask, seg.segment_one(image, prompt, 0).mask
    )


def test_a_flat_patch_gives_an_announced_ellipse_never_an_empty_mask():
    """Nothing to cut in a uniform image: GrabCut keeps all or nothing of the box; the mask is
    then the inscribed ellipse and the notes say so."""
    flat = np.full((120, 160, 3), 128, np.uint8)
    segment = GrabCutSegmenter().segment_one(flat, {"box": [40.0, 30.0, 120.0, 90.0]}, 3)
    assert segment.mask.any() and segment.prompt == 3
    assert segment.fallback == "ellipse" or any("fills its box" in n for n in segment.notes)
    assert segment.notes
    ys, xs = np.nonzero(segment.mask)
    assert xs.min() >= 40 and xs.max() < 120 and ys.min() >= 30 and ys.max() < 90
    assert segment.to_dict()["notes"] == list(segment.notes)


def test_a_box_over_the_whole_photo_and_a_sliver_box(image):
    seg = GrabCutSegmenter()
    whole = seg.segment_one(image, {"box": [0.0, 0.0, 640.0, 480.0]}, 0)
    assert whole.mask.any()
    sliver = seg.segment_one(image, {"box": [300.0, 100.0, 302.0, 103.0]}, 0)
    assert sliver.mask.any() and sliver.mask.sum() <= 12


def test_get_segmenter_and_the_api_agree_on_what_each_reads():
    assert get_segmenter("grabcut").prompt_kinds == SEGMENTER_PROMPTS["grabcut"]
    from worker.segmenters.sam3 import Sam3Segmenter

    assert Sam3Segmenter.prompt_kinds == SEGMENTER_PROMPTS["sam3"]
    with pytest.raises(Sam3dError) as info:
        get_segmenter("sam4")
    assert info.value.code == "unknown_segmenter"


def test_prompts_are_normalised():
    prompts = parse_prompts(
        [
            {"box": [1, 2, 30, 40]},
            {"points": [[5, 5, 1], [6.5, 7, 0]]},
            {"box": [1, 1, 9, 9], "points": [[3, 3, 1]]},
            {"text": "  coffee   mug "},
        ],
        (50, 60),
        max_objects=8,
        segmenter="sam3",
    )
    assert prompts == [
        {"box": [1.0, 2.0, 30.0, 40.0]},
        {"points": [[5.0, 5.0, 1], [6.5, 7.0, 0]]},
        {"box": [1.0, 1.0, 9.0, 9.0], "points": [[3.0, 3.0, 1]]},
        {"text": "coffee mug", "max_objects": 8, "min_score": 0.5},
    ]
    assert max_prompted_objects(prompts, 8) == 8  # 3 + a text of up to 8, capped
    one = parse_prompts([{"box": [0, 0, 60, 50]}], (50, 60), max_objects=8, segmenter="grabcut")
    assert one == [{"box": [0.0, 0.0, 60.0, 50.0]}]  # the whole image is inside
    with pytest.raises(Sam3dError) as info:  # one object is still a list of one (the README)
        parse_prompts({"box": [0, 0, 60, 50]}, (50, 60), max_objects=8, segmenter="grabcut")
    assert info.value.code is ErrorCode.INVALID_PROMPT


@pytest.mark.parametrize(
    ("prompts", "code"),
    [
        ([{"box": [1, 2, 3]}], "invalid_prompt"),
        ([{"box": [1, 2, 3, "4"]}], "invalid_prompt"),
        ([{"box": [True, 2, 30, 40]}], "invalid_prompt"),
        ([{"box": [-1, 2, 30, 40]}], "prompt_out_of_bounds"),
        ([{"box": [1, 2, 30, 51]}], "prompt_out_of_bounds"),
        ([{"points": []}], "invalid_prompt"),
        ([{"points": [[1, 2]]}], "invalid_prompt"),
        ([{"points": [[1, 2, True]]}], "invalid_prompt"),
        ([{"points": [[61, 2, 1]]}], "prompt_out_of_bounds"),
        ([{"points": [[1, 2, 1]] * 65}], "invalid_prompt"),
        ([{"text": "mug", "box": [1, 2, 30, 40]}], "invalid_prompt"),
        ([{"text": "mug", "max_objects": 0}], "invalid_prompt"),
        ([{"text": "mug", "max_objects": 9}], "invalid_prompt"),
        ([{"text": "mug", "min_score": 1.5}], "invalid_prompt"),
        ([{"text": "mug\x00"}], "invalid_prompt"),
        ([{"text": 5}], "invalid_prompt"),
        ([{"box": [1, 2, 30, 40], "min_score": 0.3}], "invalid_prompt"),
        ([{}], "invalid_prompt"),
        (["box"], "invalid_prompt"),
        ("box", "invalid_prompt"),
        ([{"box": [1, 2, 30, 40]}] * 9, "too_many_masks"),
        ([{"text": "mug"}], "unsupported_prompt"),  # grabcut
    ],
)
def test_bad_prompts_have_stable_codes(prompts, code):
    with pytest.raises(Sam3dError) as info:
        parse_prompts(prompts, (50, 60), max_objects=8, segmenter="grabcut")
    assert info.value.code == code, info.value
