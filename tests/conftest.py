"""Shared fixtures: the bundled sample and assets generated from it once per session; for the
modules that start a stack (their own ``stack`` fixture), a client of its API and a starter
of workers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_IMAGE = ROOT / "samples" / "shapes.jpg"
SAMPLE_COCO = ROOT / "samples" / "shapes.coco.json"


def sample_masks_reference() -> np.ndarray:
    """The sample's masks decoded straight with pycocotools, independent of jobs.masks."""
    coco = json.loads(SAMPLE_COCO.read_text())
    h, w = coco["images"][0]["height"], coco["images"][0]["width"]
    masks = []
    for ann in coco["annotations"]:
        seg = ann["segmentation"]
        rle = coco_mask.merge(coco_mask.frPyObjects(seg, h, w)) if isinstance(seg, list) else seg
        masks.append(coco_mask.decode(rle).astype(bool))
    return np.stack(masks)


@pytest.fixture(scope="session")
def sample_image() -> np.ndarray:
    return np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"))


@pytest.fixture(scope="session")
def sample_masks() -> np.ndarray:
    return sample_masks_reference()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A private redis-server on a free port (never the machine's own on 6379)."""
    from jobs.redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server):
    """A client of the private server, flushed before each test (rq's habit)."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="module")
def events():
    """The outage tests' webhook receiver (tests/outages.py), one per module."""
    from outages import TerminalEvents

    receiver = TerminalEvents()
    yield receiver
    receiver.stop()


@pytest.fixture
def http(stack):
    """A client of the module's ``stack`` API."""
    from sam3d_client.http import Http

    return Http(stack.url)


@pytest.fixture
def workers(stack):
    """``start(backend, queues, env)``: workers on the module's ``stack``, each started by a
    test stopped after it."""
    from service import worker_starter

    yield from worker_starter(stack)
