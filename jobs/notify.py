"""What happens when a job ends, besides its record: its webhook, and its batch's."""

from __future__ import annotations

import logging
from typing import Any

from jobs.batches import BatchStore
from jobs.records import JobRecord
from jobs.webhooks import QUEUE, TASK_NAME

log = logging.getLogger("sam3d.notify")


class Notifier:
    """``JobStore``'s ``on_terminal`` hook: queues deliveries, never delivers inline (a GPU
    worker must not wait on a slow receiver)."""

    def __init__(self, sender: Any, batches: BatchStore) -> None:
        self.sender = sender  # a Celery app; only send_task is used
        self.batches = batches

    def job_finished(self, record: JobRecord) -> None:
        try:
            if record.webhook:
                self.queue_delivery("job", record.id)
            if record.batch_id and self.batches.job_finished(record.batch_id):
                batch = self.batches.get(record.batch_id)
                if batch is not None and batch.webhook:
                    self.queue_delivery("batch", batch.id)
        except Exception:  # the job's own state is already committed; never undo it
            log.exception("could not queue notifications", extra={"job_id": record.id})

    def queue_delivery(
        self, kind: str, target: str, attempt: int = 1, countdown: float = 0
    ) -> None:
        self.sender.send_task(
            TASK_NAME, args=[kind, target, attempt], queue=QUEUE, countdown=countdown or None
        )
