"""Errors the SDK raises: the service's ``{"error": {"code", "message"}}`` as exceptions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sam3d_client.sdk import Job

# HTTP statuses worth retrying unchanged: the service or a proxy in front of it was busy.
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
CONNECTION_ERROR = "connection_error"


class ServiceError(Exception):
    """A request the service refused or could not answer.

    ``code`` is the service's stable error code (``invalid_mask``, ``not_found``, ...), or
    ``connection_error`` when no HTTP answer came; ``status`` is the HTTP status, ``None``
    when there was none (no connection, or an input refused here before any request).
    """

    def __init__(
        self,
        code: str,
        message: str,
        status: int | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """True when the same request may succeed later (busy, rate limited, unreachable)."""
        if self.status is None:
            return self.code == CONNECTION_ERROR
        return self.status in RETRYABLE_STATUSES

    def __str__(self) -> str:
        where = f"HTTP {self.status} " if self.status is not None else ""
        return f"{where}{self.code}: {self.message}"


class InvalidInput(ServiceError, ValueError):
    """An image or masks refused on this side, before any request (``status`` is None)."""


class JobFailed(ServiceError):
    """The job ended ``failed``: ``code``/``message``/``retryable`` are the job's ``error``."""

    def __init__(self, job: Job, error: dict[str, Any] | None) -> None:
        error = error or {}
        super().__init__(
            str(error.get("code") or "failed"), str(error.get("message") or "the job failed")
        )
        self.job = job
        self.job_retryable = bool(error.get("retryable", False))

    @property
    def retryable(self) -> bool:
        """Whether resubmitting the same input may succeed (the failure was the service's)."""
        return self.job_retryable

    def __str__(self) -> str:
        return f"job {self.job.id} {self.job.status}: {self.code}: {self.message}"


class JobCanceled(JobFailed):
    """The job ended ``canceled``."""

    def __init__(self, job: Job) -> None:
        super().__init__(job, {"code": "canceled", "message": "the job was canceled"})


class Interrupted(Exception):
    """A wait or a download was abandoned because the caller's interrupt event was set."""
