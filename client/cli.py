"""The ``sam3d-jobs`` command. Bad input exits with code 2 and a one-line reason."""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

from jobs.errors import Sam3dError
from jobs.masks import MASK_FORMATS

EXIT_BAD_INPUT = 2
EXIT_PREFLIGHT = 3  # the machine cannot run the chosen backend


def _options_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--options is not JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--options must be a JSON object")
    return value


def _intrinsics_arg(text: str):
    """``fx,fy,cx,cy`` or JSON (``{"fx", "fy", "cx", "cy"}``, a list, a 3x3 K)."""
    try:
        if text.lstrip().startswith(("{", "[")):
            return json.loads(text)
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            "--intrinsics must be FX,FY,CX,CY (pixels) or JSON"
        ) from None


def add_input_args(cmd: argparse.ArgumentParser, prompts: bool = False) -> None:
    """IMAGE, --masks, --mask-format, --image-id, depth: the same for generate and submit
    (``prompts``: also --prompts and --boxes, for the worker's segmenter)."""
    cmd.add_argument("image", type=Path, help="JPEG, PNG or WebP image")
    if prompts:
        cmd.add_argument(
            "--prompts",
            metavar="FILE|JSON",
            help='instead of masks: [{"box": [x0,y0,x1,y1]}, {"points": [[x,y,1]]}, '
            '{"text": "mug"}], a JSON file or the JSON itself',
        )
        cmd.add_argument(
            "--boxes",
            type=Path,
            metavar="FILE",
            help="instead of masks: one box per object, x0 y0 x1 y1 per line (or a JSON list)",
        )
    cmd.add_argument(
        "--masks",
        type=Path,
        action="append",
        required=not prompts,
        metavar="FILE",
        help=".json (any JSON mask format, or a COCO file), .png (repeat for several), .npy",
    )
    cmd.add_argument("--mask-format", choices=MASK_FORMATS, help="skip format detection")
    cmd.add_argument("--image-id", type=int, help="COCO file: the image whose annotations to use")
    geometry = cmd.add_mutually_exclusive_group()
    geometry.add_argument(
        "--depth",
        type=Path,
        metavar="FILE",
        help="metric depth: 16-bit PNG in millimetres or float .npy (H,W) in metres",
    )
    geometry.add_argument(
        "--pointmap",
        type=Path,
        metavar="FILE",
        help="float .npy (H,W,3) in metres, OpenCV camera frame (+X right, +Y down, +Z fwd)",
    )
    cmd.add_argument(
        "--intrinsics",
        type=_intrinsics_arg,
        metavar="FX,FY,CX,CY",
        help="the camera in pixels (needed with --depth/--pointmap)",
    )


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
        type=_options_arg,
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
    wrk.add_argument("--queues", default="interactive,bulk", help="comma-separated queues")
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

    def add_server_args(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument(
            "--server",
            default=os.environ.get("SAM3D_SERVER"),
            required="SAM3D_SERVER" not in os.environ,
            metavar="URL",
            help="the service's base URL (default: $SAM3D_SERVER)",
        )
        cmd.add_argument(
            "--api-key",
            default=os.environ.get("SAM3D_API_KEY"),
            metavar="KEY",
            help="API key (default: $SAM3D_API_KEY)",
        )
        cmd.add_argument("--options", type=_options_arg, default={}, help="job options as JSON")

    sub = commands.add_parser(
        "submit",
        help="submit an image and its masks to a server",
        description="Print the job id; with --wait show progress and the outcome; with --out "
        "also download the files in the generate layout. Exit 1 when the job failed.",
    )
    add_input_args(sub, prompts=True)
    sub.add_argument("--idempotency-key", help="the same key returns the same job")
    add_server_args(sub)
    sub.add_argument("--wait", action="store_true", help="wait for the job, showing progress")
    sub.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    sub.add_argument("--out", type=Path, help="download the files here (implies --wait)")
    sub.set_defaults(run=_submit)

    bulk = commands.add_parser(
        "bulk",
        help="one job per image of a COCO file, resumable",
        description="Submit every annotated image of a COCO file (priority bulk), download "
        "each result to OUT/<image stem>/; state in OUT/.sam3d-bulk-state.json, so the same "
        "command resumes after Ctrl-C without submitting anything twice; OUT/summary.json.",
    )
    bulk.add_argument("--coco", type=Path, required=True, metavar="FILE", help="COCO file")
    bulk.add_argument(
        "--images", type=Path, required=True, metavar="DIR", help="folder of the images"
    )
    bulk.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    bulk.add_argument("--concurrency", type=int, default=4, help="jobs in flight (default 4)")
    bulk.add_argument(
        "--retry-failed", action="store_true", help="submit failed images again (new jobs)"
    )
    add_server_args(bulk)
    bulk.set_defaults(run=_bulk)
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
    queues = tuple(q.strip() for q in args.queues.split(",") if q.strip())
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
        from worker.backends.sam3d import preflight

        preflight(settings, gpu_index=args.gpu)  # files, packages, GPU: before any fork
    run_worker(settings, backend=backend, queues=queues, loglevel=args.loglevel, gpu=args.gpu)
    return 0


def _webhooks(args: argparse.Namespace) -> int:
    from worker.webhook_app import run_webhook_worker

    run_webhook_worker(_settings(), concurrency=args.concurrency, loglevel=args.loglevel)
    return 0


def _dev(args: argparse.Namespace) -> int:
    from client.devstack import run_dev

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
    from client.demo import run_demo

    return run_demo(args.out)


def _submit(args: argparse.Namespace) -> int:
    from client.prompts import read_boxes_file, read_prompts_arg
    from client.submit import SubmitRequest, run_submit

    given = [n for n in ("masks", "prompts", "boxes") if getattr(args, n)]
    if len(given) != 1:
        raise Sam3dError("invalid_request", "give one of --masks, --prompts and --boxes")
    from client.errors import ServiceError

    prompts = None
    try:
        if args.prompts:
            prompts = read_prompts_arg(args.prompts)
        elif args.boxes:
            prompts = read_boxes_file(args.boxes)
    except ServiceError as exc:
        raise Sam3dError("invalid_prompt", exc.message) from None
    return run_submit(
        SubmitRequest(
            image=args.image,
            masks=args.masks or [],
            prompts=prompts,
            server=args.server,
            api_key=args.api_key,
            mask_format=args.mask_format,
            image_id=args.image_id,
            options=args.options,
            depth=args.depth,
            pointmap=args.pointmap,
            intrinsics=args.intrinsics,
            idempotency_key=args.idempotency_key,
            wait=args.wait,
            out=args.out,
            timeout=args.timeout,
        )
    )


def _bulk(args: argparse.Namespace) -> int:
    from client.bulk import BulkConfig, run_bulk

    if args.concurrency < 1:
        raise Sam3dError("invalid_option", "--concurrency must be at least 1")
    return run_bulk(
        BulkConfig(
            coco=args.coco,
            images=args.images,
            out=args.out,
            server=args.server,
            api_key=args.api_key,
            concurrency=args.concurrency,
            options=args.options,
            retry_failed=args.retry_failed,
        )
    )


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
        if args.image_id is not None or "pass image_id or file_name" not in exc.message:
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
        return args.run(args)
    except Sam3dError as exc:
        print(f"sam3d-jobs: error: {exc}", file=sys.stderr)
        return EXIT_PREFLIGHT if exc.code == "preflight_failed" else EXIT_BAD_INPUT
    except OSError as exc:
        print(
            f"sam3d-jobs: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
