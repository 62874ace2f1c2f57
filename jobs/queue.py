"""Celery configuration shared by the API (which only sends) and the workers (which run).

The job record in Redis is the source of truth; Celery only carries job ids, so no result
backend is configured.
"""

from __future__ import annotations

from typing import Any

from jobs.budgets import time_limits
from jobs.settings import Settings

TASK_NAME = "sam3d.generate"
QUEUES = ("interactive", "bulk")
DEFAULT_QUEUE = "interactive"


def soft_time_limit(settings: Settings) -> int:
    """The default soft limit (a job with no objects); each job is sent with its own limits,
    grown by its object count (``jobs.budgets.time_limits``)."""
    return time_limits(settings, settings.backend, 0)[0]


def celery_config(settings: Settings) -> dict[str, Any]:
    """One Celery configuration for both sides, from the same settings."""
    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            # Above the hard time limit, or a long job is handed to a second worker while
            # the first still runs it.
            "visibility_timeout": settings.broker_visibility_timeout_s(),
            # kombu's defaults sweep for a dead worker's unacked messages only every
            # 10 x 10 s; sweep every second so they return right after the visibility timeout.
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
            # BRPOP the queues in the order a worker names them (interactive, bulk): a
            # waiting interactive job goes first; kombu's default rotates between them.
            "queue_order_strategy": "priority",
        },
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": time_limits(settings, settings.backend, 0)[1],
        "task_soft_time_limit": soft_time_limit(settings),
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        "result_backend": None,
        "task_default_queue": DEFAULT_QUEUE,
        "task_create_missing_queues": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "worker_send_task_events": settings.celery_events,
        "task_send_sent_event": settings.celery_events,
        "worker_enable_remote_control": settings.celery_events,
        # A model may take minutes to load in the pool process before it reports ready.
        "worker_proc_alive_timeout": 900,
        # Replace the pool process after a job that left it above the ceiling (KiB): its
        # memory never shrinks otherwise. The next process loads the model again.
        "worker_max_memory_per_child": settings.worker_max_memory_mb * 1024 or None,
    }


def send_job(sender: Any, settings: Settings, job_id: str, queue: str, backend: str, objects: int):
    """Send a job's task with its own time limits (grown by its object count)."""
    soft, hard = time_limits(settings, backend, objects)
    return sender.send_task(
        TASK_NAME, args=[job_id], queue=queue, time_limit=hard, soft_time_limit=soft
    )
