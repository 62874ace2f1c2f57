"""The next job's inputs read and decoded while the GPU works on this one.

When a job starts generating, the runner names the job likely to come next (the oldest queued
job of the worker's queues, in their priority order); a background thread reads its stored
inputs and decodes its image. If that job is the next one this process runs, it starts from
the prefetched copy instead of waiting on storage and the decoder.

It is a cache and nothing more: the job's record, claim, cancel and redelivery are untouched
(the run still claims the job through ``JobStore.claim``; a canceled or redelivered job just
leaves its prefetched copy unused). One job ahead at most: a new request replaces the slot,
so memory is bounded by one job's inputs (its decoded image and its input files).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jobs.artifacts import INPUT_DEPTH, INPUT_IMAGE, INPUT_MASKS, INPUT_PROMPTS, INPUT_SEGMENTS
from jobs.masks import RleMasks

log = logging.getLogger("sam3d.worker")

# The input files a run reads; each is prefetched when it exists.
PREFETCHED_FILES = (INPUT_MASKS, INPUT_DEPTH, INPUT_PROMPTS, INPUT_SEGMENTS)
WAIT_S = 30.0  # a run waits this long at most for a prefetch of its own job under way
# The first masks are decoded ahead too (a 12 MP mask is ~45 ms of pycocotools); the rest
# decode on access, so a job of many objects costs no more memory than two masks.
MASKS_AHEAD = 2


@dataclass
class Prefetched:
    """One job's inputs: its decoded image, the input files that existed and its first
    masks decoded (by index)."""

    job_id: str
    image: np.ndarray
    files: dict[str, bytes] = field(default_factory=dict)
    masks: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0

    def prime(self, masks: Any) -> None:
        """Hand the decoded masks to the run's ``RleMasks`` (same image size and masks)."""
        decode_ahead = getattr(masks, "decode_ahead", None)
        if decode_ahead is None or getattr(masks, "size", None) != self.image.shape[:2]:
            return
        for index, mask in self.masks.items():
            if index < len(masks):
                decode_ahead(index, mask)


class CachedFiles:
    """A job's file access that answers prefetched inputs from memory, the rest from ``files``
    (writes always go through: segmenting writes the masks it made)."""

    def __init__(self, files: Any, cached: dict[str, bytes]) -> None:
        self.files = files
        self.cached = dict(cached)

    def get(self, path: str) -> bytes:
        data = self.cached.get(path)
        return data if data is not None else self.files.get(path)

    def put(self, path: str, data: bytes, content_type: str) -> None:
        self.cached.pop(path, None)
        self.files.put(path, data, content_type)


class InputPrefetcher:
    """One background (daemon) thread, one slot: ``request(job_id)`` starts loading that
    job's inputs; ``take(job_id)`` returns them (waiting for a load under way) or None."""

    def __init__(
        self,
        files_for: Callable[[str], Any],
        decode: Callable[[bytes], np.ndarray],
    ) -> None:
        self.files_for = files_for  # job id -> its file access (get/put)
        self.decode = decode  # image bytes -> pixels, under the service's limits
        self._cond = threading.Condition()
        self._wanted: str | None = None
        self._loading: str | None = None
        self._ready: Prefetched | None = None
        self._thread = threading.Thread(target=self._run, name="sam3d-prefetch", daemon=True)
        self._thread.start()

    def request(self, job_id: str | None) -> None:
        """Load ``job_id``'s inputs next (None: nothing); a slot held for another job is
        dropped."""
        with self._cond:
            if job_id is None or job_id in (self._loading, getattr(self._ready, "job_id", None)):
                return
            self._wanted = job_id
            self._ready = None
            self._cond.notify_all()

    def take(self, job_id: str) -> Prefetched | None:
        """``job_id``'s prefetched inputs, or None. A slot held for another job is kept: in a
        batch that job may be the next one prepared (the next ``request`` replaces it)."""
        with self._cond:
            deadline = time.monotonic() + WAIT_S
            while job_id in (self._wanted, self._loading):
                if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                    break
            if self._wanted == job_id:
                self._wanted = None
            if self._ready is None or self._ready.job_id != job_id:
                return None
            ready, self._ready = self._ready, None
        return ready

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._wanted is None:
                    self._cond.wait()
                job_id, self._wanted, self._loading = self._wanted, None, self._wanted
            loaded = self._load(job_id)
            with self._cond:
                self._loading = None
                if loaded is not None and self._wanted is None:
                    self._ready = loaded
                self._cond.notify_all()

    def _load(self, job_id: str) -> Prefetched | None:
        t0 = time.perf_counter()
        try:
            files = self.files_for(job_id)
            image = self.decode(files.get(INPUT_IMAGE))
            found: dict[str, bytes] = {}
            for path in PREFETCHED_FILES:
                try:
                    found[path] = files.get(path)
                except KeyError:
                    continue
            masks: dict[int, np.ndarray] = {}
            if INPUT_MASKS in found and INPUT_PROMPTS not in found:
                rles = RleMasks(json.loads(found[INPUT_MASKS]), image.shape[:2])
                masks = {i: rles[i] for i in range(min(MASKS_AHEAD, len(rles)))}
        except Exception as exc:  # noqa: BLE001 - the run itself reads them again and reports
            log.info("prefetch of job %s skipped: %s", job_id, exc)
            return None
        seconds = time.perf_counter() - t0
        log.debug("prefetched job %s inputs in %.3f s", job_id, seconds)
        return Prefetched(job_id, image, found, masks, seconds)
