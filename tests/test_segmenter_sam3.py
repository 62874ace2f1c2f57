"""The ``sam3`` segmenter on CPU: Meta's PyPI ``sam3`` built with random weights in a reduced
configuration (tests/sam3_reduced.py says what is reduced and the one torchvision stand-in),
loaded once through the segmenter's own ``setup`` and asked every kind of prompt of an image
in its batched calls. The full-size model and its speed are measured on the GPU by
``bench/gpu.py --segmenter-only``."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sam3_reduced import build_reduced, declare_torchvision_ops, sam3_importable
from service import TESTS

from jobs.errors import Sam3dError
from jobs.prompts import SEGMENTER_PROMPTS
from jobs.settings import Settings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sam3_importable(), reason="needs torch, torchvision, sam3, triton"),
]

SAMPLE = TESTS.parent / "samples" / "shapes.jpg"


@pytest.fixture(scope="module")
def segmenter():
    declare_torchvision_ops()
    from worker.segmenters.sam3 import Sam3Segmenter

    seg = Sam3Segmenter(Settings(sam3_random_weights=True, sam3_device="cpu"), build=build_reduced)
    seg.setup()
    return seg


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.asarray(Image.open(SAMPLE).convert("RGB"))


def test_it_loads_with_random_weights_and_says_so(segmenter):
    assert segmenter.device == "cpu"
    assert segmenter.version == "sam3-0.1.4 (random weights)"
    assert segmenter.prompt_kinds == SEGMENTER_PROMPTS["sam3"]
    assert segmenter.model.inst_interactive_predictor is not None  # boxes and points head
    assert not segmenter.model.training
    # Random weights: no parameter left as uninitialised garbage (sam3 fills some from its
    # checkpoint only), so answers are finite.
    import torch

    assert all(torch.isfinite(p).all() for p in segmenter.model.parameters())


def test_every_prompt_of_an_image_in_batched_calls(segmenter, image, monkeypatch):
    calls = []
    predict = segmenter.model.predict_inst

    def counted(state, **kwargs):
        calls.append({k: np.asarray(v).shape for k, v in kwargs.items() if k != "multimask_output"})
        return predict(state, **kwargs)

    monkeypatch.setattr(segmenter.model, "predict_inst", counted)
    encodings = []
    set_image = segmenter.processor.set_image
    monkeypatch.setattr(
        segmenter.processor, "set_image", lambda img: encodings.append(1) or set_image(img)
    )
    prompts = [
        {"box": [80.0, 160.0, 300.0, 380.0]},
        {"box": [315.0, 200.0, 504.0, 379.0], "points": [[400.0, 300.0, 1], [330.0, 210.0, 0]]},
        {"box": [525.0, 135.0, 614.0, 394.0]},
        {"points": [[570.0, 300.0, 1]]},
        {"points": [[190.0, 270.0, 1], [20.0, 20.0, 0]]},
    ]
    segments = segmenter.segment(image, prompts)
    assert len(encodings) == 1  # one image encoding for every prompt
    # One call for the three boxed prompts (points padded to two), one for the two clicks.
    assert calls == [
        {"box": (3, 4), "point_coords": (3, 2, 2), "point_labels": (3, 2)},
        {"point_coords": (2, 2, 2), "point_labels": (2, 2)},
    ]
    assert [s.prompt for s in segments] == [0, 1, 2, 3, 4]
    for s in segments:
        assert s.mask.shape == image.shape[:2] and s.mask.dtype == bool
        assert s.mask.any()  # never empty (an announced fallback where the model gave none)
        assert (s.fallback is None) == (not s.notes)
        assert isinstance(s.score, float) and 0.0 <= s.score <= 1.0


def test_text_runs_through_the_grounding_head_and_keeps_only_scored_instances(segmenter, image):
    """Random weights make no real instances: what comes back must each be a non-empty mask
    with a finite score at least min_score, at most max_objects of them, best first."""
    prompts = [{"text": "ball", "max_objects": 3, "min_score": 0.0}, {"box": [80, 160, 300, 380]}]
    segments = segmenter.segment(image, prompts)
    text = [s for s in segments if s.prompt == 0]
    assert len(text) <= 3
    assert all(s.mask.any() and np.isfinite(s.score) for s in text)
    assert [s.score for s in text] == sorted((s.score for s in text), reverse=True)
    assert [s.prompt for s in segments if s.prompt == 1] == [1]


def test_preflight_refuses_clearly(tmp_path):
    from worker.segmenters.sam3 import preflight

    with pytest.raises(Sam3dError) as info:
        preflight(Settings(sam3_device="cpu"))
    assert info.value.code == "preflight_failed" and "SAM3D_SAM3_CHECKPOINT" in info.value.message
    with pytest.raises(Sam3dError) as info:
        preflight(Settings(sam3_device="cpu", sam3_checkpoint=str(tmp_path / "none.pt")))
    assert "is not a file" in info.value.message
    with pytest.raises(Sam3dError) as info:
        preflight(Settings(sam3_random_weights=True, sam3_bpe_path=str(tmp_path / "x.gz")))
    assert "BPE" in info.value.message
