"""Prompts through the sam3 segmenter on the dev stack: a real redis-server, a real Celery
worker process that sets SAM 3 up beside the 3D backend (PyPI ``sam3``, random weights, the
reduced CPU configuration of tests/sam3_reduced.py), the API over HTTP with
``SAM3D_SEGMENTER=sam3``. Text is accepted here (refused on grabcut:
tests/test_service_prompts.py); random weights find no instance of it, which the job must say
with its stable code."""

from __future__ import annotations

import pytest
from sam3_reduced import sam3_importable
from sam3d_client.http import Http
from service import FAST, TESTS, b64, make_stack, manifest_of, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sam3_importable(), reason="needs torch, torchvision, sam3, triton"),
]

SAMPLE = TESTS.parent / "samples" / "shapes.jpg"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = make_stack(
        tmp_path_factory.mktemp("prompts-sam3"),
        max_masks=4,
        job_time_limit_s=400,
        visibility_timeout_s=700,
        segmenter="sam3",
        sam3_random_weights=True,
        sam3_device="cpu",
        sam3_builder="sam3_reduced:build_reduced",
    )
    s.start(wait=False)
    s.start_worker(backend="inflate", queues="interactive")
    s.wait_ready(300)  # the worker says ready once SAM 3 is built
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(stack) -> Http:
    return Http(stack.url)


def submit(http: Http, prompts) -> dict:
    body = {"image": {"type": "base64", "value": b64(SAMPLE.read_bytes())}, "prompts": prompts}
    return http.json("POST", "/v1/jobs", {**body, "options": FAST})


def test_backends_says_sam3_reads_text(http):
    body = http.json("GET", "/v1/backends")
    assert body["segmenter"] == "sam3" and body["prompts"] == ["box", "points", "text"]
    assert [w["segmenter"] for w in body["workers"]] == ["sam3"]


def test_boxes_and_clicks_through_sam3(http):
    job = submit(http, [{"box": [82, 162, 300, 382]}, {"points": [[570, 300, 1], [20, 20, 0]]}])
    done = wait_until(http, job["id"], lambda j: j["status"] in ("succeeded", "failed"), 400)
    assert done["status"] == "succeeded", done["error"]
    objects = manifest_of(http, done)["objects"]
    assert [o["mask"]["prompt"] for o in objects] == [0, 1]
    for obj in objects:
        mask = obj["mask"]
        assert mask["segmenter"] == "sam3 sam3-0.1.4 (random weights)"
        assert isinstance(mask["score"], float) and 0 <= mask["score"] <= 1
        assert mask["area"] > 0 and mask["rle"]["size"] == [480, 640]


def test_a_text_prompt_runs_and_says_when_it_found_nothing(http):
    job = submit(http, [{"text": "ball", "max_objects": 2, "min_score": 0.5}])
    assert job["status"] == "queued"  # accepted: this server's segmenter reads text
    done = wait_until(http, job["id"], lambda j: j["status"] in ("succeeded", "failed"), 400)
    if done["status"] == "failed":  # random weights: nothing scores 0.5
        assert done["error"]["code"] == "no_objects_found", done["error"]
        assert done["error"]["retryable"] is False
    else:
        scores = [o["mask"]["score"] for o in manifest_of(http, done)["objects"]]
        assert 1 <= len(scores) <= 2 and all(s >= 0.5 for s in scores)
