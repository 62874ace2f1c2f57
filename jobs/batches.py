"""Batches: many jobs submitted as one, counted as they end, with an optional webhook."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

from jobs.keys import PREFIX, Keys
from jobs.records import JobStatus, JobStore


def new_batch_id() -> str:
    return "batch_" + uuid.uuid4().hex[:24]


@dataclass
class Batch:
    id: str
    owner: str
    job_ids: list[str]
    created_at: float = field(default_factory=time.time)
    finished: int = 0
    completed_at: float | None = None
    webhook: dict[str, Any] | None = None


class BatchStore:
    """A hash per batch; ``job_finished`` counts terminal jobs exactly once each."""

    def __init__(self, client: redis.Redis, prefix: str = PREFIX) -> None:
        self.r = client
        self.p = prefix

    def _key(self, batch_id: str) -> str:
        return Keys(self.p).batch(batch_id)

    def create(self, batch: Batch) -> Batch:
        self.r.hset(
            self._key(batch.id),
            mapping={
                "owner": batch.owner,
                "job_ids": json.dumps(batch.job_ids),
                "created_at": repr(batch.created_at),
                "finished": 0,
                "webhook": json.dumps(batch.webhook),
            },
        )
        return batch

    def delete(self, batch_id: str) -> None:
        self.r.delete(self._key(batch_id))

    def get(self, batch_id: str) -> Batch | None:
        raw = {k.decode(): v.decode() for k, v in self.r.hgetall(self._key(batch_id)).items()}
        if not raw:
            return None
        return Batch(
            id=batch_id,
            owner=raw["owner"],
            job_ids=json.loads(raw["job_ids"]),
            created_at=float(raw["created_at"]),
            finished=int(raw["finished"]),
            completed_at=float(raw["completed_at"]) if raw.get("completed_at") else None,
            webhook=json.loads(raw.get("webhook") or "null"),
        )

    def job_finished(self, batch_id: str) -> bool:
        """Count one more finished job; True exactly once: when the last one finished."""
        key = self._key(batch_id)
        finished = int(self.r.hincrby(key, "finished", 1))
        total = len(json.loads(self.r.hget(key, "job_ids") or b"[]"))
        if finished < total:
            return False
        return bool(self.r.hsetnx(key, "completed_at", repr(time.time())))

    def set_webhook(self, batch_id: str, webhook: dict[str, Any]) -> None:
        self.r.hset(self._key(batch_id), "webhook", json.dumps(webhook))

    def counts(self, batch: Batch, store: JobStore) -> dict[str, int]:
        """Jobs of the batch by status (deleted jobs are not counted)."""
        counts = {s.value: 0 for s in JobStatus}
        for status in store.statuses(batch.job_ids):
            if status is not None:
                counts[status.value] += 1
        return counts
