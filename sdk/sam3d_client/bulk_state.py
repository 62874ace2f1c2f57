"""The resumable state of a ``sam3d-jobs bulk`` run: one JSON file, rewritten atomically
(temporary file, fsync, rename) after every change, so that it is whole at every instant
and a rerun (after Ctrl-C, a crash, a reboot) knows each image's key, job and status."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sam3d_client.errors import InvalidInput

STATE_FILE = ".sam3d-bulk-state.json"
VERSION = 1


class ImageStatus(StrEnum):
    """Where one image of a bulk run stands."""

    PENDING = "pending"  # not submitted yet (or its submit's answer never came)
    QUEUED = "queued"
    RUNNING = "running"
    DOWNLOADING = "downloading"  # the job succeeded; its files are being written
    SUCCEEDED = "succeeded"  # the job succeeded and every file is in OUT/<stem>/
    FAILED = "failed"  # the job failed, or the service refused the input (4xx)
    CANCELED = "canceled"
    ERROR = "error"  # this side gave up for now (network, disk): a rerun carries on
    MISSING = "missing"  # the image file is not on disk
    NO_ANNOTATIONS = "no_annotations"  # nothing to submit for this image

    @property
    def finished(self) -> bool:
        """A rerun leaves it alone (unless asked to retry failures)."""
        return self in (ImageStatus.SUCCEEDED, ImageStatus.FAILED, ImageStatus.CANCELED)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def write_json_atomically(path: Path, value: Any) -> None:
    """Replace ``path`` with ``value`` as JSON: readers see the old file or the new one."""
    data = json.dumps(value, indent=1, sort_keys=False).encode() + b"\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class BulkState:
    """``OUT/.sam3d-bulk-state.json``: the run's identity (``run``) and one entry per image.

    Entries are plain dicts (``image_id``, ``file_name``, ``stem``, ``status``,
    ``idempotency_key``, ``attempt``, ``job_id``, ``error``, ``objects``, ``updated_at``),
    keyed by the COCO image id as a string. Thread-safe: every update is written at once.
    """

    def __init__(self, path: Path, run: dict[str, Any], images: dict[str, dict[str, Any]]):
        self.path = path
        self.run = run
        self._images = images
        self._lock = threading.Lock()

    @classmethod
    def open(cls, out: Path, run: dict[str, Any]) -> BulkState:
        """The state in ``out`` (created when absent). ``run`` names what the run is
        (server, COCO file, options): a state made for another run is refused."""
        path = out / STATE_FILE
        if not path.exists():
            return cls(path, {**run, "created_at": now_iso()}, {})
        try:
            data = json.loads(path.read_text())
            old_run, images = data["run"], data["images"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidInput("invalid_state", f"cannot read {path}: {exc}") from None
        for field in ("server", "coco", "options"):
            if old_run.get(field) != run.get(field):
                raise InvalidInput(
                    "state_mismatch",
                    f"{path} belongs to a run with another {field} "
                    f"({old_run.get(field)!r}); use another --out or delete that file",
                )
        return cls(path, {**old_run, **run, "created_at": old_run.get("created_at")}, images)

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._images.get(key)
            return dict(entry) if entry is not None else None

    def entries(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e) for e in self._images.values()]

    def update(self, key: str, **changes: Any) -> dict[str, Any]:
        """Merge ``changes`` into the image's entry and write the file before returning."""
        with self._lock:
            entry = self._images.setdefault(key, {})
            entry.update(changes)
            entry["updated_at"] = now_iso()
            self._write()
            return dict(entry)

    def save(self) -> None:
        with self._lock:
            self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(
            self.path,
            {"version": VERSION, "run": self.run, "updated_at": now_iso(), "images": self._images},
        )
