"""Logging: one JSON object per line in production, with the job id on every line that
concerns a job (set once per request or task through a context variable)."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

job_id_var: ContextVar[str | None] = ContextVar("sam3d_job_id", default=None)


@contextmanager
def job_logs(job_id: str | None) -> Iterator[None]:
    """Within: every log line of this thread names ``job_id``."""
    token = job_id_var.set(job_id)
    try:
        yield
    finally:
        job_id_var.reset(token)


_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# Lines written outside a job's context (gunicorn's access log, after the request) still
# name the job in their text: take the id from there.
_JOB_ID = re.compile(r"\bjob_[0-9a-f]{26}\b")


def _job_of(record: logging.LogRecord, message: str) -> str | None:
    job = getattr(record, "job_id", None) or job_id_var.get()
    if job is None and (found := _JOB_ID.search(message)):
        job = found.group(0)
    return job


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", "service", "host", "pid", "job_id", ...extra}``."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service
        self.host = socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message,
            "service": self.service,
            "host": self.host,
            "pid": record.process,
            "job_id": _job_of(record, message),
        }
        for key, value in vars(record).items():  # extra={...} fields
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable, for terminals: the job id in brackets when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        job = _job_of(record, message)
        prefix = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{prefix} {record.levelname:<7} {record.name}: {message}"
        if job:
            line += f" [{job}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def formatter(service: str, fmt: str | None = None) -> logging.Formatter:
    fmt = fmt or os.environ.get("SAM3D_LOG_FORMAT", "text")
    return JsonFormatter(service) if fmt == "json" else TextFormatter()


def configure_logging(service: str, fmt: str | None = None, level: str = "INFO") -> None:
    """Route every logger (ours, Celery's, gunicorn's) through one handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(service, fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # library warnings become log lines too
