"""One-line progress displays on a terminal (redrawn in place) or a log (a line per change)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, TextIO


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def describe_job(job: Mapping[str, Any], elapsed: float | None = None) -> str:
    """``job_… running (generating) 2/3 objects 4s`` from a job's JSON."""
    text = f"{job.get('id')} {job.get('status')}"
    stage = job.get("stage")
    if stage and stage != job.get("status"):
        text += f" ({stage})"
    position = job.get("queue_position")
    if position is not None:  # 0 = next to run
        text += ", next in queue" if position == 0 else f", {position} ahead in queue"
    progress = job.get("progress") or {}
    if progress.get("objects_total"):
        text += f", {progress.get('objects_done', 0)}/{progress['objects_total']} objects"
    error = job.get("error")
    if error:
        text += f": {error.get('code')}: {error.get('message')}"
    if elapsed is not None:
        text += f"  {_duration(elapsed)}"
    return text


class StatusLine:
    """A status line: redrawn in place on a terminal, else printed when its text changes."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = ""
        self._width = 0

    def update(self, text: str) -> None:
        if text == self._last:
            return
        self._last = text
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the line (on a terminal), so that what follows starts on a fresh one."""
        if self.tty and self._last:
            self.stream.write("\n")
            self.stream.flush()
        self._last, self._width = "", 0


class ProgressBar:
    """``[#####-----] 12/40 images  ok 10  failed 2  running 8  ETA 1m20s`` on a stream.

    ``eta`` counts only what finishes during this run (a resumed run starts with some done).
    On a terminal it redraws at most 10 times a second; elsewhere it prints a line whenever
    the counts change.
    """

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 24) -> None:
        self.total = total
        self.width = width
        self.line = StatusLine(stream)
        self.started = time.monotonic()
        self._initial_done: int | None = None
        self._drawn_at = 0.0
        self._lock = threading.Lock()

    def render(self, done: int, counts: Mapping[str, int]) -> str:
        if self._initial_done is None:
            self._initial_done = done
        total = max(self.total, 1)
        filled = int(self.width * min(done, total) / total)
        bar = "#" * filled + "-" * (self.width - filled)
        parts = [f"[{bar}] {done}/{self.total} images"]
        parts += [f"{name} {n}" for name, n in counts.items() if n]
        elapsed = time.monotonic() - self.started
        finished_now = done - self._initial_done
        if done >= self.total:
            parts.append(f"done in {_duration(elapsed)}")
        elif finished_now > 0:
            parts.append(f"ETA {_duration(elapsed / finished_now * (self.total - done))}")
        else:
            parts.append("ETA ?")
        return "  ".join(parts)

    def update(self, done: int, counts: Mapping[str, int], force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if self.line.tty and not force and now - self._drawn_at < 0.1:
                return
            self._drawn_at = now
            text = self.render(done, counts)
            if not self.line.tty:  # a log: only a changed count is news, not the ETA
                text_key = text.rsplit("  ETA", 1)[0]
                if text_key == self.line._last.rsplit("  ETA", 1)[0]:
                    return
            self.line.update(text)

    def close(self) -> None:
        self.line.close()
