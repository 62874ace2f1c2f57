"""The webhook sender: a light Celery worker on the 'webhooks' queue (threads, no model), so
GPU workers never wait on a slow or failing receiver."""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from celery import Celery, signals

from jobs.batches import BatchStore
from jobs.errors import Sam3dError
from jobs.logs import configure_logging, job_id_var
from jobs.notify import Notifier
from jobs.queue import celery_config
from jobs.records import JobRecord, JobStore
from jobs.settings import Settings
from jobs.webhooks import QUEUE, TASK_NAME, envelope, post, retry_delay

log = logging.getLogger("sam3d.webhooks")


def job_summary(record: JobRecord, public_url: str) -> dict[str, Any]:
    """What a receiver learns of a job. No artifact URLs: it fetches the job with its key."""
    summary: dict[str, Any] = {
        "id": record.id,
        "status": record.status.value,
        "error": record.error,
        "batch_id": record.batch_id or None,
        "created_at": record.created_at,
        "finished_at": record.finished_at,
        "objects": record.objects_total,
        "links": {"self": f"{public_url.rstrip('/')}/v1/jobs/{record.id}"},
    }
    if record.result:
        summary["time"] = record.result.get("time")
    return summary


class Deliverer:
    """One attempt per task; a failed attempt queues the next with exponential backoff."""

    def __init__(self, settings: Settings, sender: Any) -> None:
        client = redis.Redis.from_url(settings.redis_url)
        self.settings = settings
        self.jobs = JobStore(client)
        self.batches = BatchStore(client)
        self.notifier = Notifier(sender, self.batches)

    def deliver(self, kind: str, target: str, attempt: int) -> str:
        if kind == "job":
            record = self.jobs.get(target)
            if record is None or not record.webhook:
                return "gone"
            webhook = record.webhook
            event = f"job.{record.status.value}"
            body = envelope(event, {"job": job_summary(record, self.settings.public_url)})
        else:
            batch = self.batches.get(target)
            if batch is None or not batch.webhook:
                return "gone"
            webhook = batch.webhook
            event = "batch.completed"
            counts = self.batches.counts(batch, self.jobs)
            body = envelope(event, {"batch": {"id": batch.id, "counts": counts,
                                              "jobs": batch.job_ids}})  # fmt: skip
        if webhook.get("state") == "delivered":
            return "delivered"
        t0 = time.perf_counter()
        try:
            status, error = post(
                webhook["url"],
                body,
                secret=self.settings.webhook_secret,
                event=event,
                timeout=self.settings.webhook_timeout_s,
                allow_private=self.settings.allow_private_urls,
            )
        except Sam3dError as exc:  # the URL now resolves to a private address
            status, error = None, exc.message
        ok = status is not None and 200 <= status < 300
        webhook.setdefault("attempts", []).append(
            {
                "attempt": attempt,
                "at": time.time(),
                "status": status,
                "error": None if ok else error,
                "ms": round((time.perf_counter() - t0) * 1000, 1),
            }
        )
        if ok:
            webhook["state"] = "delivered"
        elif attempt >= self.settings.webhook_max_attempts:
            webhook["state"] = "failed"
        else:
            webhook["state"] = "retrying"
            delay = retry_delay(attempt, self.settings.webhook_retry_base_s)
            webhook["next_attempt_at"] = time.time() + delay
            self.notifier.queue_delivery(kind, target, attempt + 1, countdown=delay)
        if kind == "job":
            self.jobs.update(target, webhook=webhook)
        else:
            self.batches.set_webhook(target, webhook)
        log.info("%s webhook %s attempt %d: %s", kind, target, attempt, status or error)
        return webhook["state"]


def create_webhook_app(settings: Settings) -> Celery:
    app = Celery("sam3d-webhooks", set_as_current=False)
    app.conf.update(celery_config(settings))
    state: dict[str, Deliverer] = {}

    @app.task(name=TASK_NAME, acks_late=True)
    def deliver(kind: str, target: str, attempt: int = 1) -> str:
        deliverer = state.get("d") or state.setdefault("d", Deliverer(settings, app))
        token = job_id_var.set(target if kind == "job" else None)
        try:
            return deliverer.deliver(kind, target, attempt)
        finally:
            job_id_var.reset(token)

    return app


def run_webhook_worker(settings: Settings, *, concurrency: int = 8, loglevel: str = "INFO") -> None:
    configure_logging("webhooks", settings.log_format, loglevel.upper())
    signals.setup_logging.connect(lambda **_: None, weak=False)
    app = create_webhook_app(settings)
    app.worker_main(
        [
            "--quiet",
            "worker",
            "--pool=threads",
            f"--concurrency={concurrency}",
            f"--queues={QUEUE}",
            f"--loglevel={loglevel}",
            "--hostname=webhooks@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )
