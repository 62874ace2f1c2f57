"""The Redis key layout: every key the service writes, named in one place.

All keys start with the deployment's prefix (``sam3d`` unless settings say otherwise), so
several deployments can share one Redis. Celery's broker keys (the queue lists
``interactive``, ``bulk``, ``webhooks`` and kombu's ``unacked*``) are kombu's, not listed here.

| key | type | what |
|---|---|---|
| ``{p}:job:{id}`` | hash | a job record (the source of truth) |
| ``{p}:job:{id}:objects`` | hash | a job's stored objects, by index, and its camera |
| ``{p}:jobs:{owner}[:{status}]`` | zset | an owner's jobs, newest first (by status) |
| ``{p}:status:{status}`` | zset | every job in a status |
| ``{p}:finished`` | zset | finished jobs by finish time (retention) |
| ``{p}:finishing`` | zset | jobs handed to a finisher thread |
| ``{p}:queued:{queue}`` | zset | queued jobs by sequence (queue positions) |
| ``{p}:seq`` | string | the submit sequence counter |
| ``{p}:idem:{owner}:{sha256(key)}`` | string | an Idempotency-Key's job id and request digest |
| ``{p}:metrics:stages`` | set | stages with a duration histogram |
| ``{p}:metrics:stage:{stage}`` | hash | one stage's histogram buckets |
| ``{p}:bucket:{owner}`` | hash | an owner's submit token bucket |
| ``{p}:bucket:upload:{owner}`` | hash | an owner's upload token bucket |
| ``{p}:uploads`` | zset | stored uploads by time (retention) |
| ``{p}:batch:{id}`` | hash | a batch |
| ``{p}:worker:{name}`` | string | a worker process's heartbeat (with a TTL) |
| ``{p}:workers`` | zset | worker names by heartbeat expiry |
| ``{p}:consumer:{name}`` | string | a Celery consumer's liveness (with a TTL) |
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

PREFIX = "sam3d"


@dataclass(frozen=True)
class Keys:
    """The key names under one prefix."""

    prefix: str = PREFIX

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def objects(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:objects"

    def by_owner(self, owner: str, status: str | None = None) -> str:
        return f"{self.prefix}:jobs:{owner}" + (f":{status}" if status else "")

    def by_status(self, status: str) -> str:
        return f"{self.prefix}:status:{status}"

    def finished(self) -> str:
        return f"{self.prefix}:finished"

    def finishing(self) -> str:
        return f"{self.prefix}:finishing"

    def queued(self, queue: str) -> str:
        return f"{self.prefix}:queued:{queue}"

    def seq(self) -> str:
        return f"{self.prefix}:seq"

    def idempotency(self, owner: str, key: str) -> str:
        return f"{self.prefix}:idem:{owner}:{hashlib.sha256(key.encode()).hexdigest()}"

    def metrics_stages(self) -> str:
        return f"{self.prefix}:metrics:stages"

    def metrics_stage(self, stage: str) -> str:
        return f"{self.prefix}:metrics:stage:{stage}"

    def submit_bucket(self, owner: str) -> str:
        return f"{self.prefix}:bucket:{owner}"

    def upload_bucket(self, owner: str) -> str:
        return f"{self.prefix}:bucket:upload:{owner}"

    def uploads(self) -> str:
        return f"{self.prefix}:uploads"

    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}:batch:{batch_id}"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def consumer(self, name: str) -> str:
        return f"{self.prefix}:consumer:{name}"
