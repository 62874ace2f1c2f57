"""Retention: job records, their artifacts and uploaded images are deleted
``SAM3D_RETENTION_S`` after they finish (or were uploaded); 0 keeps everything.

Workers sweep on their heartbeat thread; each expired item is claimed by one sweeper only
(a ZREM that returns 1), so several workers never delete the same thing twice.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from jobs.artifacts import job_prefix
from jobs.records import JobStore

log = logging.getLogger("sam3d.retention")
BATCH = 100


def uploads_key(store: JobStore) -> str:
    return store.keys.uploads()


def track_upload(store: JobStore, key: str, at: float | None = None) -> None:
    """Remember an uploaded image's storage key, so that it expires too."""
    store.r.zadd(uploads_key(store), {key: at if at is not None else time.time()})


def untrack_upload(store: JobStore, key: str) -> None:
    """Forget a deleted upload."""
    store.r.zrem(uploads_key(store), key)


class Retention:
    """Deletes what is older than ``retention_s``."""

    def __init__(self, store: JobStore, storage: Any, retention_s: float) -> None:
        self.store, self.storage, self.retention_s = store, storage, retention_s

    def sweep(self, now: float | None = None) -> int:
        """Delete expired jobs (record and files) and uploads; how many were deleted."""
        if self.retention_s <= 0:
            return 0
        cutoff = (now if now is not None else time.time()) - self.retention_s
        deleted = 0
        for job_id in self.store.finished_before(cutoff, BATCH):
            if not self.store.claim_expired(job_id):
                continue  # another sweeper has it
            self.storage.delete_prefix(job_prefix(job_id))
            self.store.delete(job_id)
            deleted += 1
        key = uploads_key(self.store)
        for raw in self.store.r.zrangebyscore(key, "-inf", cutoff, start=0, num=BATCH):
            if self.store.r.zrem(key, raw):
                name = raw.decode() if isinstance(raw, bytes) else raw
                self.storage.delete_prefix(name)
                deleted += 1
        if deleted:
            log.info("retention: deleted %d expired jobs and uploads", deleted)
        return deleted
