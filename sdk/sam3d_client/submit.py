"""``sam3d-jobs submit``: one image and its masks to a server, optionally waited for and
downloaded. Prints the job id on stdout; progress and outcome go to stderr."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sam3d_client.errors import JobFailed, ServiceError
from sam3d_client.sdk import Client

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass(frozen=True)
class SubmitRequest:
    """What ``sam3d-jobs submit`` was asked to do."""

    image: Path
    masks: list[Path]
    server: str
    api_key: str | None = None
    mask_format: str | None = None
    image_id: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    depth: Path | None = None
    pointmap: Path | None = None
    intrinsics: Any = None
    idempotency_key: str | None = None
    wait: bool = False
    out: Path | None = None
    timeout: float | None = None
    prompts: list[dict[str, Any]] | None = None  # instead of masks


def _error(message: str) -> None:
    print(f"sam3d-jobs: error: {message}", file=sys.stderr)


def run_submit(req: SubmitRequest) -> int:
    """Submit; with ``wait`` or ``out``, wait (progress on stderr) and download to ``out``."""
    client = Client(req.server, req.api_key)
    try:
        job = client.submit(
            req.image,
            (req.masks[0] if len(req.masks) == 1 else list(req.masks)) if req.masks else None,
            mask_format=req.mask_format,
            image_id=req.image_id,
            idempotency_key=req.idempotency_key,
            depth=req.depth,
            pointmap=req.pointmap,
            intrinsics=req.intrinsics,
            prompts=req.prompts,
            **req.options,
        )
    except ServiceError as exc:
        _error(f"{exc.code}: {exc.message}")
        if exc.status is None:  # refused here, or no answer at all
            return EXIT_FAILED if exc.retryable else EXIT_BAD_INPUT
        return EXIT_BAD_INPUT if 400 <= exc.status < 500 and not exc.retryable else EXIT_FAILED
    print(job.id, flush=True)
    if not (req.wait or req.out):
        return EXIT_OK
    started = time.monotonic()
    try:
        job.wait(req.timeout, progress=True)
        if req.out is None:
            job.result()
            print(f"{job.id} succeeded in {time.monotonic() - started:.1f} s", file=sys.stderr)
            return EXIT_OK
        files = job.download(req.out)
    except JobFailed as exc:
        _error(str(exc))
        return EXIT_FAILED
    except TimeoutError as exc:
        _error(f"{exc}; it goes on on the server")
        return EXIT_FAILED
    except ServiceError as exc:
        _error(f"{exc.code}: {exc.message}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"\nstopped waiting; job {job.id} goes on on the server", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(
        f"{job.id} succeeded in {time.monotonic() - started:.1f} s; "
        f"{len(files)} files in {req.out}",
        file=sys.stderr,
    )
    for path in files.values():
        print(f"  {path}", file=sys.stderr)
    return EXIT_OK
