"""``sam3d-jobs bulk``: every annotated image of a COCO file through the service.

One job per image that has annotations (all of them: polygons and RLE, crowd or not), sent
as that image's slice of the COCO file with ``priority=bulk``; N jobs in flight at a time;
each job's files in ``OUT/<image stem>/`` in the ``generate --out`` layout.

Resumable and never double-submitting: ``OUT/.sam3d-bulk-state.json`` (see
:mod:`client.bulk_state`) holds each image's deterministic ``Idempotency-Key`` before its
submit is sent and its job id right after, so a rerun skips finished images, polls the
running ones, and a submit whose answer was lost is sent again with the same key (the
service then answers with the job it already made). Ctrl-C stops submitting and polling,
leaves the state whole and exits 130; the jobs in flight go on on the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

from sam3d_client.bulk_state import (
    STATE_FILE,
    BulkState,
    ImageStatus,
    now_iso,
    write_json_atomically,
)
from sam3d_client.errors import Interrupted, InvalidInput, ServiceError
from sam3d_client.progress import ProgressBar
from sam3d_client.sdk import Client, Job
from sam3d_client.transport import RetryPolicy

EXIT_OK, EXIT_FAILURES, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
SUMMARY_FILE = "summary.json"
# HTTP statuses meaning "this input is refused": retrying it unchanged cannot help.
_REFUSED_INPUT = frozenset({400, 413, 422})
_IN_FLIGHT = (ImageStatus.QUEUED, ImageStatus.RUNNING, ImageStatus.DOWNLOADING)


@dataclass(frozen=True)
class BulkConfig:
    """What ``sam3d-jobs bulk`` was asked to do."""

    coco: Path
    images: Path
    out: Path
    server: str
    api_key: str | None = None
    concurrency: int = 4
    options: dict[str, Any] = field(default_factory=dict)
    retry_failed: bool = False
    timeout: float = 60.0
    max_poll_interval: float = 3.0


@dataclass(frozen=True)
class BulkImage:
    """One image of the COCO file and what to send for it."""

    key: str  # the image id as a string: the state's key
    image_id: Any
    file_name: str
    stem: str
    path: Path | None  # None: not on disk
    coco: dict[str, Any] | None  # the COCO file cut down to this image; None: no annotations

    @property
    def annotations(self) -> int:
        return len(self.coco["annotations"]) if self.coco else 0


def load_coco(path: Path) -> dict[str, Any]:
    """Read and sanity-check a COCO file (``images`` and ``annotations`` lists of objects)."""
    try:
        coco = json.loads(path.read_bytes())
    except OSError as exc:
        reason = exc.strerror or exc
        raise InvalidInput("invalid_request", f"cannot read {path}: {reason}") from None
    except ValueError as exc:
        raise InvalidInput("invalid_mask", f"{path} is not JSON: {exc}") from None
    if not isinstance(coco, dict):
        raise InvalidInput("invalid_mask", f"{path} is not a COCO file (not a JSON object)")
    for name in ("images", "annotations"):
        value = coco.get(name)
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise InvalidInput("invalid_mask", f"{path}: COCO {name!r} must be a list of objects")
    return coco


def _find_image(images_dir: Path, file_name: str) -> Path | None:
    """DIR/<file_name>, else DIR/<its base name> (file names often carry a split folder)."""
    relative = PurePosixPath(file_name.replace("\\", "/"))
    inside = relative.relative_to(relative.anchor)  # an absolute name is read as relative
    for candidate in (images_dir / inside, images_dir / relative.name):
        if candidate.is_file():
            return candidate
    return None


def plan_images(coco: dict[str, Any], images_dir: Path) -> tuple[list[BulkImage], list[str]]:
    """Every image of the COCO file, in file order, with its annotations; and warnings."""
    warnings: list[str] = []
    by_image: dict[str, list[dict[str, Any]]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(str(ann.get("image_id")), []).append(ann)
    seen: set[str] = set()
    stems: Counter[str] = Counter()
    planned: list[BulkImage] = []
    for entry in coco["images"]:
        if entry.get("id") is None or not entry.get("file_name"):
            warnings.append(f"COCO image without id or file_name skipped: {entry!r:.80}")
            continue
        key = str(entry["id"])
        if key in seen:
            raise InvalidInput("invalid_mask", f"COCO file lists image id {key} twice")
        seen.add(key)
        file_name = str(entry["file_name"])
        stem = PurePosixPath(file_name.replace("\\", "/")).stem or key
        stems[stem] += 1
        if stems[stem] > 1:  # a second a.jpg (another folder): keep both apart
            stem = f"{stem}-{key}"
        anns = by_image.get(key)
        planned.append(
            BulkImage(
                key=key,
                image_id=entry["id"],
                file_name=file_name,
                stem=stem,
                path=_find_image(images_dir, file_name),
                coco={"images": [entry], "annotations": anns} if anns else None,
            )
        )
    orphans = sum(len(anns) for key, anns in by_image.items() if key not in seen)
    if orphans:
        warnings.append(f"{orphans} annotation(s) refer to images the COCO file does not list")
    return planned, warnings


def idempotency_key(
    server: str, coco: Path, image: BulkImage, options: dict[str, Any], attempt: int
) -> str:
    """The same inputs give the same key, so a rerun can never make a second job."""
    ident = json.dumps(
        [server.rstrip("/"), str(coco), image.key, options, image.coco, attempt],
        sort_keys=True,
        default=str,
    )
    return "sam3d-bulk-" + hashlib.sha256(ident.encode()).hexdigest()[:48]


def _error_of(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ServiceError):
        return {"code": exc.code, "message": exc.message, "status": exc.status}
    if isinstance(exc, OSError):
        return {"code": "io_error", "message": f"{exc.strerror or exc}: {exc.filename or ''}"}
    return {"code": "client_error", "message": f"{type(exc).__name__}: {exc}"}


class BulkRun:
    """One invocation of ``sam3d-jobs bulk`` (see the module docstring)."""

    def __init__(
        self, config: BulkConfig, *, stderr: TextIO | None = None, stdout: TextIO | None = None
    ) -> None:
        self.config = config
        self.stderr = stderr or sys.stderr
        self.stdout = stdout or sys.stdout
        self.stop = threading.Event()
        self.fatal: ServiceError | None = None
        self.options = {"priority": "bulk", **config.options}
        self.client = Client(
            config.server,
            config.api_key,
            config.timeout,
            retry=RetryPolicy(attempts=8, max_backoff_s=15.0),
            interrupt=self.stop,
        )
        self.state: BulkState | None = None
        self.images: list[BulkImage] = []

    # -- one image ------------------------------------------------------------------------
    def _update(self, image: BulkImage, **changes: Any) -> None:
        assert self.state is not None
        self.state.update(image.key, **changes)

    def _submit(self, image: BulkImage, entry: dict[str, Any]) -> Job | None:
        """Submit (patiently through rate limits); None when the service refused the input."""
        assert image.path is not None and image.coco is not None
        delay = 1.0
        while True:
            try:
                return self.client.submit(
                    image.path,
                    image.coco,
                    mask_format="coco",
                    idempotency_key=entry["idempotency_key"],
                    **self.options,
                )
            except ServiceError as exc:
                busy = exc.status == 429 or (exc.status == 409 and exc.code == "conflict")
                if busy:  # rate limited, or the same key still in progress: wait our turn
                    self.client._transport.sleep(exc.retry_after or delay)
                    delay = min(30.0, delay * 2)
                    continue
                if exc.status == 401:
                    self.fatal = exc
                    self.stop.set()
                    raise
                if exc.status in _REFUSED_INPUT:
                    self._update(image, status=ImageStatus.FAILED, error=_error_of(exc))
                    return None
                raise

    def _poll(self, image: BulkImage, job: Job) -> Job:
        interval = 0.5
        status = job.status
        while not job.done:
            self.client._transport.sleep(interval)
            job.refresh()
            if job.status != status:
                status = job.status
                if not job.done:
                    self._update(image, status=ImageStatus(status))
            interval = min(self.config.max_poll_interval, interval * 1.5)
        return job

    def _process(self, image: BulkImage) -> None:
        if self.stop.is_set():
            return
        try:
            entry = self.state.get(image.key) if self.state else None
            assert entry is not None
            if entry.get("job_id"):  # submitted by an earlier run: poll it, never resubmit
                try:
                    job = self.client.job(entry["job_id"])
                except ServiceError as exc:
                    if exc.status != 404:
                        raise
                    self._update(image, status=ImageStatus.FAILED, error=_error_of(exc))
                    return
                if not job.done:
                    self._update(image, status=ImageStatus(job.status), error=None)
            else:
                maybe = self._submit(image, entry)
                if maybe is None:
                    return
                job = maybe
                self._update(image, job_id=job.id, status=ImageStatus(job.status), error=None)
            job = self._poll(image, job)
            if job.status != "succeeded":
                self._update(image, status=ImageStatus(job.status), error=job.error)
                return
            self._update(image, status=ImageStatus.DOWNLOADING)
            result = job.result()
            job.download(self.config.out / image.stem)
            self._update(
                image, status=ImageStatus.SUCCEEDED, error=None, objects=len(result.objects)
            )
        except Interrupted:
            return  # Ctrl-C: the state says where this image stands
        except Exception as exc:  # noqa: BLE001 - one image's trouble must not end the run
            if self.stop.is_set() and self.fatal is None:
                return
            self._update(image, status=ImageStatus.ERROR, error=_error_of(exc))

    # -- the run --------------------------------------------------------------------------
    def _prepare(self) -> list[BulkImage]:
        """Load the COCO file, check the server, open the state, record the images with
        nothing to submit; returns the images to work on."""
        cfg = self.config
        coco_path = cfg.coco.resolve()
        coco = load_coco(coco_path)
        if not cfg.images.is_dir():
            raise InvalidInput("invalid_request", f"--images {cfg.images} is not a folder")
        self.images, warnings = plan_images(coco, cfg.images)
        for warning in warnings:
            print(f"warning: {warning}", file=self.stderr)
        self.client._transport.json("GET", "/v1/jobs?limit=1")  # reachable, key accepted
        cfg.out.mkdir(parents=True, exist_ok=True)
        self.state = state = BulkState.open(
            cfg.out,
            {
                "server": cfg.server.rstrip("/"),
                "coco": str(coco_path),
                "images_dir": str(cfg.images.resolve()),
                "options": self.options,
            },
        )
        work = []
        for image in self.images:
            entry = state.get(image.key) or {}
            status = ImageStatus(entry.get("status", ImageStatus.PENDING))
            if status == ImageStatus.SUCCEEDED or (status.finished and not cfg.retry_failed):
                continue
            image = replace(image, stem=entry.get("stem", image.stem))  # keep its folder
            known = {"image_id": image.image_id, "file_name": image.file_name, "stem": image.stem}
            attempt = int(entry.get("attempt", 0))
            key, job_id = entry.get("idempotency_key"), entry.get("job_id")
            if status.finished:  # --retry-failed: a new attempt, so a new key and a new job
                attempt, key, job_id = attempt + 1, None, None
            if image.coco is None:
                state.update(image.key, **known, status=ImageStatus.NO_ANNOTATIONS)
                continue
            if job_id is None and image.path is None:
                state.update(image.key, **known, status=ImageStatus.MISSING)
                continue
            state.update(
                image.key,
                **known,
                idempotency_key=key
                or idempotency_key(cfg.server, coco_path, image, self.options, attempt),
                attempt=attempt,
                job_id=job_id,
                # With a job: as last seen, until the first poll. Without: to be submitted.
                status=status if job_id else ImageStatus.PENDING,
                error=entry.get("error") if job_id and status == ImageStatus.ERROR else None,
            )
            work.append(image)
        state.save()
        return work

    def _counts(self) -> tuple[int, int, dict[str, int]]:
        """(finished, to do, {label: n}) over the images that have something to submit."""
        assert self.state is not None
        statuses = [
            ImageStatus(e["status"])
            for e in self.state.entries()
            if e.get("status") not in ("missing", "no_annotations")
        ]
        counts = Counter(statuses)
        finished = sum(n for s, n in counts.items() if s.finished)
        labels = {
            "ok": counts[ImageStatus.SUCCEEDED],
            "failed": counts[ImageStatus.FAILED] + counts[ImageStatus.CANCELED],
            "in flight": sum(counts[s] for s in _IN_FLIGHT),
            "errors": counts[ImageStatus.ERROR],
        }
        return finished, len(statuses), labels

    def _install_sigint(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return None

        def on_sigint(signum: int, frame: Any) -> None:
            if self.stop.is_set():  # a second Ctrl-C: quit now (the state file is whole)
                self.stderr.write("\ninterrupted again; quitting now\n")
                self.stderr.flush()
                os._exit(EXIT_INTERRUPTED)
            self.stop.set()
            self.stderr.write("\ninterrupted: finishing state writes (Ctrl-C again to quit)\n")
            self.stderr.flush()

        return signal.signal(signal.SIGINT, on_sigint)

    def run(self) -> int:
        """Do the run; returns the exit code (0 all done, 1 failures, 2 bad input, 130 ^C)."""
        started, started_at = time.monotonic(), now_iso()
        previous = self._install_sigint()
        try:
            try:
                work = self._prepare()
            except Interrupted:
                print("interrupted", file=self.stderr)
                return EXIT_INTERRUPTED
            except ServiceError as exc:
                print(f"sam3d-jobs: error: {exc.code}: {exc.message}", file=self.stderr)
                return EXIT_BAD_INPUT
            bar = ProgressBar(self._counts()[1], self.stderr)
            with ThreadPoolExecutor(max(1, self.config.concurrency), "sam3d-bulk") as pool:
                pending = {pool.submit(self._process, image) for image in work}
                while pending and not self.stop.is_set():
                    _, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    finished, _, labels = self._counts()
                    bar.update(finished, labels)
                for future in pending:
                    future.cancel()
            finished, _, labels = self._counts()
            bar.update(finished, labels, force=True)
            bar.close()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        interrupted = self.stop.is_set() and self.fatal is None
        summary = self._summary(started_at, time.monotonic() - started, not interrupted)
        self._print_summary(summary)
        if self.fatal is not None:
            print(f"sam3d-jobs: error: {self.fatal.code}: {self.fatal.message}", file=self.stderr)
            return EXIT_BAD_INPUT
        if interrupted:
            print(
                f"interrupted; the state is in {self.config.out / STATE_FILE}. "
                "Run the same command again to resume.",
                file=self.stderr,
            )
            return EXIT_INTERRUPTED
        bad = summary["counts"]
        return EXIT_FAILURES if bad.get("failed") or bad.get("canceled") or bad.get("error") else 0

    # -- the summary ----------------------------------------------------------------------
    def _summary(self, started_at: str, elapsed: float, complete: bool) -> dict[str, Any]:
        assert self.state is not None
        rows = []
        for image in self.images:
            entry = self.state.get(image.key)
            if entry is None:
                continue
            done = entry["status"] == ImageStatus.SUCCEEDED
            rows.append(
                {
                    "image_id": entry["image_id"],
                    "file_name": entry["file_name"],
                    "status": entry["status"],
                    "job_id": entry.get("job_id"),
                    "out": entry.get("stem") if done else None,
                    "objects": entry.get("objects") if done else None,
                    "error": entry.get("error"),
                }
            )
        summary = {
            "complete": complete,
            "server": self.state.run["server"],
            "coco": self.state.run["coco"],
            "images_dir": self.state.run["images_dir"],
            "out": str(self.config.out.resolve()),
            "started_at": started_at,
            "finished_at": now_iso(),
            "elapsed_s": round(elapsed, 3),
            "counts": dict(Counter(row["status"] for row in rows)),
            "images": rows,
        }
        write_json_atomically(self.config.out / SUMMARY_FILE, summary)
        return summary

    def _print_summary(self, summary: dict[str, Any]) -> None:
        out = self.stdout
        order = [s.value for s in ImageStatus]
        counts = sorted(summary["counts"].items(), key=lambda kv: order.index(kv[0]))
        print(f"{'status':<16}{'images':>7}", file=out)
        for status, n in counts:
            print(f"{status:<16}{n:>7}", file=out)
        print(f"{'total':<16}{sum(summary['counts'].values()):>7}", file=out)
        print(f"time {summary['elapsed_s']:.1f} s", file=out)
        problems = [
            row for row in summary["images"] if row["status"] in ("failed", "canceled", "error")
        ]
        if problems:
            print("failed images:", file=out)
            for row in problems:
                error = row["error"] or {}
                print(
                    f"  {row['file_name']} (id {row['image_id']}): {row['status']}: "
                    f"{error.get('code')}: {error.get('message')}",
                    file=out,
                )
        for status in ("missing", "no_annotations"):
            names = [row["file_name"] for row in summary["images"] if row["status"] == status]
            if names:
                print(f"{status.replace('_', ' ')}: {', '.join(names)}", file=out)
        print(f"summary: {self.config.out / SUMMARY_FILE}", file=out)
        out.flush()


def run_bulk(config: BulkConfig) -> int:
    """``sam3d-jobs bulk``; returns the exit code."""
    try:
        return BulkRun(config).run()
    except InvalidInput as exc:
        print(f"sam3d-jobs: error: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
