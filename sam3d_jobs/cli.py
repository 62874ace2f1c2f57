"""The ``sam3d-jobs`` command: the server's operator commands (api, worker, webhooks, dev,
demo, healthcheck, generate) and the SDK's submit and bulk. Bad input exits with code 2 and a
one-line reason."""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

from sam3d_client.cli import add_commands, add_input_args, options_arg, run_command

from jobs.errors import Sam3dError
from jobs.masks import CocoImageAmbiguous

EXIT_BAD_INPUT = 2
EXIT_PREFLIGHT = 3  # the machine cannot run the chosen backend


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam3d-jobs", description="Image + object masks in, 3D assets out."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser(
        "generate",
        help="generate assets locally, no server",
        description="Write scene.glb, scene.ply, objects/{i}.glb, objects/{i}.ply and "
        "manifest.json for every mask, objects in mask order.",
    )
    add_input_args(gen)
    gen.add_argument("--backend", default="inflate", help="generator (default: inflate)")
    gen.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    gen.add_argument(
        "--options",
        type=options_arg,
        default={},
        help="backend options as JSON, e.g. '{\"fov_deg\": 50}'",
    )
    gen.add_argument("--out", type=Path, required=True, help="output folder")
    gen.set_defaults(run=_generate)

    api = commands.add_parser("api", help="serve the HTTP API (settings from SAM3D_* env)")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=2, help="gunicorn processes")
    api.add_argument("--threads", type=int, default=8, help="threads per process")
    api.set_defaults(run=_api)

    wrk = commands.add_parser("worker", help="run a Celery worker (one per GPU)")
    wrk.add_argument(
        "--backend", default=None, help="inflate (default: SAM3D_BACKEND) or module:Class"
    )
    wrk.add_argument(
        "--queues", default=None, help="comma-separated queues (default: SAM3D_QUEUES)"
    )
    wrk.add_argument("--gpu", type=int, default=None, help="the one GPU this worker uses")
    wrk.add_argument("--loglevel", default="INFO")
    wrk.set_defaults(run=_worker)

    hooks = commands.add_parser("webhooks", help="deliver webhooks (the 'webhooks' queue)")
    hooks.add_argument("--concurrency", type=int, default=8, help="deliveries in parallel")
    hooks.add_argument("--loglevel", default="INFO")
    hooks.set_defaults(run=_webhooks)

    dev = commands.add_parser("dev", help="the embedded stack: Redis, API, one inflate worker")
    dev.add_argument("--port", type=int, default=8000)
    dev.add_argument("--data", type=Path, default=Path("data"), help="Redis AOF and files")
    dev.add_argument("--backend", default="inflate")
    dev.add_argument("--workers", type=int, default=1)
    dev.set_defaults(run=_dev)

    health = commands.add_parser(
        "healthcheck", help="exit 0 when this container's API or worker is healthy (for Docker)"
    )
    health.add_argument("role", choices=("api", "worker"))
    health.add_argument("--port", type=int, default=8000, help="api: the port it listens on")
    health.set_defaults(run=_healthcheck)

    demo = commands.add_parser("demo", help="dev stack + the sample over HTTP, then stop")
    demo.add_argument("--out", type=Path, default=Path("out/demo"))
    demo.set_defaults(run=_demo)

    add_commands(commands)  # submit, bulk: the SDK's, the same as sam3d-client's
    return parser


def _settings():
    from jobs.settings import Settings

    return Settings.from_env()


def _api(args: argparse.Namespace) -> int:
    from api.server import serve

    serve(_settings(), host=args.host, port=args.port, workers=args.workers, threads=args.threads)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from jobs.queue import QUEUES
    from worker.celery_app import run_worker

    settings = _settings()
    queues = (
        tuple(q.strip() for q in args.queues.split(",") if q.strip())
        if args.queues is not None
        else settings.queues
    )
    unknown = set(queues) - set(QUEUES)
    if not queues or unknown:
        raise Sam3dError("invalid_option", f"--queues must name some of {', '.join(QUEUES)}")
    backend = args.backend or settings.backend
    from worker.backends import get_backend

    get_backend(backend, settings)  # fail fast, in the parent, on a name that cannot load
    from worker.segmenters import get_segmenter

    get_segmenter(settings.segmenter, settings)
    if settings.segmenter == "sam3":
        from worker.segmenters.sam3 import preflight as sam3_preflight

        sam3_preflight(settings)  # packages, weights, GPU memory (NVML): before any fork
    if backend == "sam3d":
        from worker.backends.sam3d.preflight import preflight

        preflight(settings, gpu_index=args.gpu)  # files, packages, GPU: before any fork
    run_worker(settings, backend=backend, queues=queues, loglevel=args.loglevel, gpu=args.gpu)
    return 0


def _webhooks(args: argparse.Namespace) -> int:
    from worker.webhook_app import run_webhook_worker

    run_webhook_worker(_settings(), concurrency=args.concurrency, loglevel=args.loglevel)
    return 0


def _dev(args: argparse.Namespace) -> int:
    from sam3d_jobs.devstack import run_dev

    return run_dev(args.port, args.data, args.backend, args.workers)


def _healthcheck(args: argparse.Namespace) -> int:
    """api: /healthz answers. worker: a heartbeat from this host says ready or busy."""
    if args.role == "api":
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/healthz", timeout=5):
                return 0
        except OSError as exc:
            print(f"api unhealthy: {exc}", file=sys.stderr)
            return 1
    import socket

    import redis

    from jobs.heartbeat import live_workers

    try:
        workers = live_workers(redis.Redis.from_url(_settings().redis_url, socket_timeout=5))
    except redis.RedisError as exc:
        print(f"worker unhealthy: Redis: {exc}", file=sys.stderr)
        return 1
    mine = [w for w in workers if w.get("hostname") == socket.gethostname()]
    if any(w.get("state") in ("ready", "busy") and w.get("consuming", True) for w in mine):
        return 0
    states = [w.get("state") if w.get("consuming", True) else "not consuming" for w in mine] or [
        "no heartbeat"
    ]
    print(f"worker unhealthy: {', '.join(states)}", file=sys.stderr)
    return 1


def _demo(args: argparse.Namespace) -> int:
    from sam3d_jobs.demo import run_demo

    return run_demo(args.out)


def _generate(args: argparse.Namespace) -> int:
    # Imported here: the other commands (api, client) must not pay for the worker's stack.
    from jobs.images import load_image
    from jobs.masks import load_mask_files
    from jobs.options import parse_options
    from worker.backends import get_backend
    from worker.pipeline import generate_assets

    options = dict(args.options)
    if args.seed is not None:
        options["seed"] = args.seed
    options = parse_options(args.backend, options)
    image = load_image(args.image)

    def load(file_name: str | None):
        return load_mask_files(
            args.masks,
            image.shape[:2],
            mask_format=args.mask_format,
            image_id=args.image_id,
            file_name=file_name,
        )

    try:
        masks = load(None)
    except Sam3dError as exc:
        # A COCO file of several images: pick the one named like IMAGE.
        if args.image_id is not None or not isinstance(exc, CocoImageAmbiguous):
            raise
        masks = load(args.image.name)
    depth = None
    if args.depth or args.pointmap:
        from jobs.depth import read_depth_input

        kind, path = ("depth", args.depth) if args.depth else ("pointmap", args.pointmap)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise Sam3dError("invalid_depth", f"cannot read {path}: {exc.strerror}") from None
        depth = read_depth_input(kind, data, args.intrinsics, image.shape[:2], masks)
    elif args.intrinsics is not None:
        raise Sam3dError("invalid_intrinsics", "--intrinsics needs --depth or --pointmap")
    backend = get_backend(args.backend)
    backend.setup()

    def report(done: int, total: int) -> None:
        print(f"object {done}/{total} done", file=sys.stderr)

    artifacts = generate_assets(
        image,
        masks,
        backend,
        options=options,
        job_id=f"local-{uuid.uuid4().hex[:12]}",
        on_object=report,
        depth=depth,
    )
    for path, data in artifacts.files.items():
        target = args.out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    print(f"{len(masks)} object(s) -> {args.out}")
    for path in artifacts.files:
        print(f"  {args.out / path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(args, "sam3d-jobs")  # the SDK's errors, unreadable files: code 2
    except Sam3dError as exc:
        print(f"sam3d-jobs: error: {exc}", file=sys.stderr)
        return EXIT_PREFLIGHT if exc.code == "preflight_failed" else EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
