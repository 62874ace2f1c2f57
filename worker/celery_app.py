"""The Celery worker: one pool process per GPU, the backend set up once inside it.

The backend is built in the pool process (``worker_process_init``), never in the forking
parent, so CUDA is only ever touched in the process that runs jobs.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery import Celery, signals
from celery.worker import state as worker_state

from jobs.batches import BatchStore
from jobs.heartbeat import Heartbeat
from jobs.logs import configure_logging
from jobs.notify import Notifier
from jobs.queue import QUEUES, TASK_NAME, celery_config, send_job
from jobs.records import JobStore
from jobs.retry import redis_client
from jobs.settings import Settings
from jobs.storage import open_storage
from worker.backends import get_backend
from worker.gpu import gpu_status, pin_gpu
from worker.segmenters import get_segmenter
from worker.tasks import JobRunner
from worker.watchdog import EXIT_STALLED, ConsumerWatchdog, exit_for_restart

log = logging.getLogger("sam3d.worker")

_runner: JobRunner | None = None  # the pool process's resident state


def create_worker_app(
    settings: Settings, backend_name: str, queues: tuple[str, ...] = QUEUES
) -> Celery:
    """A Celery app whose task runs jobs with ``backend_name``, set up once per process,
    its main process watched by a consumer watchdog."""
    app = Celery("sam3d-worker", set_as_current=False)
    app.conf.update(celery_config(settings))

    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
    def generate(task, job_id: str) -> str:
        runner = _runner or _start_runner(settings, backend_name, app, queues)
        return runner.run(job_id)

    def on_process_init(**_: Any) -> None:
        _start_runner(settings, backend_name, app, queues)

    def on_process_shutdown(**_: Any) -> None:
        if _runner is not None:
            # A job handed to the finisher is completed before the process goes (recycled
            # for memory, or a warm shutdown); if it is killed instead, a sweep resends it.
            _runner.drain(timeout=settings.job_time_limit_s)
            if _runner.heartbeat is not None:
                _runner.heartbeat.stop()

    watchdogs: list[ConsumerWatchdog] = []
    app.sam3d_watchdogs = watchdogs  # type: ignore[attr-defined]  # run_worker's exit code

    def on_worker_ready(**_: Any) -> None:  # the main process, its consumer started
        watchdog = ConsumerWatchdog(
            redis_client(settings.redis_url),
            queues=queues,
            stall_s=settings.consumer_stall_s,
            interval_s=min(1.0, settings.heartbeat_interval_s),
            ttl_s=settings.heartbeat_ttl_s,
            # Reserved includes active: a message taken and waiting for the pool process.
            is_busy=lambda: bool(worker_state.reserved_requests),
            on_stall=lambda _: exit_for_restart(max(30.0, settings.consumer_stall_s)),
        )
        watchdogs.append(watchdog.start())

    def on_task_received(**_: Any) -> None:
        for watchdog in watchdogs:
            watchdog.received()

    def on_worker_shutdown(**_: Any) -> None:
        for watchdog in watchdogs:
            watchdog.stop()

    # weak=False: these closures would otherwise be garbage-collected and never fire.
    signals.worker_process_init.connect(on_process_init, weak=False)
    signals.worker_process_shutdown.connect(on_process_shutdown, weak=False)
    signals.worker_ready.connect(on_worker_ready, weak=False)
    signals.task_received.connect(on_task_received, weak=False)
    signals.worker_shutdown.connect(on_worker_shutdown, weak=False)
    return app


def _start_runner(
    settings: Settings, backend_name: str, app: Celery, queues: tuple[str, ...] = QUEUES
) -> JobRunner:
    global _runner
    # A job's writes ride out a Redis restart or freeze (retried for redis_retry_s); the
    # heartbeat thread's do not, so it keeps its pace and a beat lost is just skipped.
    client = redis_client(settings.redis_url, retry_s=settings.redis_retry_s)
    beats = redis_client(settings.redis_url)
    backend = get_backend(backend_name, settings)
    runner: list[JobRunner] = []
    # The main process's consumer watchdog (worker/watchdog.py) says whether it still
    # takes messages; readiness reads that beside this heartbeat.
    consumer = f"{socket.gethostname()}:{os.getppid()}"
    heartbeat = Heartbeat(
        beats,
        interval_s=settings.heartbeat_interval_s,
        ttl_s=settings.heartbeat_ttl_s,
        info=lambda: {
            **_describe(backend),
            "segmenter": settings.segmenter,
            "consumer": consumer,
            "jobs": sorted(runner[0].held) if runner else [],
        },
        on_beat=lambda: runner and runner[0].sweep(),
    )
    heartbeat.set(state="loading", model_loaded=False)
    heartbeat.start()
    backend.setup()  # load weights and warm up: only then does the heartbeat say "ready"
    # Prompts to masks, resident beside the model (the same preflight and refusals).
    segmenter = get_segmenter(settings.segmenter, settings)
    segmenter.setup()
    store = JobStore(client, on_terminal=Notifier(app, BatchStore(client)).job_finished)

    def requeue(record) -> None:
        send_job(app, settings, record.id, record.queue, record.backend, record.objects_total)

    _runner = JobRunner(
        settings,
        backend,
        store,
        open_storage(settings),
        heartbeat,
        requeue=requeue,
        sweep_store=JobStore(beats, on_terminal=store.on_terminal),
        segmenter=segmenter,
        queues=queues,
    )
    runner.append(_runner)
    heartbeat.set(state="ready", model_loaded=True)
    log.info("worker process %d ready with backend %s", os.getpid(), backend.name)
    return _runner


def _describe(backend) -> dict[str, Any]:
    """What the heartbeat says of this process besides its state: backend and device."""
    info: dict[str, Any] = {"backend": backend.name, "version": backend.version, "device": "cpu"}
    fast_paths = getattr(backend, "fast_paths", None)  # sam3d: which speed-ups are engaged
    if fast_paths is not None:
        info["fast_paths"] = [path.to_dict() for path in fast_paths.values()]
    if "SAM3D_GPU_INDEX" in os.environ or getattr(backend, "device", "cpu") == "cuda":
        gpu = gpu_status()
        info["device"] = f"cuda:{gpu['index']}" if gpu else "cuda (unavailable)"
        info["gpu"] = gpu
    return info


def run_worker(
    settings: Settings,
    *,
    backend: str,
    queues: tuple[str, ...] = QUEUES,
    loglevel: str = "INFO",
    hostname: str | None = None,
    gpu: int | None = None,
) -> None:
    """Run a worker in the foreground until SIGTERM/SIGINT (warm shutdown).

    With ``gpu``, the process and its pool child see only that GPU (one worker per GPU).
    """
    if gpu is not None:
        pin_gpu(gpu)  # before the pool forks; the parent never touches CUDA
        hostname = hostname or f"gpu{gpu}@%h"
    configure_logging("worker", settings.log_format, loglevel.upper())
    # Connected: Celery leaves logging alone, so its lines go through our handler too.
    signals.setup_logging.connect(lambda **_: None, weak=False)
    app = create_worker_app(settings, backend, queues)
    argv = [
        "--quiet",  # no start-up banner on stdout: every line goes through logging
        "worker",
        "--pool=prefork",
        "--concurrency=1",
        f"--queues={','.join(queues)}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    try:
        app.worker_main(argv)
    finally:
        if any(w.tripped for w in app.sam3d_watchdogs):  # type: ignore[attr-defined]
            raise SystemExit(EXIT_STALLED)
