"""GET /v1/backends: the 3D backends and segmenters this service runs, and what its live
workers have loaded. The page reads it to offer only the prompts the segmenter can read."""

from __future__ import annotations

import contextlib

import redis
from flask import Blueprint, current_app, jsonify

from jobs.heartbeat import live_workers
from jobs.options import BACKEND_OPTIONS
from jobs.prompts import SEGMENTER_PROMPTS

bp = Blueprint("backends", __name__, url_prefix="/v1")

SEGMENTER_DEVICES = {"grabcut": "cpu", "sam3": "cuda (cpu for tests)"}
# Of each live worker's heartbeat; fast_paths: sam3d's [{name, engaged, reason}], else null.
WORKER_FIELDS = ("name", "state", "backend", "version", "segmenter", "device", "fast_paths")


@bp.get("/backends")
def backends():
    """The configured backend and segmenter, every known one, and each live worker's."""
    settings = current_app.config["SETTINGS"]
    workers = []
    with contextlib.suppress(redis.RedisError):
        workers = live_workers(current_app.extensions["sam3d_store"].r)
    return jsonify(
        {
            "backend": settings.backend,
            "backends": [
                {"name": name, "options": [o.name for o in options]}
                for name, options in BACKEND_OPTIONS.items()
            ],
            "segmenter": settings.segmenter,
            "segmenters": [
                {"name": name, "prompts": sorted(kinds), "device": SEGMENTER_DEVICES[name]}
                for name, kinds in SEGMENTER_PROMPTS.items()
            ],
            "prompts": sorted(SEGMENTER_PROMPTS.get(settings.segmenter, ())),
            "workers": [{k: w.get(k) for k in WORKER_FIELDS} for w in workers],
        }
    )
