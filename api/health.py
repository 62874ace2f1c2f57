"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import contextlib
import time

import redis
from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

from jobs.heartbeat import live_workers
from jobs.queue import QUEUES
from jobs.records import STAGE_BUCKETS, JobStore
from jobs.storage import StorageError

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """The process is up; says nothing of its dependencies."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    """Ready when Redis answers, storage is usable and at least one worker is alive."""
    checks: dict[str, dict] = {}
    store: JobStore = current_app.extensions["sam3d_store"]
    try:
        store.r.ping()
        checks["redis"] = {"ok": True}
    except redis.RedisError as exc:
        checks["redis"] = {"ok": False, "error": str(exc)}
    try:
        current_app.extensions["sam3d_storage"].check()
        checks["storage"] = {"ok": True}
    except (StorageError, OSError) as exc:
        checks["storage"] = {"ok": False, "error": str(exc)}
    workers = []
    if checks["redis"]["ok"]:
        with contextlib.suppress(redis.RedisError):
            workers = live_workers(store.r)
    # A pool process that heartbeats while its main process stopped consuming is not ready.
    ready_workers = [
        w for w in workers if w.get("state") in ("ready", "busy") and w.get("consuming", True)
    ]
    checks["workers"] = {
        "ok": bool(ready_workers),
        "live": len(workers),
        "ready": len(ready_workers),
        "details": workers,
    }
    ready = all(c["ok"] for c in checks.values())
    response = jsonify({"ready": ready, "checks": checks})
    response.status_code = 200 if ready else 503
    return response


class _JobsCollector:
    """Reads the shared state from Redis at scrape time, so every API process reports the
    same numbers (nothing is counted per process)."""

    def __init__(self, store: JobStore, broker: redis.Redis) -> None:
        self.store = store
        self.broker = broker

    def collect(self):
        depth = GaugeMetricFamily(
            "sam3d_queue_depth",
            "Jobs waiting in each queue (queued, not yet started).",
            labels=["queue"],
        )
        for queue, count in self.store.queued_counts(QUEUES).items():
            depth.add_metric([queue], count)
        yield depth
        messages = GaugeMetricFamily(
            "sam3d_broker_messages",
            "Messages in each Celery queue list in Redis.",
            labels=["queue"],
        )
        for queue in QUEUES:
            messages.add_metric([queue], self.broker.llen(queue))
        yield messages
        jobs = GaugeMetricFamily("sam3d_jobs", "Jobs by status (all owners).", labels=["status"])
        for status, count in self.store.counts_by_status().items():
            jobs.add_metric([status], count)
        yield jobs
        workers = live_workers(self.store.r)
        live = GaugeMetricFamily(
            "sam3d_workers", "Workers with a live heartbeat, by state.", labels=["state"]
        )
        for state in ("starting", "loading", "ready", "busy"):
            live.add_metric([state], sum(1 for w in workers if w.get("state") == state))
        yield live
        hist = HistogramMetricFamily(
            "sam3d_stage_duration_seconds",
            "Time spent in each job stage (loading, generating, uploading).",
            labels=["stage"],
        )
        for stage, row in self.store.stage_histograms().items():
            buckets = [(str(b), row.get(f"le:{b}", 0.0)) for b in STAGE_BUCKETS]
            buckets.append(("+Inf", row.get("count", 0.0)))
            hist.add_metric([stage], buckets, row.get("sum", 0.0))
        yield hist
        yield GaugeMetricFamily(
            "sam3d_scrape_timestamp_seconds", "When this scrape ran.", value=time.time()
        )


@bp.get("/metrics")
def metrics():
    store: JobStore = current_app.extensions["sam3d_store"]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_JobsCollector(store, store.r))
    return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4")
